#!/usr/bin/env bash
# Reproduces the reference-model tables of BENCHMARKS.md: ref-llama-9m, calibration as the peer
# table (../shared/golden/peer/README.md): the first 128 documents of c4_calib.jsonl, each cut
# to 512 tokens (`sampling: documents`); perplexity on wikitext2 / ptb / c4_eval at seq 512.
# Usage (repository root, ../shared beside it): pipelines/bench/quant-table.sh [quant|prune] [OUT_DIR]
set -euo pipefail
set_name=${1:-quant}
out=${2:-out/bench}
mkdir -p "$out"
bin=target/release/compress
cargo build --release --quiet
S=../shared
eval_block="eval: {datasets: [$S/data/eval/wikitext2/wiki.test.raw, $S/data/eval/ptb/ptb.test.txt, $S/data/eval/c4/c4_eval.jsonl], seq_len: 512, baseline: false}"
calib="calibration: {path: $S/data/calib/c4_calib.jsonl, sampling: documents, samples: 128, seq_len: 512}"
run() { # name pass [pass …]
  local name=$1; shift
  { echo "model: $S/models/ref-llama-9m"; echo "output: $out/$name"; echo "$calib"; echo "passes:"
    for p in "$@"; do echo "  - $p"; done; } > "$out/$name.yaml"
  cat >> "$out/$name.yaml" <<YAML
export: {format: compressed-tensors}
$eval_block
YAML
  /usr/bin/time -f "%e s wall, %M KB max RSS" -o "$out/$name.time" $bin "$out/$name.yaml" --overwrite --quiet
  echo "$name: $(cat "$out/$name.time")"
}
# dense baseline: identity pipeline evaluated
cat > "$out/dense.yaml" <<YAML
model: $S/models/ref-llama-9m
output: $out/dense
passes: []
$eval_block
YAML
/usr/bin/time -f "%e s wall, %M KB max RSS" -o "$out/dense.time" $bin "$out/dense.yaml" --overwrite --quiet
if [ "$set_name" = quant ]; then
  rows="dense rtn-w4g128 gptq-w4g128 rtn-w3g128 gptq-w3g128 rtn-w4ch gptq-w4ch"
  run rtn-w4g128  "rtn: {bits: 4, group_size: 128}"
  run gptq-w4g128 "gptq: {bits: 4, group_size: 128}"
  run rtn-w3g128  "rtn: {bits: 3, group_size: 128}"
  run gptq-w3g128 "gptq: {bits: 3, group_size: 128}"
  run rtn-w4ch    "rtn: {bits: 4, strategy: channel}"
  run gptq-w4ch   "gptq: {bits: 4, strategy: channel}"
else
  # pruning at 50% of every decoder linear, as the peer table
  rows="dense magnitude-50 wanda-50 sparsegpt-50 sparsegpt-24 sparsegpt-24-gptq-w4g128"
  run magnitude-50 "magnitude: {sparsity: 0.5}"
  run wanda-50     "wanda: {sparsity: 0.5}"
  run sparsegpt-50 "sparsegpt: {sparsity: 0.5}"
  run sparsegpt-24 "sparsegpt: {pattern: '2:4'}"
  run sparsegpt-24-gptq-w4g128 "sparsegpt: {pattern: '2:4'}" "gptq: {bits: 4, group_size: 128}"
fi
python3 - "$out" $rows <<'PY'
import json, sys, os
out = sys.argv[1]
print("| recipe | wikitext2 | ptb | c4_eval | mean | compress s | total wall s | peak RSS MiB |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for n in sys.argv[2:]:
    r = json.load(open(os.path.join(out, n, "report.json")))
    p = [r["eval"][k]["after"]["perplexity"] for k in ["wiki.test.raw", "ptb.test.txt", "c4_eval.jsonl"]]
    t = open(os.path.join(out, n + ".time")).read().split()
    print(f"| {n} | {p[0]:.2f} | {p[1]:.2f} | {p[2]:.2f} | {sum(p)/3:.2f} | {r['timing']['compress_seconds']:.1f} | {float(t[0]):.0f} | {int(t[3])/1024:.0f} |")
PY
