#!/usr/bin/env bash
# GGUF (issue #18): llama.cpp's rounding (our exporter = llama-quantize's reference encoders,
# byte for byte), the importance-weighted rounding (`imatrix` pass = llama-quantize --imatrix
# with our importance matrix) and GPTQ onto the same grids (`gptq_ggml`), at Q4_0 and Q4_K_M:
# file size and perplexity of the written GGUF (read back by `compress`).
#   ref:  ../shared/models/ref-llama-9m, calibration 128 × 512 random c4 windows (seed 0, as
#         pipelines/gguf-*.yaml), the whole wikitext2 test file.
#   real: models-real/smollm2-135m-instruct, calibration the first 128 c4 documents (as
#         real-table.sh), the first 300,000 bytes of wikitext2 and c4_eval.
# Usage (repository root, ../shared beside it): pipelines/bench/gguf-table.sh ref|real [OUT] [RECIPE…]
set -euo pipefail
which=${1:?ref or real}
out=${2:-out/gguf-$which}
shift; shift || true
mkdir -p "$out"
bin=${BIN:-target/release/compress}
S=../shared
. "$(dirname "$0")/lib.sh"
[ -n "${BIN:-}" ] || cargo build --release --quiet
if [ "$which" = ref ]; then
  model=$S/models/ref-llama-9m
  calib="calibration: {path: $S/data/calib/c4_calib.jsonl, field: text, samples: 128, seq_len: 512, seed: 0}"
  sets="[$S/data/eval/wikitext2/wiki.test.raw]"
else
  model=models-real/smollm2-135m-instruct
  [ -f "$model/model.safetensors" ] || scripts/get-real-model.sh
  calib="calibration: {path: $S/data/calib/c4_calib.jsonl, sampling: documents, samples: 128, seq_len: 512}"
  cut_heads "$out" "$S"
  sets="[$out/wiki-head300k.txt, $out/c4-head300k.txt]"
fi
for t in q4_0 q4_k_m; do
  for m in rtn imatrix gptq; do
    name=$t-$m
    [ -f "$out/$name/report.json" ] && { echo "$name: done"; continue; }
    if [ $# -gt 0 ] && [[ ! " $* " =~ " $name " ]]; then continue; fi
    case $m in
      rtn) head="passes: []" ;;
      imatrix) head="$calib"$'\n'"passes: [imatrix: {}]" ;;
      gptq) head="$calib"$'\n'"passes: [gptq_ggml: {}]" ;;
    esac
    printf 'model: %s\noutput: %s\n%s\nexport: {format: gguf, gguf_type: %s}\neval: {datasets: %s, seq_len: 512, baseline: false}\n' \
      "$model" "$out/$name" "$head" "$t" "$sets" > "$out/$name.yaml"
    /usr/bin/time -f "%e s wall, %U s user, %S s sys, %M KB max RSS" -o "$out/$name.time" \
      $bin "$out/$name.yaml" --overwrite --quiet || { echo "$name: FAILED"; continue; }
    echo "$name: $(cat "$out/$name.time")"
  done
done
python3 - "$out" <<'PY'
import json, sys, os
out = sys.argv[1]
print("| file | bytes | " + "perplexity | " * 1 + "pass s | compress s |")
for t in ["q4_0", "q4_k_m"]:
    for m in ["rtn", "imatrix", "gptq"]:
        p = os.path.join(out, f"{t}-{m}", "report.json")
        if not os.path.exists(p):
            continue
        r = json.load(open(p))
        size = os.path.getsize(os.path.join(out, f"{t}-{m}", "model.gguf"))
        ev = r["eval"]
        ppl = " / ".join(f"{ev[k]['after']['perplexity']:.2f}" for k in sorted(ev, key=lambda k: 0 if "wiki" in k else 1))
        per = sum(x["seconds"] for x in r.get("layers", []))
        print(f"| {t} {m} | {size:,} | {ppl} | {per:.1f} | {r['timing']['compress_seconds']:.1f} |")
PY
