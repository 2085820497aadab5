#!/usr/bin/env bash
# Everything the GPU check needs, prepared on the CPU machine in one command:
#
#   scripts/gpu-prepare.sh        # then, with the device tool:
#   run(command="bash scripts/gpu-check.sh $OUT", carry=["gpu-bin"], timeout_s=540)
#
# Installs the pinned CUDA 13.0 toolkit (scripts/cuda-toolkit.sh), builds the `cuda`
# binaries and the GPU test executables (the library's unit tests and tests/cuda.rs, run
# there with --ignored: the kernels against their references), and packs them with the
# tokenizers into gpu-bin/ (scripts/gpu-pack.sh). CUDA_TARGET (default /work/cuda-target)
# is the cargo target folder; VERITY_CUDA_TOOLKIT (default ~/.cache/verity/cuda-13.0) the
# toolkit's.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
toolkit=${VERITY_CUDA_TOOLKIT:-$HOME/.cache/verity/cuda-13.0}
export CUDA_TARGET=${CUDA_TARGET:-/work/cuda-target}
cd "$root"
[ -f "$toolkit/env.sh" ] || scripts/cuda-toolkit.sh "$toolkit"
# shellcheck disable=SC1091
source "$toolkit/env.sh"
export CARGO_TARGET_DIR=$CUDA_TARGET
# The GPU machine is another x86-64 processor: .cargo/config.toml's target-cpu=native
# (this machine's AMD extensions) stops there with SIGILL. x86-64-v3 is AVX2 + FMA, which
# candle's quantized CPU kernels use and every current server has. The binaries are
# stripped for the trip, so no debug information is built.
export RUSTFLAGS=${VERITY_GPU_RUSTFLAGS:--C target-cpu=x86-64-v3}
export CARGO_PROFILE_RELEASE_DEBUG=false
cargo build --release --features cuda
# The test executables, as cargo names them (the JSON lines of --no-run).
mapfile -t tests < <(cargo test --release --features cuda -p verity --lib --test cuda --no-run \
    --message-format=json 2>/dev/null |
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["executable"])')
[ "${#tests[@]}" -eq 2 ] || { echo "gpu-prepare: expected 2 test executables, got: ${tests[*]}" >&2; exit 1; }
mkdir -p gpu-bin
# Only the tests that need a GPU; the rest ran here.
echo "--ignored --test-threads=1 gpu" >gpu-bin/verity-lib-tests.args
echo "--ignored --test-threads=1" >gpu-bin/cuda.args
scripts/gpu-pack.sh "${tests[@]}"
