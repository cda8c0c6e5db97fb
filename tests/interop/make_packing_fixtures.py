#!/usr/bin/env python3
"""Byte-level packing fixtures made with the reference packers themselves.

Writes into tests/fixtures/packing/ (or --out DIR):

* ct_pack_to_int32.safetensors: compressed-tensors `pack_to_int32` on signed int8 codes,
  every width 1..8, packed along dim 1 (`weight_packed`) and dim 0 (zero points), shapes whose
  packed dimension is not a multiple of 32 (tails of the last word must be zero-padded).
* ct_compressor.safetensors: compressed-tensors `PackedQuantizationCompressor.compress` on
  whole linears (group / channel / tensor strategies, sym and asym): weight_packed,
  weight_zero_point, weight_shape as the loader reads them, with the codes, scales and zero
  points they came from.
* gptq_v1.safetensors: GPTQModel's own packer (`TorchLinear.pack_original`, cross-checked
  against `pack_block`), followed by its v2 -> v1 qzeros conversion
  (`convert_gptq_v2_to_v1_format_module`) exactly as GPTQModel's quantize-and-save path runs
  them, for 2, 3, 4 and 8 bits: qweight, qzeros (v1) and the codes and zero points they came
  from.

Needs torch, safetensors, compressed-tensors and gptqmodel importable (see README.md in the
fixture folder for the venv recipe). Deterministic: the same versions give the same bytes.

Usage: python tests/interop/make_packing_fixtures.py [--out DIR] [--check]
  --check  regenerate into a temp dir and compare with DIR byte for byte (exit 1 on a difference)
"""

import argparse
import filecmp
import importlib.metadata as md
import json
import os
import sys
import tempfile

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.normpath(os.path.join(HERE, "..", "fixtures", "packing"))

# [rows, cols] of the code matrices; the packed dimension is rarely a multiple of 32.
CT_SHAPES = [(3, 70), (4, 576), (5, 33), (1, 1), (6, 7), (2, 96)]


def versions():
    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "safetensors", "compressed-tensors", "gptqmodel", "transformers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def signed_codes(gen, bits, shape):
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    c = torch.randint(lo, hi + 1, shape, generator=gen, dtype=torch.int64)
    # make sure both extremes occur (all-ones / all-zeros bit patterns)
    flat = c.view(-1)
    flat[0] = lo
    if flat.numel() > 1:
        flat[-1] = hi
    return c.to(torch.int8)


