#!/bin/sh
# Build llama.cpp's reference block quantizers (ggml/src/ggml-quants.c: quantize_row_*_ref) as a
# small shared library for scripts/make-gguf-fixtures.py --kquant-ref. No fused multiply-add
# (-ffp-contract=off), as in our Rust port, so the fixtures are the C reference's exact bytes.
#
# usage: scripts/make-kquant-ref.sh LLAMA_CPP_SOURCE_DIR OUT.so
# The llama.cpp source comes with the llama-cpp-python sdist from PyPI:
#   pip download --no-binary llama-cpp-python --no-deps --no-build-isolation llama-cpp-python
#   (needs scikit-build-core and cmake in that Python); the tree is in vendor/llama.cpp.
set -eu
src=$1
out=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# the four ggml.c functions ggml-quants.c refers to; ggml_row_size / ggml_type_size for the
# types the imatrix entry points quantize_<type>(…, quant_weights) are called with
cat > "$tmp/stubs.c" <<'C'
#include <stdio.h>
#include <stdlib.h>
#include <stddef.h>
#include <stdint.h>
void ggml_abort(const char *file, int line, const char *fmt, ...) { fprintf(stderr, "ggml_abort %s:%d\n", file, line); abort(); }
static void sizes(int t, size_t *blck, size_t *bytes) {
    switch (t) {
        case 2:  *blck = 32;  *bytes = 18;  return; /* Q4_0 */
        case 3:  *blck = 32;  *bytes = 20;  return; /* Q4_1 */
        case 6:  *blck = 32;  *bytes = 22;  return; /* Q5_0 */
        case 7:  *blck = 32;  *bytes = 24;  return; /* Q5_1 */
        case 8:  *blck = 32;  *bytes = 34;  return; /* Q8_0 */
        case 12: *blck = 256; *bytes = 144; return; /* Q4_K */
        case 13: *blck = 256; *bytes = 176; return; /* Q5_K */
        case 14: *blck = 256; *bytes = 210; return; /* Q6_K */
    }
    abort();
}
size_t ggml_type_size(int type) { size_t b, s; sizes(type, &b, &s); return s; }
size_t ggml_row_size(int type, int64_t ne) { size_t b, s; sizes(type, &b, &s); return s * (size_t)ne / b; }
const char *ggml_type_name(int type) { (void)type; return "?"; }
C
gcc -O2 -fPIC -shared -ffp-contract=off -std=gnu11 -I "$src/ggml/include" -I "$src/ggml/src" \
    "$src/ggml/src/ggml-quants.c" "$tmp/stubs.c" -o "$out" -lm
echo "built $out"
