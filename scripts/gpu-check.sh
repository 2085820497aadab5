#!/usr/bin/env bash
# The GPU check of issue 13, on a GPU machine, in one command and under 8 minutes:
#
#   bash scripts/gpu-check.sh OUT_DIR
#
# From a session with the device tool, after scripts/gpu-prepare.sh on the CPU machine:
#   run(command="bash scripts/gpu-check.sh $OUT", carry=["gpu-bin"], timeout_s=540)
#
# It builds nothing: the `cuda` release binary (and optionally test binaries) come prebuilt
# and xz-compressed in gpu-bin/ (made by scripts/gpu-pack.sh on a CPU machine; the folder is
# ignored by git and carried to the GPU machine beside the checkout). The machine has no
# Rust toolchain and no network; its python3 has torch, transformers and peft, and the CUDA
# libraries are the nvidia-* Python packages beside torch plus the driver's libcuda.
#
# Parts, in order of importance, each with a timeout; a part that fails or times out is
# recorded and the next one runs; a part that would start after the time budget
# (GPU_CHECK_BUDGET seconds, default 420) is skipped and said so:
#   env       CUDA libraries, GPU, driver; unpack the binaries
#   tests     every other gpu-bin/NAME.xz (a test binary, run in the checkout's root),
#             with the arguments in gpu-bin/NAME.args if present (e.g. a test-name filter)
#   models    random-weight HF folders (bf16): Qwen2.5-1.5B shape and a small Llama;
#             `verity info --device cuda` on the first
#   bandwidth device-to-device copy bandwidth (the roofline's denominator)
#   numerics  last-position logits + greedy tokens: verity CUDA vs transformers CUDA (bf16,
#             and f32 as the reference), verity CPU (f32), statistics on the device vs
#             src/stats.rs, the engine's greedy trace vs the direct forward
#   decode    verity `bench decode --device cuda` at batch 1/16/64 (128-token prompt, 256
#             new tokens, EOS ignored), statistics on vs off; transformers `generate` with
#             the dynamic and the static cache
#   train     `verity bench train --device cuda`: GRPO steps (8 prompts × 8 samples × 256
#             tokens, LoRA rank 16 on every linear module) and the hand-off; saves the
#             adapter in PEFT format
#   peft      the saved adapter: verity's logits with it vs transformers + peft
#   report    OUT_DIR/gpu-check.json and OUT_DIR/gpu-check.md (bars of issue 13)
#
# GPU_CHECK_SKIP (an extended regular expression) skips the parts whose names match, for a
# quicker rerun of what failed, e.g. GPU_CHECK_SKIP='^(decode_hf|logits_llama|numerics_llama)'.
# Part names: test_NAME models info_qwen bandwidth logits_MODEL_{verity_cuda,hf,verity_cpu}
# numerics_MODEL decode_verity decode_hf_dynamic train peft_verity peft_hf numerics_peft
# decode_hf_static (MODEL: qwen2.5-1.5b, llama-small). GPU_CHECK_KEEP=1 keeps the temporary
# folder (models, logits files) and prints it.
#
# Output: OUT_DIR/{gpu-check.json,gpu-check.md,env.txt,parts/,status/,logs/}. It commits
# nothing; the table goes into benches/gpu/RESULTS.md by hand with the date, GPU, driver and
# command. Exit status 0 when the report was written (bars may still fail: read it).
set -uo pipefail

out=${1:?usage: scripts/gpu-check.sh OUT_DIR}
root=$(cd "$(dirname "$0")/.." && pwd)
# A rerun into the same folder starts clean (only this script's own files are removed).
rm -rf "$out"/parts "$out"/status "$out"/logs "$out"/env.txt "$out"/gpu-check.json "$out"/gpu-check.md
mkdir -p "$out"/{parts,status,logs}
out=$(cd "$out" && pwd)
gpu="$root/scripts/gpu"
bins="$root/gpu-bin"
PY=${PYTHON:-python3}
budget=${GPU_CHECK_BUDGET:-420}
t0=$(date +%s)
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
keep_work=${GPU_CHECK_KEEP:-0}
cleanup() { if [ "$keep_work" = 1 ]; then echo "kept: $work" >&2; else rm -rf "$work"; fi; }
trap cleanup EXIT

elapsed() { echo $(($(date +%s) - t0)); }
say() { echo "[gpu-check $(elapsed)s] $*" >&2; }
env_line() { echo "$1=$2" >>"$out/env.txt"; }
: >"$out/env.txt"

