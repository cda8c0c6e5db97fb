#!/usr/bin/env python3
"""Check a `sparse_format: bitmask` export with compressed-tensors' own sparse-bitmask reader.

compressed-tensors dropped its sparse compressors after 0.10 (0.19 has none), so run this with
a 0.10.x package on the path, e.g.

    pip download compressed-tensors==0.10.2 --no-deps -d /tmp/ct && unzip -q -d /tmp/ct/pkg /tmp/ct/*.whl
    PYTHONPATH=/tmp/ct/pkg python scripts/bitmask-check.py DENSE_OUT BITMASK_OUT

DENSE_OUT and BITMASK_OUT are the same pipeline exported with `sparse_format: dense` (the
default) and `bitmask`. The script builds the library's ModelCompressor from BITMASK_OUT's
config.json (it must pick the BitmaskCompressor), decompresses every tensor of the folder with
it, and compares them with DENSE_OUT's tensors: same names, dtypes, shapes and values, exactly.
"""
import json
import sys

import compressed_tensors
import torch
from compressed_tensors.compressors import BitmaskCompressor, ModelCompressor
from safetensors.torch import load_file

dense_dir, bits_dir = sys.argv[1], sys.argv[2]
cfg = json.load(open(f"{bits_dir}/config.json"))
mc = ModelCompressor.from_compression_config(cfg["quantization_config"])
assert mc is not None and isinstance(mc.sparsity_compressor, BitmaskCompressor), mc
print(f"compressed-tensors {compressed_tensors.__version__}: "
      f"{type(mc.sparsity_compressor).__name__} from {bits_dir}/config.json "
      f"(sparsity_config: {json.dumps(cfg['quantization_config']['sparsity_config'])})")
want = load_file(f"{dense_dir}/model.safetensors")
got = dict(mc.sparsity_compressor.decompress(bits_dir))
assert set(got) == set(want), (sorted(set(got) ^ set(want)))[:10]
n_sparse = 0
for name, w in want.items():
    g = got[name]
    assert g.dtype == w.dtype and g.shape == w.shape, (name, g.dtype, w.dtype, g.shape, w.shape)
    assert torch.equal(g, w), name
    n_sparse += name.endswith("_proj.weight")
sizes = [sum(t.numel() * t.element_size() for t in load_file(f"{d}/model.safetensors").values())
         for d in (dense_dir, bits_dir)]
print(f"{len(want)} tensors equal ({n_sparse} decoder linears decompressed from sparse-bitmask); "
      f"tensor bytes dense {sizes[0]:,} vs bitmask {sizes[1]:,}")
