#!/usr/bin/env bash
# Side by side: `verity bench decode` and mistral.rs 0.8.1 on the same GGUF, prompts and
# token counts, one after the other on an otherwise idle machine, then the ratios.
#
#   benches/mistralrs/run.sh [MODEL.gguf] [BATCHES] [TOKENS]
#
# The mistral.rs release build takes ~26 minutes on 2 cores the first time; it is never part
# of verity's own build or CI. Both build for the native CPU (the repository's
# .cargo/config.toml applies to this crate too), as llama.cpp does.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
model="${1:-$root/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
batches="${2:-1,4,16,64}"
tokens="${3:-64}"
out="$(mktemp -d)"

(cd "$root" && cargo build --release --bin verity)
(cd "$root/benches/mistralrs" && cargo build --release)

echo "== verity"
"$root/target/release/verity" bench decode --model "$model" --batches "$batches" --tokens "$tokens" | tee "$out/verity.txt"
echo "== mistral.rs"
"$root/benches/mistralrs/target/release/verity-mistralrs-bench" "$model" "$batches" "$tokens" | tee "$out/mistralrs.txt"

# Rows both print: "batch N: X tok/s" and "n = 16 of one prompt: X tok/s; 16 independent requests: Y tok/s".
rows() {
  awk '/batch +[0-9]+:/ { sub(":", "", $2); print "batch", $2, $3 }
       /n = 16 of one prompt/ { sub(";", "", $7); print "n=16 shared", $7; print "16 independent", $12 }' "$1"
}
echo "== verity / mistral.rs, tokens/s"
awk 'FNR == NR { v[$1 " " $2] = $3; next }
     ($1 " " $2) in v { printf "  %-16s verity %7.1f   mistral.rs %7.1f   %.2f×\n", $1 " " $2, v[$1 " " $2], $3, v[$1 " " $2] / $3 }' \
  <(rows "$out/verity.txt") <(rows "$out/mistralrs.txt")