# status NAME RC SECONDS LIMIT [SKIP_REASON]
status() {
    local timed_out=false skipped=null
    { [ "$2" = 124 ] || [ "$2" = 137 ]; } && timed_out=true
    [ -n "${5:-}" ] && skipped="\"$5\""
    printf '{"name": "%s", "rc": %s, "seconds": %s, "limit": %s, "timed_out": %s, "skipped": %s}\n' \
        "$1" "$2" "$3" "$4" "$timed_out" "$skipped" >"$out/status/$1.json"
}

# part NAME LIMIT CMD...: runs CMD (stdout+stderr to logs/NAME.log) under a timeout cut to
# what the budget leaves; returns its exit status (or 125 when skipped).
part() {
    local name=$1 limit=$2
    shift 2
    local left=$((budget - $(elapsed)))
    if [ -n "${GPU_CHECK_SKIP:-}" ] && [[ "$name" =~ $GPU_CHECK_SKIP ]]; then
        say "$name: skipped (GPU_CHECK_SKIP)"
        status "$name" null 0 "$limit" "matches GPU_CHECK_SKIP"
        return 125
    fi
    if [ "$left" -lt 15 ]; then
        say "$name: skipped (time budget of ${budget}s spent)"
        status "$name" null 0 "$limit" "time budget of ${budget}s spent"
        return 125
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    say "$name (≤ ${limit}s)"
    local s=$(date +%s.%N)
    timeout -k 10 "$limit" "$@" >"$out/logs/$name.log" 2>&1
    local rc=$?
    local secs
    secs=$(awk -v a="$s" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    status "$name" "$rc" "$secs" "$limit"
    if [ "$rc" = 0 ]; then say "$name: ok (${secs}s)"; else
        say "$name: FAILED (exit $rc after ${secs}s); last lines:"
        tail -n 8 "$out/logs/$name.log" | sed 's/^/    /' >&2
    fi
    return "$rc"
}

# need NAME...: skip (recorded) unless every named earlier part succeeded.
need() {
    local p
    for p in "$@"; do
        if ! grep -q '"rc": 0,' "$out/status/$p.json" 2>/dev/null; then
            echo "$p did not succeed"
            return 1
        fi
    done
}
skip() { say "$1: skipped ($2)"; status "$1" null 0 0 "$2"; }

# ---------------------------------------------------------------- env
env_line date "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
# The CUDA libraries: every lib/ of Python's nvidia packages (nvidia/*/lib, nvidia/cu13/lib),
# after the driver's folder, so that the real libcuda.so.1 wins over any stub.
nv_libs=$("$PY" - <<'PY' 2>/dev/null
import glob, os
try:
    import nvidia
    roots = list(nvidia.__path__)
except Exception:
    roots = []
dirs = []
for r in roots:
    for d in sorted(glob.glob(os.path.join(r, "*", "lib"))):
        if glob.glob(os.path.join(d, "*.so*")):
            dirs.append(d)
print(":".join(dirs))
PY
)
driver_lib=$(ldconfig -p 2>/dev/null | awk '/libcuda\.so\.1 /{print $NF; exit}')
driver_dir=${driver_lib:+$(dirname "$driver_lib")}
export LD_LIBRARY_PATH="${driver_dir:+$driver_dir:}${nv_libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
say "driver libcuda: ${driver_lib:-NOT FOUND (ldconfig -p)}"
say "nvidia package libraries: ${nv_libs:-NONE FOUND}"
env_line libcuda "${driver_lib:-}"
env_line nvidia_lib_dirs "$nv_libs"
env_line LD_LIBRARY_PATH "$LD_LIBRARY_PATH"
if command -v nvidia-smi >/dev/null; then
    smi=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n1)
    say "nvidia-smi: $smi"
    env_line gpu "$(echo "$smi" | cut -d, -f1 | xargs)"
    env_line driver "$(echo "$smi" | cut -d, -f2 | xargs)"
    env_line gpu_memory "$(echo "$smi" | cut -d, -f3 | xargs)"
else
    say "nvidia-smi: not found"
fi
"$PY" - >>"$out/env.txt" 2>/dev/null <<'PY'
import importlib
for m in ("torch", "transformers", "peft", "safetensors", "tokenizers"):
    try:
        print("%s=%s" % (m, importlib.import_module(m).__version__))
    except Exception as e:
        print("%s=missing (%s)" % (m, type(e).__name__))
try:
    import torch
    print("torch_cuda=%s" % torch.version.cuda)
except Exception:
    pass
PY

