#!/usr/bin/env bash
# The size budget (issue #40) against uniform GPTQ on ref-llama-9m and on SmolLM2-135M-Instruct
# (scripts/get-real-model.sh): uniform W2 / W3 / W4 at the model's group (128 on ref, 64 on
# SmolLM2, whose 576 inputs are not a multiple of 128), and the budget over those grids plus W8
# per channel at 3.0 and 3.5 bits per weight and at exactly the uniform W3 file's size (its
# report's bits per weight). One candidate list for every row and model. compressed-tensors
# (3-bit codes pack ten to an int32: W3 costs 3.2 bits before scales). Calibration: the first
# 128 c4_calib documents ≤ 512 tokens; perplexity at seq 512 on the first 300,000 bytes of
# wikitext2's test file and of the c4_eval text.
# `sensitivity: output_error`, `relative` (the default) and `kl` (end to end) rows side by side.
# Usage (repository root, ../shared beside it):
#   pipelines/bench/budget-table.sh [ref|real] [OUT] [RECIPE…]   (all recipes when none named)
set -euo pipefail
which=${1:-ref}
out=${2:-out/budget-$which}
shift $(( $# < 2 ? $# : 2 ))
mkdir -p "$out"
bin=${BIN:-target/release/compress}
S=../shared
[ -n "${BIN:-}" ] || cargo build --release --quiet
if [ "$which" = real ]; then
  model=models-real/smollm2-135m-instruct; g=64
  [ -f "$model/model.safetensors" ] || scripts/get-real-model.sh
else
  model=$S/models/ref-llama-9m; g=128
fi
. "$(dirname "$0")/lib.sh"
cut_heads "$out" "$S"
sets="[$out/wiki-head300k.txt, $out/c4-head300k.txt]"
calib="calibration: {path: $S/data/calib/c4_calib.jsonl, sampling: documents, samples: 128, seq_len: 512}"
t='targets: ["re:.*_proj$"]'
cands="candidates: [{bits: 2, group_size: $g}, {bits: 3, group_size: $g}, {bits: 4, group_size: $g}, {bits: 8, strategy: channel}]"
recipes=(
  "gptq-w2|gptq: {bits: 2, group_size: $g, $t}"
  "gptq-w3|gptq: {bits: 3, group_size: $g, $t}"
  "gptq-w4|gptq: {bits: 4, group_size: $g, $t}"
  "budget-3.0|budget: {bits_per_weight: 3.0, sensitivity: output_error, $cands, $t}"
  "budget-3.0-relative|budget: {bits_per_weight: 3.0, sensitivity: relative, $cands, $t}"
  "budget-3.5|budget: {bits_per_weight: 3.5, sensitivity: output_error, $cands, $t}"
  "budget-3.0-kl|budget: {bits_per_weight: 3.0, sensitivity: kl, $cands, $t}"
)
run_recipes "$@"
# the budget at exactly the uniform W3 file's size
if [ -f "$out/gptq-w3/report.json" ]; then
  w3=$(python3 -c "import json;print(json.load(open('$out/gptq-w3/report.json'))['output']['bits_per_weight'])")
  recipes=(
    "budget-at-w3|budget: {bits_per_weight: $w3, sensitivity: output_error, $cands, $t}"
    "budget-at-w3-relative|budget: {bits_per_weight: $w3, sensitivity: relative, $cands, $t}"
    "budget-at-w3-kl|budget: {bits_per_weight: $w3, sensitivity: kl, $cands, $t}"
  )
  run_recipes "$@"
fi
python3 - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]
print("| recipe | bits per weight | wikitext2 head | c4_eval head | allocation | compress s |")
print("|---|---:|---:|---:|---|---:|")
for n in ["gptq-w2", "gptq-w3", "gptq-w4", "budget-3.0", "budget-3.0-relative", "budget-3.0-kl",
          "budget-at-w3", "budget-at-w3-relative", "budget-at-w3-kl", "budget-3.5"]:
    p = os.path.join(out, n, "report.json")
    if not os.path.exists(p):
        continue
    r = json.load(open(p))
    ppl = [r["eval"][k]["after"]["perplexity"] for k in ["wiki-head300k.txt", "c4-head300k.txt"]]
    count = {}
    for rec in r["layers"]:
        c = rec["notes"].get("candidate")
        if c:
            count[c] = count.get(c, 0) + 1
    alloc = ", ".join(f"{k} ×{v}" for k, v in count.items()) or "uniform"
    print(f"| {n} | {r['output']['bits_per_weight']:.4f} | {ppl[0]:.2f} | {ppl[1]:.2f} | {alloc} | {r['timing']['compress_seconds']:.1f} |")
PY
