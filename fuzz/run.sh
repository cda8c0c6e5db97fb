#!/usr/bin/env bash
# Seed each fuzz target's corpus from real inputs (the reference model in ../shared and the
# example pipelines), then run every target for SECONDS (default 300) with cargo fuzz.
# Needs cargo-fuzz (`cargo install cargo-fuzz`) and a nightly toolchain (or RUSTC_BOOTSTRAP=1).
# Crashes land in fuzz/artifacts/TARGET/; corpora in fuzz/corpus/ (both git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-300}
SHARED=${SHARED:-../shared}
TOOLCHAIN=${TOOLCHAIN:-+nightly}
mkdir -p fuzz/corpus/{safetensors_header,safetensors_index,config_json,pipeline_yaml}
m="$SHARED/models/ref-llama-9m"
python3 - "$m/model.safetensors" fuzz/corpus/safetensors_header <<'PY'
import struct, sys
src, out = sys.argv[1], sys.argv[2]
b = open(src, "rb").read()
n = struct.unpack("<Q", b[:8])[0]
open(out + "/ref-header", "wb").write(b)          # the whole small file
open(out + "/ref-header-only", "wb").write(b[:8 + n])
PY
cp "$m/config.json" fuzz/corpus/config_json/ref-llama
for f in "$SHARED"/models/*/config.json; do cp "$f" "fuzz/corpus/config_json/$(basename "$(dirname "$f")")"; done
printf '{"metadata":{"total_size":8},"weight_map":{"a.weight":"model-00001-of-00002.safetensors","b.weight":"model-00002-of-00002.safetensors"}}' \
  > fuzz/corpus/safetensors_index/two-shards
cp pipelines/*.yaml fuzz/corpus/pipeline_yaml/
for t in safetensors_header safetensors_index config_json pipeline_yaml; do
  echo "== $t: ${SECS}s"
  cargo $TOOLCHAIN fuzz run "$t" "fuzz/corpus/$t" -- -max_total_time="$SECS" -rss_limit_mb=2048 -max_len=1048576 2>&1 \
    | grep -E "^(#[0-9]+ +DONE|Done|INFO: -max_total_time|==[0-9]+==ERROR|SUMMARY|thread)" || true
  test -z "$(ls -A "fuzz/artifacts/$t" 2>/dev/null)" || { echo "CRASH in $t: fuzz/artifacts/$t"; exit 1; }
done
