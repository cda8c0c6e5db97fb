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
# the four ggml.c functions ggml-quants.c refers to outside the _ref paths
cat > "$tmp/stubs.c" <<'C'
#include <stdio.h>
#include <stdlib.h>
#include <stddef.h>
void ggml_abort(const char *file, int line, const char *fmt, ...) { fprintf(stderr, "ggml_abort %s:%d\n", file, line); abort(); }
size_t ggml_row_size(int type, long long ne) { (void)type; (void)ne; abort(); }
const char *ggml_type_name(int type) { (void)type; return "?"; }
size_t ggml_type_size(int type) { (void)type; abort(); }
C
gcc -O2 -fPIC -shared -ffp-contract=off -std=gnu11 -I "$src/ggml/include" -I "$src/ggml/src" \
    "$src/ggml/src/ggml-quants.c" "$tmp/stubs.c" -o "$out" -lm
echo "built $out"
