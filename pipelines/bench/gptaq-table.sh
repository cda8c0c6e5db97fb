#!/usr/bin/env bash
# W3 g128 GPTQ against teacher-targeted GPTQ (GPTAQ; α = 1 and the paper's 0.25) on the
# reference model: the calibration of pipelines/w3-gptq.yaml (128 random 512-token windows of
# c4_calib), perplexity at seq 512 on the full wikitext2 / ptb / c4_eval sets (DESIGN.md).
# Usage (repository root, ../shared beside it): pipelines/bench/gptaq-table.sh [OUT_DIR]
set -euo pipefail
out=${1:-out/gptaq}
mkdir -p "$out"
bin=${BIN:-target/release/compress}
[ -n "${BIN:-}" ] || cargo build --release --quiet
S=../shared
run() { # name extra-gptq-fields
  [ -f "$out/$1/report.json" ] && { echo "$1: done"; return; }
  cat > "$out/$1.yaml" <<YAML
model: $S/models/ref-llama-9m
output: $out/$1
calibration: {path: $S/data/calib/c4_calib.jsonl, field: text, samples: 128, seq_len: 512, seed: 0}
passes:
  - gptq: {bits: 3, group_size: 128, sym: true, damp: 0.01, targets: ["re:.*_proj$"], ignore: [lm_head]$2}
export: {format: gptq}
eval:
  datasets: [$S/data/eval/wikitext2/wiki.test.raw, $S/data/eval/ptb/ptb.test.txt, $S/data/eval/c4/c4_eval.jsonl]
  seq_len: 512
  baseline: false
YAML
  /usr/bin/time -f "%e s wall, %U s user, %M KB max RSS" -o "$out/$1.time" $bin "$out/$1.yaml" --overwrite --quiet
  echo "$1: $(cat "$out/$1.time")"
}
run gptq-w3g128 ""
run gptq-w3g128-teacher ", target: teacher"
run gptq-w3g128-teacher-a025 ", target: teacher, teacher_alpha: 0.25"
python3 - "$out" <<'PY'
import json, sys, os
out = sys.argv[1]
print("| recipe | wikitext2 | ptb | c4_eval | gptq pass s |")
print("|---|---:|---:|---:|---:|")
for n in ["gptq-w3g128", "gptq-w3g128-teacher", "gptq-w3g128-teacher-a025"]:
    p = os.path.join(out, n, "report.json")
    if not os.path.exists(p):
        continue
    r = json.load(open(p))
    v = [r["eval"][k]["after"]["perplexity"] for k in ["wiki.test.raw", "ptb.test.txt", "c4_eval.jsonl"]]
    print(f"| {n} | {v[0]:.2f} | {v[1]:.2f} | {v[2]:.2f} | {r['timing']['compress_seconds']:.1f} |")
PY
