#!/usr/bin/env bash
# Reproduces the RTN / GPTQ table of BENCHMARKS.md: ref-llama-9m, calibration as the peer table
# (../shared/golden/peer/README.md): the first 128 documents of c4_calib.jsonl, each cut to 512
# tokens (`sampling: documents`); perplexity on wikitext2 / ptb / c4_eval at seq 512.
# Usage (repository root, ../shared beside it): pipelines/bench/quant-table.sh [OUT_DIR]
set -euo pipefail
out=${1:-out/bench}
mkdir -p "$out"
bin=target/release/compress
cargo build --release --quiet
S=../shared
eval_block="eval: {datasets: [$S/data/eval/wikitext2/wiki.test.raw, $S/data/eval/ptb/ptb.test.txt, $S/data/eval/c4/c4_eval.jsonl], seq_len: 512, baseline: false}"
calib="calibration: {path: $S/data/calib/c4_calib.jsonl, sampling: documents, samples: 128, seq_len: 512}"
run() { # name pass
  cat > "$out/$1.yaml" <<YAML
model: $S/models/ref-llama-9m
output: $out/$1
$calib
passes:
  - $2
export: {format: compressed-tensors}
$eval_block
YAML
  /usr/bin/time -f "%e s wall, %M KB max RSS" -o "$out/$1.time" $bin "$out/$1.yaml" --overwrite --quiet
  echo "$1: $(cat "$out/$1.time")"
}
# dense baseline: identity pipeline evaluated
cat > "$out/dense.yaml" <<YAML
model: $S/models/ref-llama-9m
output: $out/dense
passes: []
$eval_block
YAML
/usr/bin/time -f "%e s wall, %M KB max RSS" -o "$out/dense.time" $bin "$out/dense.yaml" --overwrite --quiet
run rtn-w4g128  "rtn: {bits: 4, group_size: 128}"
run gptq-w4g128 "gptq: {bits: 4, group_size: 128}"
run rtn-w3g128  "rtn: {bits: 3, group_size: 128}"
run gptq-w3g128 "gptq: {bits: 3, group_size: 128}"
run rtn-w4ch    "rtn: {bits: 4, strategy: channel}"
run gptq-w4ch   "gptq: {bits: 4, strategy: channel}"
python3 - "$out" <<'PY'
import json, sys, os
out = sys.argv[1]
print("| recipe | wikitext2 | ptb | c4_eval | mean | compress s | total wall s | peak RSS MiB |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for n in ["dense", "rtn-w4g128", "gptq-w4g128", "rtn-w3g128", "gptq-w3g128", "rtn-w4ch", "gptq-w4ch"]:
    r = json.load(open(os.path.join(out, n, "report.json")))
    p = [r["eval"][k]["after"]["perplexity"] for k in ["wiki.test.raw", "ptb.test.txt", "c4_eval.jsonl"]]
    t = open(os.path.join(out, n + ".time")).read().split()
    print(f"| {n} | {p[0]:.2f} | {p[1]:.2f} | {p[2]:.2f} | {sum(p)/3:.2f} | {r['timing']['compress_seconds']:.1f} | {float(t[0]):.0f} | {int(t[3])/1024:.0f} |")
PY
