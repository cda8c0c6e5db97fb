#!/usr/bin/env bash
# The CUDA device check, in two halves.
#
#   scripts/cuda-device-check.sh prepare   # here: build, copy binaries + the reference data
#                                          # into .device/ (git-ignored: /.device/ in
#                                          # .git/info/exclude)
#   scripts/cuda-device-check.sh run       # on the GPU machine, with .device carried:
#                                          # tests/cuda.rs, then `bench gpu-gptq`; logs in $OUT
#
# The GPU machine has the driver and CUDA's libraries (pip `nvidia-*` wheels) but no Rust and
# no ../shared: the binaries are built here, and the test binary finds the data at the path
# baked in at build time (CARGO_MANIFEST_DIR/../shared), which `run` links to .device/shared.
set -u
cd "$(dirname "$0")/.."
case "${1:-}" in
prepare)
  set -e
  cargo build --release --features cuda --bin bench
  test_bin=$(cargo test --release --features cuda --test cuda --no-run --message-format=json 2>/dev/null \
    | grep -o '"executable":"[^"]*/deps/cuda-[^"]*"' | cut -d'"' -f4 | tail -1)
  mkdir -p .device/shared/models .device/shared/data/calib .device/shared/data/eval/ptb \
    .device/shared/golden/compressed_tensors
  cp -r ../shared/models/ref-llama-9m .device/shared/models/
  cp ../shared/data/calib/c4_calib.jsonl .device/shared/data/calib/
  cp ../shared/data/eval/ptb/ptb.test.txt .device/shared/data/eval/ptb/
  cp -r ../shared/golden/compressed_tensors/ref-llama-9m-rtn-w4g128 .device/shared/golden/compressed_tensors/
  cp "$test_bin" .device/cuda-test
  cp target/release/bench .device/bench
  strip .device/cuda-test .device/bench
  cp "$0" .device/run.sh
  echo "prepared: $(du -sh .device | cut -f1) in .device (shared root $(cd .. && pwd)/shared)"
  ;;
run)
  OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$OUT/env.txt"
  mkdir -p /tmp/cl
  for l in cuda nvrtc nvrtc-builtins cublas cublasLt cusolver cusparse nvJitLink; do
    f=$(ls /usr/local/cuda/lib64/lib$l.so* /usr/local/nvidia/lib64/lib$l.so* \
      /opt/torch/.venv/lib/python3.12/site-packages/nvidia/*/lib/lib$l.so* 2>/dev/null | grep -v alt | head -1)
    echo "lib$l -> $f" | tee -a "$OUT/env.txt"
    if [ -n "$f" ]; then ln -sf "$f" /tmp/cl/lib$l.so; export LD_LIBRARY_PATH=$(dirname "$f"):${LD_LIBRARY_PATH:-}; fi
  done
  export LD_LIBRARY_PATH=/tmp/cl:$LD_LIBRARY_PATH
  mkdir -p "${SHARED_ROOT:-/work}" && ln -sfn "$PWD/.device/shared" "${SHARED_ROOT:-/work}/shared"
  export COMPRESS_KERNEL_CACHE=/tmp/ptx RUST_BACKTRACE=1
  timeout "${T_TEST:-240}" .device/cuda-test --include-ignored --nocapture --test-threads=1 > "$OUT/test.log" 2>&1
  echo "test rc $?" | tee -a "$OUT/env.txt"; tail -40 "$OUT/test.log"
  [ -n "${SKIP_BENCH:-}" ] && exit 0
  timeout "${T_BENCH:-260}" .device/bench gpu-gptq --layers "${LAYERS:-32}" --json > "$OUT/bench.json" 2> "$OUT/bench.log"
  echo "bench rc $?" | tee -a "$OUT/env.txt"; cat "$OUT/bench.log"
  ;;
*) echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac
