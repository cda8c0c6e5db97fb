#!/usr/bin/env bash
# OWL (allocation: owl, passes/owl.rs; M = 5, λ = 0.08) against uniform sparsity with Wanda on
# the reference model, calibration and evaluation as pipelines/bench/quant-table.sh (the first
# 128 documents of c4_calib.jsonl cut to 512 tokens; wikitext2 / ptb / c4_eval at seq 512).
# Usage (repository root, ../shared beside it): pipelines/bench/owl-table.sh [OUT_DIR]
set -euo pipefail
out=${1:-out/owl}
mkdir -p "$out"
bin=${BIN:-target/release/compress}
[ -n "${BIN:-}" ] || cargo build --release --quiet
S=../shared
run() { # name pass
  [ -f "$out/$1/report.json" ] && { echo "$1: done"; return; }
  cat > "$out/$1.yaml" <<YAML
model: $S/models/ref-llama-9m
output: $out/$1
calibration: {path: $S/data/calib/c4_calib.jsonl, sampling: documents, samples: 128, seq_len: 512}
passes:
  - $2
export: {format: dense}
eval: {datasets: [$S/data/eval/wikitext2/wiki.test.raw, $S/data/eval/ptb/ptb.test.txt, $S/data/eval/c4/c4_eval.jsonl], seq_len: 512, baseline: false}
YAML
  /usr/bin/time -f "%e s wall, %U s user, %M KB max RSS" -o "$out/$1.time" $bin "$out/$1.yaml" --overwrite --quiet
  echo "$1: $(cat "$out/$1.time")"
}
run wanda-70 "wanda: {sparsity: 0.7}"
run wanda-70-owl "wanda: {sparsity: 0.7, allocation: owl}"
run wanda-50-owl "wanda: {sparsity: 0.5, allocation: owl}"
run sparsegpt-70 "sparsegpt: {sparsity: 0.7}"
run sparsegpt-70-owl "sparsegpt: {sparsity: 0.7, allocation: owl}"
python3 - "$out" <<'PY'
import json, sys, os
out = sys.argv[1]
print("| recipe | wikitext2 | ptb | c4_eval | layer sparsities | compress s |")
print("|---|---:|---:|---:|---|---:|")
for n in ["wanda-70", "wanda-70-owl", "wanda-50-owl", "sparsegpt-70", "sparsegpt-70-owl"]:
    p = os.path.join(out, n, "report.json")
    if not os.path.exists(p):
        continue
    r = json.load(open(p))
    v = [r["eval"][k]["after"]["perplexity"] for k in ["wiki.test.raw", "ptb.test.txt", "c4_eval.jsonl"]]
    per = {}
    for rec in r["layers"]:
        per.setdefault(rec["layer"], rec["notes"].get("allocated_sparsity", rec["notes"].get("sparsity")))
    s = " ".join(f"{per[k]:.3f}" for k in sorted(per))
    print(f"| {n} | {v[0]:.2f} | {v[1]:.2f} | {v[2]:.2f} | {s} | {r['timing']['compress_seconds']:.1f} |")
PY