def ct_pack_fixtures():
    from compressed_tensors.compressors.pack_quantized.helpers import (
        pack_to_int32,
        unpack_from_int32,
    )

    gen = torch.Generator().manual_seed(20240601)
    t = {}
    for bits in range(1, 9):
        for dim in (1, 0):
            for r, c in CT_SHAPES:
                codes = signed_codes(gen, bits, (r, c))
                packed = pack_to_int32(codes, bits, packed_dim=dim)
                assert packed.dtype == torch.int32
                n = (c if dim == 1 else r) * bits
                want = (r, -(-n // 32)) if dim == 1 else (-(-n // 32), c)
                assert tuple(packed.shape) == want, (bits, dim, r, c, packed.shape)
                back = unpack_from_int32(packed, bits, torch.Size((r, c)), packed_dim=dim)
                assert torch.equal(back, codes), (bits, dim, r, c)
                key = f"b{bits}.d{dim}.{r}x{c}"
                t[f"{key}.codes"] = codes.contiguous()
                t[f"{key}.packed"] = packed.contiguous()
    return t


def exact_weight(codes, scale, zero, group_cols):
    """Float weight that quantizes back to `codes` exactly: (q - z) * s with s a power of 2."""
    s = scale.to(torch.float32).repeat_interleave(group_cols, dim=1)
    z = zero.to(torch.float32).repeat_interleave(group_cols, dim=1)
    return (codes.to(torch.float32) - z) * s


def ct_compressor_fixtures():
    from compressed_tensors.compressors.pack_quantized.base import (
        PackedQuantizationCompressor,
    )
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    gen = torch.Generator().manual_seed(777)
    cases = [
        # name, bits, sym, strategy, group_size, out, in
        ("g3a", 3, False, "group", 32, 5, 96),
        ("g2a", 2, False, "group", 16, 33, 64),
        ("g4s", 4, True, "group", 32, 7, 64),
        ("g5a", 5, False, "group", 32, 3, 96),
        ("g6a", 6, False, "group", 32, 11, 64),
        ("g7a", 7, False, "group", 32, 9, 64),
        ("g8a", 8, False, "group", 32, 4, 64),
        ("c4a", 4, False, "channel", None, 7, 70),
        ("c3s", 3, True, "channel", None, 6, 45),
        ("t8a", 8, False, "tensor", None, 4, 40),
    ]
    t = {}
    for name, bits, sym, strategy, gs, out, inn in cases:
        ng = inn // gs if strategy == "group" else 1
        codes = signed_codes(gen, bits, (out, inn))
        srows = 1 if strategy == "tensor" else out
        exps = torch.randint(-9, -3, (srows, ng), generator=gen)
        scale = torch.pow(2.0, exps.to(torch.float32)).to(torch.bfloat16)
        if sym:
            zero = torch.zeros((srows, ng), dtype=torch.int8)
        else:
            zero = signed_codes(gen, bits, (srows, ng))
        if strategy == "tensor":
            scale_full = scale.expand(out, 1)
            zero_full = zero.expand(out, 1)
            gcols = inn
        else:
            scale_full, zero_full = scale, zero
            gcols = inn // ng
        weight = exact_weight(codes, scale_full, zero_full, gcols).to(torch.bfloat16)
        args = QuantizationArgs(
            num_bits=bits,
            type="int",
            symmetric=sym,
            strategy=strategy,
            group_size=gs,
        )
        scheme = QuantizationScheme(targets=["Linear"], weights=args)
        sd = {"weight": weight, "weight_scale": scale.reshape(-1) if strategy == "tensor" else scale}
        if not sym:
            sd["weight_zero_point"] = zero.reshape(-1) if strategy == "tensor" else zero
        cd = PackedQuantizationCompressor.compress(sd, scheme)
        # the compressor must have quantized back to exactly our codes
        back = unpack_from_int32(cd["weight_packed"], bits, torch.Size((out, inn)))
        assert torch.equal(back, codes), name
        p = f"{name}"
        t[f"{p}.codes"] = codes.contiguous()
        t[f"{p}.zero"] = zero.contiguous()  # signed, [out, ng] (tensor: [1, 1]); zeros when sym
        t[f"{p}.weight_packed"] = cd["weight_packed"].contiguous()
        t[f"{p}.weight_shape"] = cd["weight_shape"].to(torch.int64).contiguous()
        # the scales we passed in, as stored: [out, ng] (channel [out, 1], tensor [1])
        t[f"{p}.weight_scale"] = cd["weight_scale"].contiguous()
        if "weight_zero_point" in cd:
            t[f"{p}.weight_zero_point"] = cd["weight_zero_point"].contiguous()
        # args as a tiny i64 tensor: [bits, sym, strategy (0 group, 1 channel, 2 tensor), group]
        sid = {"group": 0, "channel": 1, "tensor": 2}[strategy]
        t[f"{p}.args"] = torch.tensor([bits, int(sym), sid, gs or 0], dtype=torch.int64)
    return t


def gptq_fixtures():
    os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")
    import torch.nn as nn
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from gptqmodel.quantization import QuantizeConfig
    from gptqmodel.utils.model import convert_gptq_v2_to_v1_format_module

    gen = torch.Generator().manual_seed(4242)
    # out and in must be multiples of 32 for GPTQ packing (pack_block refuses otherwise)
    shapes = [
        # name, out, in, group_size (-1 = one group per row)
        ("g32", 64, 96, 32),
        ("ch", 32, 64, -1),
    ]
    t = {}
    for bits in (2, 3, 4, 8):
        maxq = (1 << bits) - 1
        for sname, out, inn, gs in shapes:
            ng = 1 if gs == -1 else inn // gs
            gcols = inn // ng
            uq = torch.randint(0, maxq + 1, (out, inn), generator=gen, dtype=torch.int64)
            uq.view(-1)[0] = 0
            uq.view(-1)[-1] = maxq
            exps = torch.randint(-9, -3, (out, ng), generator=gen)
            scale = torch.pow(2.0, exps.to(torch.float32))  # [out, ng]
            variants = {
                "sym": torch.full((out, ng), 1 << (bits - 1), dtype=torch.int64),
                # asym with zero points in 1..maxq: v1 stores zero-1 with no borrow
                "asym": torch.randint(1, maxq + 1, (out, ng), generator=gen, dtype=torch.int64),
            }
            # asym including zero point 0 (v1 cannot store it as a field; GPTQModel's
            # word-level v2->v1 subtraction borrows from the next field)
            z0 = torch.randint(0, maxq + 1, (out, ng), generator=gen, dtype=torch.int64)
            z0[0::5, :] = 0
            variants["asym0"] = z0
            g_idx = (torch.arange(inn) // gcols).to(torch.int32)
            key = f"b{bits}.{sname}"
            t[f"{key}.codes"] = (uq - (1 << (bits - 1))).to(torch.int8).contiguous()  # signed
            qweight_ref = None
            for vname, zeros in variants.items():
                w = exact_weight(uq, scale, zeros, gcols)
                lin = nn.Linear(inn, out, bias=False)
                with torch.no_grad():
                    lin.weight.copy_(w)
                packed = {}
                for impl in ("pack_original", "pack_block"):
                    m = TorchLinear(
                        bits=bits,
                        group_size=gs,
                        sym=(vname == "sym"),
                        desc_act=False,
                        in_features=inn,
                        out_features=out,
                        bias=False,
                        pack_dtype=torch.int32,
                    )
                    getattr(m, impl)(lin, scale.clone(), zeros.to(torch.float32).clone(), g_idx.clone())
                    qz_v2 = m.qzeros.clone()
                    convert_gptq_v2_to_v1_format_module(m, QuantizeConfig(bits=bits, offload_to_disk=False))
                    packed[impl] = (m.qweight.clone(), qz_v2, m.qzeros.clone(), m.scales.clone(), m.g_idx.clone())
                a, b = packed["pack_original"], packed["pack_block"]
                assert all(torch.equal(x, y) for x, y in zip(a, b)), (key, vname)
                qweight, qz_v2, qz_v1, scales16, gi = a
                assert qweight.dtype == torch.int32 and qz_v1.dtype == torch.int32
                assert tuple(qweight.shape) == (inn // 32 * bits, out)
                assert tuple(qz_v1.shape) == (ng, out // 32 * bits)
                if qweight_ref is None:
                    qweight_ref = qweight
                    t[f"{key}.qweight"] = qweight.contiguous()
                    t[f"{key}.scales"] = scales16.contiguous()  # F16 [ng, out], as GPTQModel stores them
                    t[f"{key}.g_idx"] = gi.to(torch.int32).contiguous()
                else:
                    assert torch.equal(qweight_ref, qweight)
                t[f"{key}.{vname}.zeros"] = zeros.T.contiguous().to(torch.int32)  # [ng, out], unsigned
                t[f"{key}.{vname}.qzeros"] = qz_v1.contiguous()  # v1 (checkpoint) layout
                t[f"{key}.{vname}.qzeros_v2"] = qz_v2.contiguous()  # raw zeros, GPTQModel internal
    return t


def write_all(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    info = dict(versions(), generator="tests/interop/make_packing_fixtures.py")
    # one key: safetensors writes metadata from a hash map, so several keys come out in
    # a different order on each run and the file would not be reproducible byte for byte
    meta = {"made_with": json.dumps(info, sort_keys=True)}
    files = {
        "ct_pack_to_int32.safetensors": ct_pack_fixtures,
        "ct_compressor.safetensors": ct_compressor_fixtures,
        "gptq_v1.safetensors": gptq_fixtures,
    }
    for fname, fn in files.items():
        tensors = {k: v.detach().clone().contiguous() for k, v in fn().items()}
        save_file(tensors, os.path.join(out_dir, fname), metadata=meta)
        print(f"{fname}: {len(tensors)} tensors, {os.path.getsize(os.path.join(out_dir, fname))} bytes")
    return list(files)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    if not a.check:
        write_all(a.out)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        names = write_all(tmp)
        bad = [n for n in names if not filecmp.cmp(os.path.join(tmp, n), os.path.join(a.out, n), shallow=False)]
    if bad:
        print("differ from the committed fixtures:", ", ".join(bad))
        return 1
    print("fixtures reproduce byte for byte")
    return 0


if __name__ == "__main__":
    sys.exit(main())