# The binaries (xz, or Python's lzma where the machine has no xz).
unxz() { # unxz FILE.xz OUT
    if command -v xz >/dev/null; then xz -dc "$1" >"$2"; else
        "$PY" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$1" "$2"
    fi
}
verity=""
mkdir -p "$work/bin"
if [ -f "$bins/verity.xz" ]; then
    unxz "$bins/verity.xz" "$work/bin/verity" && chmod +x "$work/bin/verity" && verity="$work/bin/verity"
elif [ -x "$bins/verity" ]; then
    verity="$bins/verity"
fi
if [ -n "$verity" ]; then
    missing=$(ldd "$verity" 2>&1 | grep "not found" | awk '{print $1}' | xargs)
    say "verity binary: $verity; libraries not found: ${missing:-none}"
    env_line verity_missing_libs "$missing"
    env_line verity_version "$("$verity" --version 2>&1 | head -n1)"
    ldd "$verity" >"$out/logs/ldd-verity.log" 2>&1
else
    say "no gpu-bin/verity.xz: run scripts/gpu-pack.sh on the CPU machine and carry gpu-bin"
fi
tok_dir="$work/tokenizers"
mkdir -p "$tok_dir"
if [ -f "$bins/tokenizers.tar.xz" ]; then
    "$PY" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$bins/tokenizers.tar.xz" "$tok_dir"
fi
env_line carried_tokenizers "$(ls "$tok_dir" 2>/dev/null | xargs)"

