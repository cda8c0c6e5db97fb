#!/usr/bin/env python3
"""Compare two GGUF files tensor by tensor with gguf-py: same names, ggml types, shapes and bytes?
Used to check our GGUF export against llama.cpp's own `llama-quantize` of the same weights
(BENCHMARKS.md, "GGUF"). Usage: scripts/compare-gguf.py OURS.gguf THEIRS.gguf"""
import sys
import numpy as np
from gguf import GGUFReader

a, b = GGUFReader(sys.argv[1]), GGUFReader(sys.argv[2])
ta = {t.name: t for t in a.tensors}
tb = {t.name: t for t in b.tensors}
if set(ta) != set(tb):
    print("names differ:", sorted(set(ta) ^ set(tb)))
same = diff = 0
for n in sorted(ta):
    x, y = ta[n], tb.get(n)
    if y is None:
        continue
    if x.tensor_type != y.tensor_type or list(x.shape) != list(y.shape):
        print(f"{n}: ours {x.tensor_type.name} {list(x.shape)}, theirs {y.tensor_type.name} {list(y.shape)}")
        diff += 1
        continue
    xb, yb = np.asarray(x.data).view(np.uint8).ravel(), np.asarray(y.data).view(np.uint8).ravel()
    if np.array_equal(xb, yb):
        same += 1
    else:
        n_bytes = int((xb != yb).sum())
        print(f"{n}: {x.tensor_type.name}: {n_bytes} of {xb.size} bytes differ")
        diff += 1
print(f"{same} tensors identical, {diff} differ, of {len(ta)}")
sys.exit(0 if diff == 0 else 1)
