#!/usr/bin/env bash
# Activation-aware quantization (issue #16): RTN vs AWQ (± clip search, search on 32 or all 128
# windows) vs GPTQ vs AWQ + GPTQ at W4 (and W3 on the real model), and W8A8: RTN and
# SmoothQuant + GPTQ with dynamic per-token int8 activations (quantized in calibration and in
# evaluation, so the perplexity is W8A8's).
#   ref:  ../shared/models/ref-llama-9m, calibration as the peer table (the first 128 c4_calib
#         documents cut to 512 tokens, `sampling: documents`), full wikitext2 / ptb / c4_eval,
#         W4 symmetric group 128 (the peer's W4A16 scheme).
#   real: models-real/smollm2-135m-instruct (scripts/get-real-model.sh), same calibration, the
#         first 300,000 bytes of wikitext2 and c4_eval (real-table.sh's heads), group 64 (576
#         inputs are not a multiple of 128), W4 and W3.
# Runs already finished (report.json present) are skipped, so re-running completes a table;
# the table is printed at the end with each pass's own seconds.
# Usage (repository root, ../shared beside it): pipelines/bench/awq-table.sh ref|real [OUT] [RECIPE…]
set -euo pipefail
which=${1:?ref or real}
out=${2:-out/awq-$which}
shift; shift || true
mkdir -p "$out"
bin=${BIN:-target/release/compress}
S=../shared
. "$(dirname "$0")/lib.sh"
[ -n "${BIN:-}" ] || cargo build --release --quiet
T='targets: ["re:.*_proj$"]'
calib="calibration: {path: $S/data/calib/c4_calib.jsonl, sampling: documents, samples: 128, seq_len: 512}"
recipes=("dense|")
if [ "$which" = ref ]; then
  model=$S/models/ref-llama-9m
  sets="[$S/data/eval/wikitext2/wiki.test.raw, $S/data/eval/ptb/ptb.test.txt, $S/data/eval/c4/c4_eval.jsonl]"
  grids="4:128"
else
  model=models-real/smollm2-135m-instruct
  [ -f "$model/model.safetensors" ] || scripts/get-real-model.sh
  cut_heads "$out" "$S"
  sets="[$out/wiki-head300k.txt, $out/c4-head300k.txt]"
  grids="4:64 3:64"
fi
for grid in $grids; do
  b=${grid%%:*}; g=${grid#*:}; w="w${b}g$g"; q="bits: $b, group_size: $g"
  recipes+=(
    "rtn-$w|rtn: {$q, $T}"
    "gptq-$w|gptq: {$q, $T}"
    "awq-$w|awq: {$q, sym: true, $T}\n  - rtn: {$q, $T}"
    "awq-$w-noclip|awq: {$q, sym: true, clip: false, $T}\n  - rtn: {$q, $T}"
    "awq-$w-noclip-s128|awq: {$q, sym: true, clip: false, search_samples: 128, $T}\n  - rtn: {$q, $T}"
    "awq-gptq-$w|awq: {$q, sym: true, $T}\n  - gptq: {$q, $T}"
  )
done
recipes+=(
  "rtn-w8a8|rtn: {bits: 8, strategy: channel, act_bits: 8, $T}"
  "smoothquant-gptq-w8a8|smoothquant: {smoothing_strength: 0.8, $T}\n  - gptq: {bits: 8, strategy: channel, act_bits: 8, $T}"
)
run_recipes "$@"
print_table "$out" "${recipes[@]%%|*}"
