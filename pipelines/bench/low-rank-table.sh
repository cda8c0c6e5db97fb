#!/usr/bin/env bash
# Low rank (issue #19): SVD and SVD-LLM (uniform and by_loss) at 20/40/60% of the decoder
# linears' parameters removed, GPTQ W3 with and without EoRA compensation adapters of rank
# 16/32/64. Perplexity on wikitext2 / ptb / c4_eval, bytes, time of each pass.
#   ref:  ../shared/models/ref-llama-9m, calibration 128 × 512 random c4 windows (as
#         pipelines/svd-llm-20.yaml), full test sets, GPTQ W3 g128.
#   real: models-real/smollm2-135m-instruct (scripts/get-real-model.sh), calibration the first
#         128 c4 documents (as pipelines/bench/real-table.sh), the first 100,000 bytes of each
#         test set (≈ 25k tokens, 48 windows of 512: one evaluation of this model takes ~2.5
#         min on 2 cores instead of ~7 with 300,000), GPTQ W3 g64 (576 inputs are not a
#         multiple of 128).
# Usage (repository root, ../shared beside it):
#   pipelines/bench/low-rank-table.sh ref|real [OUT_DIR] [RECIPE…]
# BIN=path/to/compress to use a prebuilt binary. Runs already finished (report.json present)
# are skipped, so the script can be re-run to complete a table; it prints the table at the end.
set -euo pipefail
which=${1:?ref or real}
out=${2:-out/low-rank-$which}
shift; shift || true
mkdir -p "$out"
bin=${BIN:-target/release/compress}
S=../shared
. "$(dirname "$0")/lib.sh"
[ -n "${BIN:-}" ] || cargo build --release --quiet
if [ "$which" = ref ]; then
  model=$S/models/ref-llama-9m
  calib="calibration: {path: $S/data/calib/c4_calib.jsonl, field: text, samples: 128, seq_len: 512, seed: 0}"
  sets="[$S/data/eval/wikitext2/wiki.test.raw, $S/data/eval/ptb/ptb.test.txt, $S/data/eval/c4/c4_eval.jsonl]"
  g=128
else
  model=models-real/smollm2-135m-instruct
  [ -f "$model/model.safetensors" ] || scripts/get-real-model.sh
  calib="calibration: {path: $S/data/calib/c4_calib.jsonl, sampling: documents, samples: 128, seq_len: 512}"
  cut_heads "$out" "$S" 100
  sets="[$out/wiki-head100k.txt, $out/ptb-head100k.txt, $out/c4-head100k.txt]"
  g=64
fi
T='targets: ["re:.*_proj$"]'
recipes=("dense|")
for p in 20 40 60; do
  recipes+=("svd-$p|svd: {ratio: 0.$p, $T}")
  recipes+=("svd-llm-$p|svd_llm: {ratio: 0.$p, $T}")
  recipes+=("svd-llm-by-loss-$p|svd_llm: {ratio: 0.$p, allocation: by_loss, $T}")
done
recipes+=("gptq-w3|gptq: {bits: 3, group_size: $g, $T}")
for r in 16 32 64; do
  recipes+=("gptq-w3-eora-$r|gptq: {bits: 3, group_size: $g, $T}\n  - eora: {rank: $r, $T}")
done
run_recipes "$@"
python3 - "$out" <<'PY'
import json, sys, os, glob
out = sys.argv[1]
print("| recipe | wikitext2 | ptb | c4_eval | linear bytes | calib s | pass s (per pass) | compress s | wall / user+sys s |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for y in sorted(glob.glob(f"{out}/*.yaml"), key=os.path.getmtime):
    n = os.path.basename(y)[:-5]
    p = os.path.join(out, n, "report.json")
    if not os.path.exists(p):
        continue
    r = json.load(open(p))
    ev = r["eval"]
    order = sorted(ev, key=lambda k: 0 if "wiki" in k else 1 if "ptb" in k else 2)
    ppl = [ev[k]["after"]["perplexity"] for k in order]
    per = {}
    for rec in r.get("layers", []):
        per[rec["pass"]] = per.get(rec["pass"], 0.0) + rec["seconds"]
    t = r.get("timing", {})
    tm = open(f"{out}/{n}.time").read().split(",") if os.path.exists(f"{out}/{n}.time") else []
    wall = tm[0].split()[0] if tm else ""
    cpu = f"{float(tm[1].split()[0]) + float(tm[2].split()[0]):.0f}" if len(tm) > 2 else ""
    lb = r.get("output", {}).get("linear_bytes", "")
    print(f"| {n} | " + " | ".join(f"{v:.2f}" for v in ppl)
          + f" | {lb:,} | {t.get('calibration_seconds', 0):.1f} | "
          + ", ".join(f"{k} {v:.1f}" for k, v in per.items())
          + f" | {t.get('compress_seconds', 0):.1f} | {wall} / {cpu} |" if lb != "" else "")
PY
