#!/usr/bin/env bash
# #17's label-free test-time RL check: `verity rl` without labels (--reward ttrl, intuitor,
# entropy; or verifier for comparison) for STEPS steps on arithmetic, then every kept policy
# (checkpoints/steps/step-N, every 10 steps) and the adapter the run ended on, scored greedy
# on a held-out set the run never saw. The best of those is what a labelled guard would
# have picked; the bar is the kept adapter within 3 points of it.
#
#   scripts/label-free-rl.sh REWARD OUT [STEPS]      (from the repository root)
#   SEED=2 scripts/label-free-rl.sh ...               (another run of the same settings)
#
# Settings are those under which TTRL collapsed with labels hidden (lr 5e-4, difficulty 1).
set -euo pipefail
reward=${1:?reward: ttrl, intuitor, entropy or verifier}
out=${2:?output folder}
steps=${3:-90}
seed=${SEED:-1}
verity=${VERITY:-target/release/verity}
model=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
mkdir -p "$out"
[ -f "$out/train.jsonl" ] || "$verity" tasks --kind arithmetic --difficulty 1 --n 400 --seed 11 --out "$out/train.jsonl"
[ -f "$out/heldout.jsonl" ] || "$verity" tasks --kind arithmetic --difficulty 1 --n 200 --seed 13 --out "$out/heldout.jsonl"
start=$(date +%s)
# A finished run is scored again without training again.
[ -f "$out/run/adapter/adapter_config.json" ] || "$verity" rl --model "$model" --data "$out/train.jsonl" --reward "$reward" --steps "$steps" \
  --eval-every 5 --group 8 --prompts-per-step 2 --max-tokens 96 --lr 5e-4 --seed "$seed" \
  --out "$out/run" 2>&1 | tee "$out/rl.log"
[ -f "$out/rl.log" ] && grep -q "^rl: " "$out/rl.log" || echo "rl: $(( $(date +%s) - start )) s" | tee -a "$out/rl.log"

score() { # NAME [ADAPTER]
  local name=$1; shift
  local args=()
  [ $# -gt 0 ] && args=(--adapter "$1")
  "$verity" eval --model "$model" --data "$out/heldout.jsonl" --n 1 --select greedy \
    --temperature 0 --max-tokens 96 --concurrency 16 "${args[@]}" --out "$out/eval-$name.jsonl" \
    2>/dev/null | awk -v n="$name" '$1 == "greedy" { print n, $2, $3, $5, $6 }'
}
{
  echo "adapter accuracy low95 high95 tokens/q"
  score base
  for dir in "$out"/run/checkpoints/steps/step-*; do
    step=${dir##*step-}
    (( 10#$step % 10 == 0 )) && score "step-$step" "$dir"
  done
  score kept "$out/run/adapter"
} | tee "$out/scores.txt"
