#!/usr/bin/env bash
# #17's last label-free signal, checked offline before building it into the guard: how often
# a policy's greedy answer on probe prompts differs from the base model's (its majority of 8
# samples at temperature 1, and its greedy answer), for every kept checkpoint of earlier
# `scripts/label-free-rl.sh` runs, beside that checkpoint's held-out accuracy (scores.txt).
#
#   scripts/base-disagreement.sh OUT RUN_DIR...     (from the repository root)
#
# The probes are the first 32 training questions of the first run (no labels are read).
set -euo pipefail
out=${1:?output folder}; shift
verity=${VERITY:-target/release/verity}
model=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
mkdir -p "$out"
head -32 "$1/train.jsonl" > "$out/probes.jsonl"
greedy() { # OUT [ADAPTER]
  local file=$1; shift
  local args=()
  [ $# -gt 0 ] && args=(--adapter "$1")
  [ -f "$file" ] || "$verity" eval --model "$model" --data "$out/probes.jsonl" --n 1 --temperature 0 \
    --select greedy --max-tokens 96 --concurrency 16 "${args[@]}" --out "$file" >/dev/null 2>&1
}
[ -f "$out/base-majority.jsonl" ] || "$verity" eval --model "$model" --data "$out/probes.jsonl" --n 8 \
  --temperature 1 --select majority --max-tokens 96 --concurrency 4 --seed 5 \
  --out "$out/base-majority.jsonl" >/dev/null 2>&1
greedy "$out/base-greedy.jsonl"
for run in "$@"; do
  for dir in "$run"/run/checkpoints/steps/step-00[0-9]0; do
    greedy "$out/$(basename "$run")-$(basename "$dir").jsonl" "$dir"
  done
done
python3 - "$out" "$@" <<'PY'
import json, sys, glob, os
out, runs = sys.argv[1], sys.argv[2:]
def answers(path, rule):
    got = {}
    for line in open(path):
        x = json.loads(line)
        if x.get("kind") == "rule" and x["rule"] == rule:
            got[x["question"]] = x.get("answer")
    return got
def norm(a):
    try:
        return float(a.replace(",", ""))
    except (AttributeError, ValueError):
        return a
def disagreement(policy, reference):
    return sum(norm(policy.get(q)) is None or norm(policy.get(q)) != norm(a) for q, a in reference.items()) / len(reference)
majority = answers(f"{out}/base-majority.jsonl", "majority")
base = answers(f"{out}/base-greedy.jsonl", "greedy")
print(f"base greedy vs base majority@8: {disagreement(base, majority):.2f}")
print("run checkpoint  vs-majority  vs-greedy  held-out")
for run in runs:
    name = os.path.basename(run.rstrip("/"))
    held = {l.split()[0]: l.split()[1] for l in open(f"{run}/scores.txt") if l.startswith("step-")}
    for path in sorted(glob.glob(f"{out}/{name}-step-*.jsonl")):
        step = path.rsplit("-", 1)[1][:4]
        g = answers(path, "greedy")
        print(f"{name} {int(step)}  {disagreement(g, majority):.2f}  {disagreement(g, base):.2f}  {held.get('step-' + step, '?')}")
PY
