#!/usr/bin/env bash
# The checks `cargo test --release` lists as ignored because they need something CI lacks:
# here the interop suite (our outputs loaded by transformers + compressed-tensors, logits
# compared with ours; tests/interop/README.md). It sets up the pinned reference environment
# once (a venv in ~/.cache/compress-ref-venv, reused when it imports) and runs the ignored
# tests with it; a failing cell fails the run.
#
#   scripts/test-with-references.sh            # interop matrix (about 3 minutes on 2 cores)
#   PY=/path/to/python scripts/test-with-references.sh   # use an existing interpreter
#
# The GPU checks (tests/cuda.rs, also ignored) run on a device machine:
# scripts/cuda-device-check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${COMPRESS_REF_VENV:-$HOME/.cache/compress-ref-venv}
PY=${PY:-$VENV/bin/python}
if ! "$PY" -c "import transformers, compressed_tensors" 2>/dev/null; then
  echo "setting up the reference Python in $VENV (pinned: torch 2.14.1 CPU, transformers 5.17.0, compressed-tensors 0.19.0)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --index-url https://download.pytorch.org/whl/cpu torch==2.14.1
  "$VENV/bin/pip" install --quiet transformers==5.17.0 compressed-tensors==0.19.0 \
    safetensors==0.8.0 numpy==2.4.6
  PY=$VENV/bin/python
fi
COMPRESS_REF_PYTHON=$PY cargo test --release --test formats interop:: -- --include-ignored --nocapture
