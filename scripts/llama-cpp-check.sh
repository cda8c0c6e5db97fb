#!/usr/bin/env bash
# Check our GGUF files with llama.cpp itself (BENCHMARKS.md, "GGUF"):
#  1. llama-quantize quantizes our lossless f32 GGUF of the same model to TYPE, with and without
#     an importance matrix from llama-imatrix on the calibration text; scripts/compare-gguf.py
#     compares its tensors byte for byte with the first of our files (our plain-rounding export);
#  2. every file (f32, ours, llama-quantize's two) is scored by llama-perplexity and by
#     `compress eval --protocol llama-perplexity` on the same text and chunks (n_ctx 512, BOS
#     first when the tokenizer adds one, second half of each chunk scored), and the two
#     perplexities are printed side by side with their relative difference — ours twice: with
#     f32 inputs (what our reports compute) and with `--llama-cpp-activations` (each matmul's
#     input converted to the weight type's vec_dot_type, as llama.cpp's CPU backend does).
#     Results of an earlier run in OUT_DIR are reused, file by position (REDO=1 re-runs them).
#
# usage: scripts/llama-cpp-check.sh LLAMA_BUILD_DIR OUT_DIR MODEL_DIR F32.gguf TEXT CALIB_TEXT TYPE OURS.gguf…
#   LLAMA_BUILD_DIR: a llama.cpp CMake build with llama-quantize, llama-imatrix, llama-perplexity
#     (BENCHMARKS.md says how it was built from the llama-cpp-python sdist)
#   MODEL_DIR: the Hugging Face checkpoint the files come from (config.json and tokenizer files,
#     copied beside llama-quantize's files so that `compress eval` reads them)
#   TYPE: llama-quantize's type name (Q4_0, Q4_K_M, …)
# env: PY (a Python with the `gguf` package, default python3), BIN (default target/release/compress)
set -euo pipefail
bin=$1/bin; out=$2; model=$3; f32=$4; text=$5; calib=$6; ty=$7
shift 7
PY=${PY:-python3}
BIN=${BIN:-target/release/compress}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"

# a folder `compress eval` reads: the GGUF as model.gguf beside the checkpoint's config/tokenizer
eval_dir() {
  local f=$1 d
  if [ "$(basename "$f")" = model.gguf ] && [ -f "$(dirname "$f")/config.json" ]; then
    echo "$(dirname "$f")"; return
  fi
  d=$out/eval-$(basename "$f" .gguf)
  mkdir -p "$d"
  for c in config.json tokenizer.json tokenizer_config.json special_tokens_map.json generation_config.json; do
    [ -f "$model/$c" ] && cp "$model/$c" "$d/"
  done
  ln -sf "$(realpath "$f")" "$d/model.gguf"
  echo "$d"
}
llama_ppl() {
  # a finished log of an earlier run of this script is reused (REDO=1 re-runs)
  if [ -n "${REDO:-}" ] || ! grep -q "Final estimate" "$2" 2>/dev/null; then
    "$bin/llama-perplexity" -m "$1" -f "$text" -c 512 -b 512 -t "$(nproc)" > "$2" 2>&1 || true
  fi
  grep -oE "Final estimate: PPL = [0-9.]+" "$2" | grep -oE "[0-9.]+$" || echo nan
}
our_ppl() {
  local f=$1 j=$2
  shift 2
  if [ -n "${REDO:-}" ] || ! grep -q perplexity "$j" 2>/dev/null; then
    "$BIN" eval --model "$(eval_dir "$f")" --data "$text" --seq-len 512 --protocol llama-perplexity \
      --json --quiet "$@" > "$j"
  fi
  "$PY" -c "import json,sys; r=json.load(open(sys.argv[1]))['results']; print(f\"{next(iter(r.values()))['perplexity']:.4f}\")" "$j"
}

"$bin/llama-quantize" "$f32" "$out/llama-$ty.gguf" "$ty" 2 > "$out/quantize-$ty.log" 2>&1
echo "== ours ($1) vs llama-quantize $ty (no imatrix)"
"$PY" "$here/compare-gguf.py" "$1" "$out/llama-$ty.gguf" | tail -5 || true
[ -f "$out/imatrix.gguf" ] || "$bin/llama-imatrix" -m "$f32" -f "$calib" -c 512 -t "$(nproc)" \
  -o "$out/imatrix.gguf" > "$out/imatrix.log" 2>&1
"$bin/llama-quantize" --imatrix "$out/imatrix.gguf" "$f32" "$out/llama-$ty-imatrix.gguf" "$ty" 2 \
  > "$out/quantize-$ty-imatrix.log" 2>&1

# ours twice: f32 inputs (our reports), and with llama.cpp's CPU conversion of each matmul's
# input to the weight type's vec_dot_type (`--llama-cpp-activations`)
printf '| file | bytes | llama-perplexity | compress eval --protocol llama-perplexity | difference | same, --llama-cpp-activations | difference |\n|---|---:|---:|---:|---:|---:|---:|\n'
i=0
for f in "$f32" "$@" "$out/llama-$ty.gguf" "$out/llama-$ty-imatrix.gguf"; do
  i=$((i + 1))
  a=$(llama_ppl "$f" "$out/llama-ppl-$i.log")
  b=$(our_ppl "$f" "$out/ours-ppl-$i.json")
  c=$(our_ppl "$f" "$out/ours-act-ppl-$i.json" --llama-cpp-activations)
  pct() { "$PY" -c "import sys; a,b=map(float,sys.argv[1:]); print(f'{100*(b-a)/a:+.3f}%')" "$1" "$2"; }
  printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$f" "$(stat -L -c %s "$f")" "$a" "$b" "$(pct "$a" "$b")" \
    "$c" "$(pct "$a" "$c")"
done
grep -hE "tokenizes to|calculating perplexity over" "$out/llama-ppl-1.log" | head -2 || true
