#!/usr/bin/env bash
# Distillation (issue #20): W3 GPTQ vs W3 GPTQ + kd vs teacher-targeted GPTQ (α = 1 and the
# paper's 0.25); SVD-LLM 40% with and without kd; 2:4 SparseGPT with and without kd.
#   ref:  ../shared/models/ref-llama-9m, calibration 128 × 512 random c4 windows (seed 0, as
#         pipelines/w3-gptq-kd.yaml), full wikitext2 / ptb / c4_eval, W3 g128, kd 100 steps × 4.
#   real: models-real/smollm2-135m-instruct (scripts/get-real-model.sh), calibration the first
#         128 c4 documents (as pipelines/bench/real-table.sh), the first 300,000 bytes of
#         wikitext2 and c4_eval (the heads real-table.sh cuts), W3 g64, kd 20 steps × 2 (the
#         per-layer budget cut to fit the 2-core machine).
# kd: lr 0.005, every parameter group, seed 0. Runs already finished (report.json present) are
# skipped, so re-running completes a table; the table is printed at the end.
# Usage (repository root, ../shared beside it): pipelines/bench/kd-table.sh ref|real [OUT] [RECIPE…]
set -euo pipefail
which=${1:?ref or real}
out=${2:-out/kd-$which}
shift; shift || true
mkdir -p "$out"
bin=${BIN:-target/release/compress}
S=../shared
. "$(dirname "$0")/lib.sh"
[ -n "${BIN:-}" ] || cargo build --release --quiet
T='targets: ["re:.*_proj$"]'
if [ "$which" = ref ]; then
  model=$S/models/ref-llama-9m
  calib="calibration: {path: $S/data/calib/c4_calib.jsonl, field: text, samples: 128, seq_len: 512, seed: 0}"
  sets="[$S/data/eval/wikitext2/wiki.test.raw, $S/data/eval/ptb/ptb.test.txt, $S/data/eval/c4/c4_eval.jsonl]"
  g=128; kd="kd: {lr: 0.005, steps: 100, batch: 4, seed: 0}"
else
  model=models-real/smollm2-135m-instruct
  [ -f "$model/model.safetensors" ] || scripts/get-real-model.sh
  calib="calibration: {path: $S/data/calib/c4_calib.jsonl, sampling: documents, samples: 128, seq_len: 512}"
  cut_heads "$out" "$S"
  sets="[$out/wiki-head300k.txt, $out/c4-head300k.txt]"
  g=64; kd="kd: {lr: 0.005, steps: 20, batch: 2, seed: 0}"
fi
q="gptq: {bits: 3, group_size: $g, $T}"
recipes=(
  "dense|"
  "gptq-w3|$q"
  "gptq-w3-kd|$q\n  - $kd"
  "gptq-w3-teacher|gptq: {bits: 3, group_size: $g, target: teacher, teacher_alpha: 1.0, $T}"
  "gptq-w3-teacher-a025|gptq: {bits: 3, group_size: $g, target: teacher, teacher_alpha: 0.25, $T}"
  "svd-llm-40|svd_llm: {ratio: 0.40, $T}"
  "svd-llm-40-kd|svd_llm: {ratio: 0.40, $T}\n  - $kd"
  "sparsegpt-2of4|sparsegpt: {pattern: '2:4', $T}"
  "sparsegpt-2of4-kd|sparsegpt: {pattern: '2:4', $T}\n  - $kd"
)
run_recipes "$@"
print_table "$out" "${recipes[@]%%|*}"
