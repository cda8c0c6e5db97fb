#!/usr/bin/env bash
# Check our GGUF files with llama.cpp itself (BENCHMARKS.md, "GGUF"): llama-quantize quantizes
# our lossless f32 GGUF of the same model to the same type (with and without an imatrix from
# llama-imatrix on the calibration text), scripts/compare-gguf.py compares tensor bytes with our
# file, and llama-perplexity scores every file on the same text.
#
# usage: scripts/llama-cpp-check.sh LLAMA_BUILD_DIR OUT_DIR F32.gguf TEXT CALIB_TEXT TYPE OURS.gguf [OURS_IMATRIX.gguf]
#   LLAMA_BUILD_DIR: a llama.cpp CMake build with llama-quantize, llama-imatrix, llama-perplexity
#   (see BENCHMARKS.md for how it was built from the llama-cpp-python sdist)
#   TYPE: llama-quantize's type name (Q4_0, Q4_K_M, …)
# needs a Python with the `gguf` package as $PY (default python3)
set -euo pipefail
bin=$1/bin; out=$2; f32=$3; text=$4; calib=$5; ty=$6; ours=$7; ours_im=${8:-}
PY=${PY:-python3}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
ppl() { "$bin/llama-perplexity" -m "$1" -f "$text" -c 512 -b 512 -t 2 2>&1 | grep -E "^Final estimate|estimated PPL" | tail -1; }
"$bin/llama-quantize" "$f32" "$out/llama-$ty.gguf" "$ty" 2 > "$out/quantize-$ty.log" 2>&1
echo "== ours vs llama-quantize $ty (no imatrix)"
"$PY" "$here/compare-gguf.py" "$ours" "$out/llama-$ty.gguf" | tail -5 || true
[ -f "$out/imatrix.gguf" ] || "$bin/llama-imatrix" -m "$f32" -f "$calib" -c 512 --chunks 128 -t 2 -o "$out/imatrix.gguf" > "$out/imatrix.log" 2>&1
"$bin/llama-quantize" --imatrix "$out/imatrix.gguf" "$f32" "$out/llama-$ty-imatrix.gguf" "$ty" 2 > "$out/quantize-$ty-imatrix.log" 2>&1
for f in "$f32" "$ours" ${ours_im:+"$ours_im"} "$out/llama-$ty.gguf" "$out/llama-$ty-imatrix.gguf"; do
  printf '%s\t%s bytes\t%s\n' "$f" "$(stat -c %s "$f")" "$(ppl "$f")"
done
