#!/usr/bin/env bash
# Load written outputs the way a transformers (+ compressed-tensors) user does and compare the
# perplexity it computes with the one our report.json states, on the same text and windows.
# Each OUT_DIR is a `compress` output folder whose report evaluated DATA at seq 512.
# usage: scripts/load-check.sh PYTHON DATA OUT_DIR...
#   PYTHON: a venv with torch, transformers, compressed-tensors (../shared/tools/setup-reference-env.sh)
# Prints one Markdown row per folder: config kind, ours, transformers, relative difference, s.
set -euo pipefail
py=${1:?python of the reference venv}; data=${2:?data file}; shift 2
ref=$(cd "$(dirname "$0")/.." && pwd)/../shared/tools/ref_eval.py
echo "| output | config | ours | transformers | relative difference | transformers s |"
echo "|---|---|---:|---:|---:|---:|"
for d in "$@"; do
  res=$("$py" "$ref" "$d" --data "$data" --seq-len 512 2>/dev/null | tail -1) || { echo "| $d | LOAD FAILED | | | | |"; continue; }
  python3 - "$d" "$data" "$res" <<'PY'
import json, os, sys
d, data, res = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
key = os.path.basename(data)
ours = json.load(open(os.path.join(d, "report.json")))["eval"][key]["after"]["perplexity"]
theirs = res["results"][key]
theirs = theirs["ppl"] if isinstance(theirs, dict) else theirs
cfg = json.load(open(os.path.join(d, "config.json")))
q = cfg.get("quantization_config")
kind = []
if q:
    kind.append(q.get("format", "quantized"))
    if q.get("sparsity_config"):
        kind.append("sparsity_config " + str(q["sparsity_config"].get("format")))
elif cfg.get("sparsity_config"):
    kind.append("dense + sparsity_config")
else:
    kind.append("dense")
print(f"| {os.path.basename(d.rstrip('/'))} | {', '.join(kind)} | {ours:.4f} | {theirs:.4f} | "
      f"{abs(ours - theirs) / theirs:.1e} | {res['seconds']} |")
PY
done
