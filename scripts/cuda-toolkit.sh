#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 toolkit from PyPI packages into a folder (no GPU needed) and
# writes `env.sh` there, which sets what `cargo build --features cuda` needs.
#
#   scripts/cuda-toolkit.sh [DIR]          # DIR defaults to ~/.cache/verity/cuda-13.0
#   source DIR/env.sh && cargo build --release --features cuda
#
# Why 13.0: the H200 machines' driver is 580 (CUDA 13.0), and PTX from a newer nvcc does not
# load on an older driver. nvvm and crt are pinned too: unpinned, pip takes 13.5 ones whose
# PTX 9.5 the 13.0 ptxas rejects. The packages ship versioned libraries only, so the
# unversioned names the linker looks for are added as symlinks. No package has the driver
# library (libcuda): a stub with one function per driver symbol cudarc names is built for the
# link; at run time a GPU machine's real libcuda.so.1 is found first (put DIR/lib after the
# driver's folder, or leave it off LD_LIBRARY_PATH there), and on a CPU machine the binary
# runs on the CPU with the stub.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="${1:-${HOME}/.cache/verity/cuda-13.0}"
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"

if [ ! -x "$dir/venv/bin/python" ]; then
    python3 -m venv "$dir/venv"
fi
# The exact compiler build the GPU machines' driver was released with.
"$dir/venv/bin/python" -m pip install -q --disable-pip-version-check \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-cccl==13.0.85 \
    nvidia-cublas==13.0.2.14 nvidia-curand==10.4.5.25
cu="$("$dir/venv/bin/python" - <<'PY'
import glob, os, nvidia
for base in nvidia.__path__:
    for cand in glob.glob(os.path.join(base, "cu13")):
        print(cand)
        raise SystemExit
raise SystemExit("no nvidia/cu13 folder in the installed packages")
PY
)"
echo "toolkit: $cu"
lib="$cu/lib"

# Unversioned names for the libraries cudarc links (dynamic-linking).
for name in cudart cublas cublasLt nvrtc curand; do
    target="$(cd "$lib" && ls "lib$name.so."* 2>/dev/null | sort | head -n1 || true)"
    [ -n "$target" ] || { echo "missing lib$name.so.* in $lib" >&2; exit 1; }
    ln -sf "$target" "$lib/lib$name.so"
done

# The libcuda stub: every `cu*` symbol cudarc's driver bindings load.
cudarc_version="$(awk '/^name = "cudarc"/{getline; gsub(/[^0-9.]/, ""); print; exit}' "$root/Cargo.lock")"
(cd "$root" && cargo fetch -q)
sys="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-"$cudarc_version"/src/driver/sys 2>/dev/null | head -n1)"
[ -d "$sys" ] || { echo "cudarc $cudarc_version sources not found (cargo fetch)" >&2; exit 1; }
grep -rhoE 'load::<_F>\(c?"cu[A-Za-z0-9_]+' "$sys" | grep -oE 'cu[A-Za-z0-9_]+' | sort -u >"$dir/libcuda-symbols.txt"
count="$(wc -l <"$dir/libcuda-symbols.txt")"
[ "$count" -gt 100 ] || { echo "only $count driver symbols found in $sys" >&2; exit 1; }
{
    echo "/* Link-time stand-in for the CUDA driver library: every call fails. */"
    while read -r sym; do echo "int $sym(void) { return 999; /* CUDA_ERROR_UNKNOWN */ }"; done <"$dir/libcuda-symbols.txt"
} >"$dir/libcuda-stub.c"
gcc -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$lib/libcuda.so.1" "$dir/libcuda-stub.c"
ln -sf libcuda.so.1 "$lib/libcuda.so"
echo "libcuda stub: $count symbols"

cat >"$dir/env.sh" <<ENV
# Written by scripts/cuda-toolkit.sh: the pinned CUDA 13.0 toolkit for \`--features cuda\`.
export CUDA_PATH="$cu" CUDA_ROOT="$cu" CUDA_HOME="$cu"
export PATH="$cu/bin:\$PATH"
export CUDA_COMPUTE_CAP=90
export LIBRARY_PATH="$lib\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
ENV
"$cu/bin/nvcc" --version | tail -n2
echo "now: source $dir/env.sh"
