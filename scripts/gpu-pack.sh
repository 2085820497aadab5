#!/usr/bin/env bash
# Packs what scripts/gpu-check.sh needs on a GPU machine into gpu-bin/ (ignored by git;
# carry it with the device tool: carry ["gpu-bin"]). Runs on the CPU machine, after
# `cargo build --release --features cuda` (see scripts/cuda-toolkit.sh):
#
#   scripts/gpu-pack.sh [TEST_EXECUTABLE...]
#
# - gpu-bin/verity.xz: the cuda release binary, stripped and `xz -9`'d (71 MB → ~9 MB; the
#   binary embeds candle's PTX).
# - gpu-bin/NAME.xz for each test executable given (e.g. the `Executable` paths that
#   `cargo test --release --features cuda --no-run` prints); NAME drops cargo's hash. Put
#   arguments for one (a test-name filter, `--test-threads=1`) into gpu-bin/NAME.args.
# - gpu-bin/tokenizers.tar.xz: qwen2.5/ and smollm2/ tokenizer folders written by
#   `verity bench tokenizer` from the GGUF files in models/ (models/fetch.sh smollm2
#   qwen-coder-0.5b), so that the random-weight models made on the GPU machine have the real
#   vocabularies (the Qwen2.5 GGUF lists 151,936 ids, padding included: the embedding's rows).
#
# Environment: CUDA_TARGET (default /work/cuda-target) holds release/verity; VERITY_BIN
# overrides the binary; MODELS (default models/ of this checkout) holds the GGUF files;
# CUDA_LIB is the toolkit's lib/ (with the libcuda stub) for running the cuda binary here
# to export the tokenizers [default: found from CUDA_PATH or ~/.cache/verity/cuda-13.0].
# The whole folder must stay under 60 MiB (the device tool carries at most 64 MiB).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
target=${CUDA_TARGET:-/work/cuda-target}
verity=${VERITY_BIN:-$target/release/verity}
models=${MODELS:-$root/models}
out="$root/gpu-bin"
limit_mib=60

[ -x "$verity" ] || { echo "gpu-pack: no cuda binary at $verity (cargo build --release --features cuda, or set VERITY_BIN)" >&2; exit 1; }
mkdir -p "$out"
rm -f "$out"/*.xz
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

pack() { # pack FILE NAME
    strip -o "$tmp/$2" "$1"
    xz -9 -T2 -c "$tmp/$2" >"$out/$2.xz"
    awk -v n="$2" -v a="$(stat -c %s "$tmp/$2")" -v b="$(stat -c %s "$out/$2.xz")" \
        'BEGIN { printf "  %-28s %6.1f MB stripped -> %5.1f MB xz\n", n, a / 1e6, b / 1e6 }'
    rm -f "$tmp/$2"
}

echo "binaries:"
pack "$verity" verity
for t in "$@"; do
    [ -x "$t" ] || { echo "gpu-pack: $t is not an executable" >&2; exit 1; }
    name=$(basename "$t" | sed -E 's/-[0-9a-f]{16}$//')
    # The library's unit tests are named after the crate: keep them apart from the CLI.
    [ "$name" = verity ] && name=verity-lib-tests
    pack "$t" "$name"
done

# The cuda binary runs here on the CPU with the toolkit's libraries and the libcuda stub.
lib=${CUDA_LIB:-}
if [ -z "$lib" ]; then
    for cand in "${CUDA_PATH:-/nonexistent}/lib" "$HOME"/.cache/verity/cuda-13.0/venv/lib/python3*/site-packages/nvidia/cu13/lib /work/cuda-13.0/venv/lib/python3*/site-packages/nvidia/cu13/lib; do
        if [ -e "$cand/libcuda.so.1" ]; then lib=$cand; break; fi
    done
fi
run_verity() { LD_LIBRARY_PATH="${lib}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$verity" "$@"; }
if ! run_verity --version >/dev/null 2>&1; then
    echo "gpu-pack: $verity does not run here (set CUDA_LIB to the toolkit's lib/ with the libcuda stub)" >&2
    exit 1
fi

echo "tokenizers:"
mkdir -p "$tmp/tokenizers"
for pair in "qwen2.5:qwen2.5-coder-0.5b-instruct-q4_k_m.gguf:qwen-coder-0.5b" "smollm2:SmolLM2-135M-Instruct.Q4_1.gguf:smollm2"; do
    IFS=: read -r name file fetch <<<"$pair"
    if [ -f "$models/$file" ]; then
        run_verity bench tokenizer --model "$models/$file" --out "$tmp/tokenizers/$name"
    else
        echo "  WARNING: $models/$file is missing (models/fetch.sh $models $fetch): the GPU check will use a byte-level stand-in for $name" >&2
    fi
done
if [ -n "$(ls "$tmp/tokenizers")" ]; then
    tar -cJf "$out/tokenizers.tar.xz" -C "$tmp/tokenizers" .
else
    rm -f "$out/tokenizers.tar.xz"
fi

total=$(du -cb "$out" | tail -n1 | cut -f1)
echo "gpu-bin/:"
ls -l "$out" | tail -n +2 | awk '{printf "  %-28s %8.1f MB\n", $NF, $5 / 1e6}'
awk -v t="$total" -v l="$limit_mib" 'BEGIN { printf "total %.1f MiB (limit %d MiB)\n", t / 1048576, l }'
if [ "$total" -gt $((limit_mib * 1048576)) ]; then
    echo "gpu-pack: gpu-bin/ is over ${limit_mib} MiB: carry fewer test executables" >&2
    exit 1
fi
