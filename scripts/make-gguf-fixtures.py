#!/usr/bin/env python3
"""Fixtures for the ggml block codecs (tests/formats/ggml_codecs.rs), made by the `gguf` Python package
(gguf-py, llama.cpp's own Python library; `pip install gguf numpy`).

For every type the package encodes (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, F16, BF16):
  <type>.in.f32   random non-zero inputs (little-endian f32), rows of 256
  <type>.q        gguf.quants.quantize(inputs)          -> our encoder must give these bytes
  <type>.dq.f32   gguf.quants.dequantize(<type>.q)      -> our decoder must give these floats
For the k-quants (Q4_K, Q5_K, Q6_K) the package only decodes, so:
  <type>.q        random blocks with finite f16 super-block scales
  <type>.dq.f32   gguf.quants.dequantize(<type>.q)
and, when a C reference is given with --kquant-ref (scripts/make-kquant-ref.sh builds one from
llama.cpp's ggml-quants.c), also <type>.in.f32 / <type>.q from quantize_row_<type>_ref, and for
the importance-weighted encoders (llama-quantize --imatrix) of Q4_0, Q4_1, Q5_0, Q5_1, Q4_K,
Q5_K, Q6_K: <type>.imat.in.f32, <type>.imat.qw.f32 (one weight per column) and <type>.imat.q
from quantize_<type>(x, y, rows, 256, qw).

Usage: scripts/make-gguf-fixtures.py tests/fixtures/gguf [--kquant-ref libkref.so]
"""
import argparse
import ctypes
import importlib.metadata
import os
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.quants import quantize, dequantize

ROWS, COLS = 6, 256


def inputs(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    # heavier tails in some rows, a constant-magnitude row, and tiny values
    x[1] *= rng.exponential(1.0, COLS).astype(np.float32)
    x[2] = np.abs(x[2]) + 0.5          # all positive (min > 0 paths)
    x[3] = -np.abs(x[3]) - 0.25        # all negative
    x[4] *= np.float32(1e-3)
    x[5, ::7] *= 20                    # outliers
    x[x == 0] = np.float32(1e-4)
    return x


def write(path, arr):
    with open(path, "wb") as f:
        f.write(np.ascontiguousarray(arr).tobytes())


def random_kblocks(qtype, seed):
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    nb = ROWS * COLS // block
    b = rng.integers(0, 256, size=(nb, size), dtype=np.uint8)
    # finite f16 scales in a realistic range at the positions the layout keeps them
    def f16(n):
        return (rng.uniform(1e-4, 0.05, n) * rng.choice([-1, 1], n)).astype(np.float16).view(np.uint8).reshape(n, 2)
    if qtype in (T.Q4_K, T.Q5_K):
        b[:, 0:2] = f16(nb)
        b[:, 2:4] = np.abs(f16(nb).view(np.float16)).view(np.uint8)
    elif qtype == T.Q6_K:
        b[:, size - 2:size] = f16(nb)
    return b


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--kquant-ref")
    ap.add_argument("--ref-source", default="", help="where the C reference came from, for VERSION")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    encoded = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.F16, T.BF16]
    for i, t in enumerate(encoded):
        x = inputs(100 + i)
        q = quantize(x, t)
        dq = dequantize(q, t).astype(np.float32)
        name = t.name.lower()
        write(f"{a.out}/{name}.in.f32", x)
        write(f"{a.out}/{name}.q", q)
        write(f"{a.out}/{name}.dq.f32", dq)
    lib = ctypes.CDLL(a.kquant_ref) if a.kquant_ref else None
    for i, t in enumerate([T.Q4_K, T.Q5_K, T.Q6_K]):
        name = t.name.lower()
        block, size = gguf.GGML_QUANT_SIZES[t]
        if lib is not None:
            x = inputs(200 + i)
            q = np.zeros((ROWS * COLS // block, size), dtype=np.uint8)
            fn = getattr(lib, f"quantize_row_{t.name.lower()[:2]}_K_ref")
            fn(x.ctypes.data_as(ctypes.c_void_p), q.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(x.size))
            write(f"{a.out}/{name}.in.f32", x)
            write(f"{a.out}/{name}.q", q)
            write(f"{a.out}/{name}.dq.f32", dequantize(q.reshape(ROWS, -1), t).astype(np.float32))
        # decoding of arbitrary blocks (every bit pattern of the levels and 6-bit scales)
        qr = random_kblocks(t, 300 + i)
        write(f"{a.out}/{name}.rand.q", qr)
        write(f"{a.out}/{name}.rand.dq.f32", dequantize(qr.reshape(ROWS, -1), t).astype(np.float32))
    if lib is not None:
        for i, t in enumerate([T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K]):
            name = t.name.lower()
            block, size = gguf.GGML_QUANT_SIZES[t]
            x = inputs(400 + i)
            rng = np.random.default_rng(500 + i)
            qw = np.exp(rng.standard_normal(COLS)).astype(np.float32)
            q = np.zeros((ROWS * COLS // block, size), dtype=np.uint8)
            fn = getattr(lib, f"quantize_{name.replace('_k', '_K')}")
            fn.restype = ctypes.c_size_t
            fn(x.ctypes.data_as(ctypes.c_void_p), q.ctypes.data_as(ctypes.c_void_p),
               ctypes.c_int64(ROWS), ctypes.c_int64(COLS), qw.ctypes.data_as(ctypes.c_void_p))
            write(f"{a.out}/{name}.imat.in.f32", x)
            write(f"{a.out}/{name}.imat.qw.f32", qw)
            write(f"{a.out}/{name}.imat.q", q)
    with open(f"{a.out}/VERSION", "w") as f:
        f.write(f"gguf {importlib.metadata.version('gguf')} numpy {np.__version__}\n")
        f.write(f"k-quant encodings from: {'quantize_row_*_ref of llama.cpp ggml-quants.c (' + os.path.basename(a.kquant_ref) + ') ' + a.ref_source if lib else 'none'}\n")


if __name__ == "__main__":
    sys.exit(main())
