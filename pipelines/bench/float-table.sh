#!/usr/bin/env bash
# Float and microscale schemes (issue #39): RTN vs GPTQ for FP8_DYNAMIC, FP8_BLOCK, NVFP4A16
# and MXFP4A16, with the integer W4A16 rows beside them.
#   ref:  ../shared/models/ref-llama-9m, calibration as the peer table (the first 128 c4_calib
#         documents cut to 512 tokens, `sampling: documents`), full wikitext2 / ptb / c4_eval;
#         integer W4 at group 128 (the peer's W4A16).
#   real: models-real/smollm2-135m-instruct (scripts/get-real-model.sh), same calibration, the
#         first 300,000 bytes of wikitext2 and c4_eval (real-table.sh's heads); integer W4 at
#         group 64 (576 inputs are not a multiple of 128).
# The FP8_DYNAMIC rows quantize activations per token in evaluation (as the config declares);
# FP8_BLOCK per group of 128. Finished runs (report.json present) are skipped.
# Usage (repository root, ../shared beside it): pipelines/bench/float-table.sh ref|real [OUT] [RECIPE…]
set -euo pipefail
which=${1:?ref or real}
out=${2:-out/float-$which}
shift; shift || true
mkdir -p "$out"
bin=${BIN:-target/release/compress}
S=../shared
. "$(dirname "$0")/lib.sh"
[ -n "${BIN:-}" ] || cargo build --release --quiet
T='targets: ["re:.*_proj$"]'
calib="calibration: {path: $S/data/calib/c4_calib.jsonl, sampling: documents, samples: 128, seq_len: 512}"
if [ "$which" = ref ]; then
  model=$S/models/ref-llama-9m
  sets="[$S/data/eval/wikitext2/wiki.test.raw, $S/data/eval/ptb/ptb.test.txt, $S/data/eval/c4/c4_eval.jsonl]"
  g=128
else
  model=models-real/smollm2-135m-instruct
  [ -f "$model/model.safetensors" ] || scripts/get-real-model.sh
  cut_heads "$out" "$S"
  sets="[$out/wiki-head300k.txt, $out/c4-head300k.txt]"
  g=64
fi
recipes=("dense|")
for s in NVFP4A16 MXFP4A16 FP8_DYNAMIC FP8_BLOCK; do
  n=$(echo "$s" | tr 'A-Z_' 'a-z-')
  recipes+=("rtn-$n|rtn: {scheme: $s, $T}" "gptq-$n|gptq: {scheme: $s, $T}")
done
recipes+=("rtn-w4g$g|rtn: {bits: 4, group_size: $g, $T}" "gptq-w4g$g|gptq: {bits: 4, group_size: $g, $T}")
run_recipes "$@"
print_table "$out" $(for r in "${recipes[@]}"; do printf '%s ' "${r%%|*}"; done)
