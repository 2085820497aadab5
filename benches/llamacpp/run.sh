#!/usr/bin/env bash
# Side by side: verity and llama.cpp (llama-bench from llama-cpp-python 0.3.36's vendored
# llama.cpp, built here for the native CPU) on the same GGUF, same thread count:
#
#   1. prefill: prompt tokens/s for a 512-token prompt (llama-bench -p 512 -n 0, verity
#      bench prefill);
#   2. batch-1 decode tokens/s (llama-bench -p 0 -n 64, verity bench decode --batches 1);
#   3. the same decode while one other process keeps one core busy (`yes > /dev/null`),
#      and the fraction of the idle speed each keeps.
#
#   benches/llamacpp/run.sh [MODEL.gguf] [THREADS]
#
# The llama.cpp build takes ~10 minutes on 2 cores the first time (cmake comes from PyPI
# when missing); it lands in target/llamacpp and is never part of verity's build or CI.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
model="${1:-$root/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
threads="${2:-$(nproc)}"
work="$root/target/llamacpp"
bench="$work/build/bin/llama-bench"
mkdir -p "$work"

if [ ! -x "$bench" ]; then
  if ! command -v cmake >/dev/null; then
    python3 -m pip install -q --disable-pip-version-check --only-binary :all: --target "$work/cmake" cmake
    export PATH="$work/cmake/cmake/data/bin:$PATH"
  fi
  if [ ! -d "$work/src" ]; then
    # (--no-binary for this package only: its build tools come as wheels)
    python3 -m pip download -q --disable-pip-version-check --no-deps \
      --no-binary llama-cpp-python -d "$work/sdist" llama-cpp-python==0.3.36
    mkdir -p "$work/src"
    tar -xzf "$work"/sdist/llama_cpp_python-0.3.36.tar.gz -C "$work/src" --strip-components=3 \
      llama_cpp_python-0.3.36/vendor/llama.cpp
  fi
  cmake -S "$work/src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null
  cmake --build "$work/build" --target llama-bench -j "$threads"
fi
(cd "$root" && cargo build --release --bin verity)
verity="$root/target/release/verity"
export VERITY_THREADS="$threads"

# llama-bench's markdown table: the last column is "t/s" as "mean ± sd".
llama() { "$bench" -m "$model" -t "$threads" -r 3 "$@" -o md | awk -F'|' '/ (pp|tg)[0-9]+ /{ split($(NF-1), a, "±"); print a[1] + 0 }'; }
ours_prefill() { "$verity" bench prefill --model "$model" --prompt-tokens 512 --repeats 3 | awk '/tokens:/ { print $3 }'; }
ours_decode() { "$verity" bench decode --model "$model" --batches 1 --stats-batches 1 --repeats 1 --rounds 1 | awk '/^ +batch +1:/ { print $3 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }

echo "model $model, $threads threads"
lp=$(llama -p 512 -n 0); vp=$(ours_prefill)
echo "prefill 512:        verity $vp tok/s   llama.cpp $lp tok/s   $(ratio "$vp" "$lp")×"
ld=$(llama -p 0 -n 64); vd=$(ours_decode)
echo "decode batch 1:     verity $vd tok/s   llama.cpp $ld tok/s   $(ratio "$vd" "$ld")×"
yes > /dev/null & busy=$!
trap 'kill $busy 2>/dev/null || true' EXIT
lb=$(llama -p 0 -n 64); vb=$(ours_decode)
kill $busy
echo "decode, 1 core busy: verity $vb tok/s ($(ratio "$vb" "$vd") of idle)   llama.cpp $lb tok/s ($(ratio "$lb" "$ld") of idle)   $(ratio "$vb" "$lb")×"
