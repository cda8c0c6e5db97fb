#!/usr/bin/env bash
# RTN and GPTQ on a real pretrained checkpoint (SmolLM2-135M-Instruct, fetched and converted by
# scripts/get-real-model.sh into models-real/, git-ignored): W4 and W3, group 64 (576 inputs
# are not a multiple of 128), act order on (the default: static) and off, symmetric,
# `targets: ["re:.*_proj$"]`. Calibration: the first 128 documents of c4_calib.jsonl
# (`sampling: documents`, ≤ 512 tokens each), as llm-compressor's examples. Perplexity at
# seq 512 on the first 300,000 bytes of wikitext2's test file and of the c4_eval text (the
# texts of issue #25's table).
# Usage (repository root, ../shared beside it): pipelines/bench/real-table.sh [OUT_DIR] [RECIPE…]
set -euo pipefail
out=${1:-out/real}
shift || true
mkdir -p "$out"
bin=${BIN:-target/release/compress}
model=models-real/smollm2-135m-instruct
S=../shared
[ -n "${BIN:-}" ] || cargo build --release --quiet
[ -f "$model/model.safetensors" ] || scripts/get-real-model.sh
. "$(dirname "$0")/lib.sh"
cut_heads "$out" "$S"
# EVAL_SETS="c4" evaluates one head only; EVAL_FILES="F …" evaluates those files instead
# (load checks: scripts/load-check.sh)
sets=$(for s in ${EVAL_SETS:-wiki c4}; do printf '%s, ' "$out/$s-head300k.txt"; done)
[ -z "${EVAL_FILES:-}" ] || sets=$(for f in $EVAL_FILES; do printf '%s, ' "$f"; done)
eval_block="eval: {datasets: [${sets%, }], seq_len: 512, baseline: false}"
calib="calibration: {path: $S/data/calib/c4_calib.jsonl, sampling: documents, samples: 128, seq_len: 512}"
run() { # name pass
  [ -f "$out/$1/report.json" ] && { echo "$1: done"; return; }
  cat > "$out/$1.yaml" <<YAML
model: $model
output: $out/$1
$calib
passes:
  - $(printf '%b' "$2")
export: {format: compressed-tensors}
$eval_block
YAML
  /usr/bin/time -f "%e s wall, %M KB max RSS" -o "$out/$1.time" $bin "$out/$1.yaml" --overwrite --quiet
  echo "$1: $(cat "$out/$1.time")"
}
recipes=(
  "dense|"
  "rtn-w4g64|rtn: {bits: 4, group_size: 64, targets: [\"re:.*_proj$\"]}"
  "gptq-w4g64|gptq: {bits: 4, group_size: 64, targets: [\"re:.*_proj$\"]}"
  "gptq-w4g64-noact|gptq: {bits: 4, group_size: 64, act_order: false, targets: [\"re:.*_proj$\"]}"
  "rtn-w3g64|rtn: {bits: 3, group_size: 64, targets: [\"re:.*_proj$\"]}"
  "gptq-w3g64|gptq: {bits: 3, group_size: 64, targets: [\"re:.*_proj$\"]}"
  "gptq-w3g64-noact|gptq: {bits: 3, group_size: 64, act_order: false, targets: [\"re:.*_proj$\"]}"
  "gptq-w3g64-teacher|gptq: {bits: 3, group_size: 64, target: teacher, targets: [\"re:.*_proj$\"]}"
  "gptq-w3g64-teacher-a025|gptq: {bits: 3, group_size: 64, target: teacher, teacher_alpha: 0.25, targets: [\"re:.*_proj$\"]}"
  "awq-w4g64|awq: {bits: 4, group_size: 64, sym: true, targets: [\"re:.*_proj$\"]}\n  - rtn: {bits: 4, group_size: 64, targets: [\"re:.*_proj$\"]}"
  "awq-w3g64|awq: {bits: 3, group_size: 64, sym: true, targets: [\"re:.*_proj$\"]}\n  - rtn: {bits: 3, group_size: 64, targets: [\"re:.*_proj$\"]}"
  "magnitude-50|magnitude: {sparsity: 0.5, targets: [\"re:.*_proj$\"]}"
  "wanda-50|wanda: {sparsity: 0.5, targets: [\"re:.*_proj$\"]}"
  "sparsegpt-50|sparsegpt: {sparsity: 0.5, targets: [\"re:.*_proj$\"]}"
  "magnitude-2of4|magnitude: {pattern: '2:4', targets: [\"re:.*_proj$\"]}"
  "wanda-2of4|wanda: {pattern: '2:4', targets: [\"re:.*_proj$\"]}"
  "sparsegpt-2of4|sparsegpt: {pattern: '2:4', targets: [\"re:.*_proj$\"]}"
  "sparsegpt-2of4-gptq-w4g64|sparsegpt: {pattern: '2:4', targets: [\"re:.*_proj$\"]}\n  - gptq: {bits: 4, group_size: 64, targets: [\"re:.*_proj$\"]}"
  "wanda-70|wanda: {sparsity: 0.7, targets: [\"re:.*_proj$\"]}"
  "wanda-70-owl|wanda: {sparsity: 0.7, allocation: owl, targets: [\"re:.*_proj$\"]}"
)
for r in "${recipes[@]}"; do
  name=${r%%|*}; pass=${r#*|}
  if [ $# -gt 0 ] && [[ ! " $* " =~ " $name " ]]; then continue; fi
  if [ "$name" = dense ]; then
    [ -f "$out/dense/report.json" ] || { cat > "$out/dense.yaml" <<YAML
model: $model
output: $out/dense
passes: []
$eval_block
YAML
    $bin "$out/dense.yaml" --overwrite --quiet; }
  else
    run "$name" "$pass"
  fi
done
python3 - "$out" <<'PY'
import json, sys, os
out = sys.argv[1]
print("| recipe | wikitext2 head | c4_eval head | compress s |")
print("|---|---:|---:|---:|")
for n in ["dense", "rtn-w4g64", "gptq-w4g64", "gptq-w4g64-noact", "awq-w4g64", "rtn-w3g64", "gptq-w3g64", "gptq-w3g64-noact", "gptq-w3g64-teacher", "gptq-w3g64-teacher-a025", "awq-w3g64", "magnitude-50", "wanda-50", "sparsegpt-50", "magnitude-2of4", "wanda-2of4", "sparsegpt-2of4", "sparsegpt-2of4-gptq-w4g64", "wanda-70", "wanda-70-owl"]:
    p = os.path.join(out, n, "report.json")
    if not os.path.exists(p):
        continue
    r = json.load(open(p))
    v = [f'{r["eval"][k]["after"]["perplexity"]:.2f}' if k in r["eval"] else "—"
         for k in ["wiki-head300k.txt", "c4-head300k.txt"]]
    print(f"| {n} | {v[0]} | {v[1]} | {r['timing']['compress_seconds']:.1f} |")
PY