# ---------------------------------------------------------------- tests
# First: if the kernels fail their own tests, the numbers below mean little.
tests_json="$out/parts/tests.json"
echo '{"binaries": []}' >"$tests_json"
for xzf in "$bins"/*.xz; do
    [ -e "$xzf" ] || continue
    name=$(basename "$xzf" .xz)
    case "$name" in verity | *.tar) continue ;; esac
    unxz "$xzf" "$work/bin/$name" && chmod +x "$work/bin/$name"
    args=()
    [ -f "$bins/$name.args" ] && read -r -a args <"$bins/$name.args"
    part "test_$name" 90 bash -c 'cd "$1" && shift && exec "$@"' _ "$root" "$work/bin/$name" ${args[@]+"${args[@]}"}
    rc=$?
    "$PY" - "$tests_json" "$name" "$rc" "$out/status/test_$name.json" "$out/logs/test_$name.log" <<'PY'
import json, sys
path, name, rc, status, logf = sys.argv[1:]
data = json.load(open(path))
st = json.load(open(status))
summary = [l.strip() for l in open(logf, errors="replace") if l.startswith("test result:")]
data["binaries"].append({"name": name, "rc": int(rc), "seconds": st.get("seconds") or 0,
                         "summary": "; ".join(summary) or None})
json.dump(data, open(path, "w"), indent=2)
PY
done

# ---------------------------------------------------------------- models
models="$work/models"
part models 150 "$PY" "$gpu/make_models.py" --out "$models" --tokenizers "$tok_dir" \
    --summary "$out/parts/models.json"
qwen="$models/qwen2.5-1.5b"
llama="$models/llama-small"
ids_of() { "$PY" -c 'import json,sys; print(",".join(map(str, json.load(open(sys.argv[1]))[sys.argv[2]])))' "$models/prompts.json" "$1"; }

if [ -n "$verity" ] && need models >/dev/null; then
    part info_qwen 60 "$verity" info --device cuda --model "$qwen"
fi

# ---------------------------------------------------------------- bandwidth
part bandwidth 60 "$PY" "$gpu/bandwidth.py" --out "$out/parts/bandwidth.json"

# ---------------------------------------------------------------- numerics
# numerics MODEL_NAME DIR STEPS: verity CUDA, transformers (bf16 + f32), verity CPU, compare.
numerics() {
    local name=$1 dir=$2 steps=$3 ids why=""
    if ! why=$(need models); then skip "numerics_$name" "$why"; return; fi
    if [ -z "$verity" ]; then skip "numerics_$name" "no verity binary"; return; fi
    ids=$(ids_of "$name")
    part "logits_${name}_verity_cuda" 90 "$verity" bench logits --device cuda --model "$dir" \
        --ids "$ids" --steps "$steps" --out "$work/logits_${name}_verity_cuda.json"
    part "logits_${name}_hf" 120 "$PY" "$gpu/hf_logits.py" --model "$dir" --ids "$ids" \
        --steps "$steps" --out "$work/logits_${name}_hf.json"
    part "logits_${name}_verity_cpu" 150 "$verity" bench logits --device cpu --model "$dir" \
        --ids "$ids" --steps "$steps" --out "$work/logits_${name}_verity_cpu.json"
    # Compare whatever came out: transformers and at least one verity device.
    local args=()
    [ -f "$work/logits_${name}_verity_cuda.json" ] && args+=(--verity-cuda "$work/logits_${name}_verity_cuda.json")
    [ -f "$work/logits_${name}_verity_cpu.json" ] && args+=(--verity-cpu "$work/logits_${name}_verity_cpu.json")
    if why=$(need "logits_${name}_hf") && [ ${#args[@]} -gt 0 ]; then
        part "numerics_$name" 60 "$PY" "$gpu/compare.py" --name "$name" \
            --hf "$work/logits_${name}_hf.json" "${args[@]}" --out "$out/parts/numerics_$name.json"
    else
        skip "numerics_$name" "${why:-no verity logits file}"
    fi
}
numerics qwen2.5-1.5b "$qwen" 16

# ---------------------------------------------------------------- decode
why=""
if [ -n "$verity" ] && why=$(need models); then
    # Stats batch 64 first: it carries the bar.
    part decode_verity 200 "$verity" bench decode --device cuda --model "$qwen" \
        --batches 1,16,64 --stats-batches 64,1,16 --repeats 2 --tokens 256 --prompt-tokens 128 \
        --json "$out/parts/decode_verity.json"
else
    skip decode_verity "${why:-no verity binary}"
fi
if why=$(need models); then
    part decode_hf_dynamic 150 "$PY" "$gpu/hf_generate.py" --model "$qwen" --batches 64,16,1 \
        --prompt-tokens 128 --new-tokens 256 --cache dynamic --out "$out/parts/decode_hf_dynamic.json"
else
    skip decode_hf_dynamic "$why"
fi

# ---------------------------------------------------------------- train
peft_dir="$work/peft-adapter"
why=""
if [ -n "$verity" ] && why=$(need models); then
    # A large learning rate, so that the saved adapter moves the logits far more than bf16
    # noise (the PEFT check below is meaningless for an adapter that does nothing); the
    # step time does not depend on it.
    part train 150 "$verity" bench train --device cuda --model "$qwen" --prompts 8 --group 8 \
        --prompt-tokens 128 --completion-tokens 256 --rank 16 --alpha 32 --lr 3e-2 --steps 2 \
        --save-peft "$peft_dir" --json "$out/parts/train.json"
else
    skip train "${why:-no verity binary}"
fi

# ---------------------------------------------------------------- peft
why=""
if [ -n "$verity" ] && why=$(need models train) && [ -f "$peft_dir/adapter_config.json" ]; then
    ids=$(ids_of qwen2.5-1.5b)
    part peft_verity 90 "$verity" bench logits --device cuda --model "$qwen" --adapter "$peft_dir" \
        --ids "$ids" --steps 8 --out "$work/peft_verity.json"
    part peft_hf 120 "$PY" "$gpu/hf_logits.py" --model "$qwen" --adapter "$peft_dir" --ids "$ids" \
        --steps 8 --out "$work/peft_hf.json"
    if why=$(need peft_verity peft_hf); then
        base=()
        [ -f "$work/logits_qwen2.5-1.5b_hf.json" ] && base+=(--hf-base "$work/logits_qwen2.5-1.5b_hf.json")
        [ -f "$work/logits_qwen2.5-1.5b_verity_cuda.json" ] && base+=(--verity-base "$work/logits_qwen2.5-1.5b_verity_cuda.json")
        part numerics_peft 60 "$PY" "$gpu/compare.py" --name peft --hf "$work/peft_hf.json" \
            --verity-cuda "$work/peft_verity.json" ${base[@]+"${base[@]}"} --out "$out/parts/numerics_peft.json"
    else
        skip numerics_peft "$why"
    fi
else
    skip peft_verity "${why:-no verity binary or no saved adapter}"
fi

# ---------------------------------------------------------------- the small Llama, static cache
numerics llama-small "$llama" 16
if why=$(need models); then
    part decode_hf_static 150 "$PY" "$gpu/hf_generate.py" --model "$qwen" --batches 64,1,16 \
        --prompt-tokens 128 --new-tokens 256 --cache static --out "$out/parts/decode_hf_static.json"
else
    skip decode_hf_static "$why"
fi

# ---------------------------------------------------------------- report
env_line elapsed_seconds "$(elapsed)"
"$PY" "$gpu/report.py" "$out" --command "bash scripts/gpu-check.sh $1" >"$out/logs/report.log" 2>&1
rc=$?
if [ "$rc" = 0 ]; then
    cat "$out/gpu-check.md"
else
    say "report.py failed (exit $rc):"
    cat "$out/logs/report.log" >&2
fi
say "done in $(elapsed)s: $out/gpu-check.md, $out/gpu-check.json"
exit "$rc"
