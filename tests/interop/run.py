#!/usr/bin/env python3
"""Interop suite: what we write must load in the reference loaders and give our logits.

For each architecture fixture x each format/width we write, it runs our binary (an RTN pass,
default targets), loads the output with transformers (`AutoModelForCausalLM.from_pretrained`,
float32, eager attention; GPTQ v1 through transformers + optimum + GPTQModel's CPU kernel),
computes logits on the fixture's golden input_ids, runs `compress logits` on the same ids and
compares (max |ref - ours| / max |ref| <= --tol). It also checks, per cell:

* loading: no missing / unexpected / mismatched keys; GPTQ linears really are quantized
  modules (not dense nn.Linear rebuilt from nothing);
* `quantization_config`: the scheme asked for; `ignore` contains `lm_head` (tied and untied)
  and the linears a pipeline left dense; GPTQ's quantize_config.json equals config.json's block;
* config.json: transformers reads the same configuration from the output as from the source
  (rope scaling, head_dim, tie_word_embeddings, biases...), apart from `quantization_config`;
* tensors: tied checkpoints gain no `lm_head.weight`; untied ones keep it byte for byte, as
  they keep the embedding, the norms and the q/k/v biases (qwen2); every side file
  (generation_config.json, tokenizer files) is copied byte for byte, and the tokenizer and
  generation config load from the output as from the source.

Prints a Markdown matrix (also written to --report), exits 1 on any ✗. Cells whose loader is
not installed are marked "golden-only" (the byte fixtures of tests/formats/packing_fixtures.rs cover
them) and do not fail the run.

  python tests/interop/run.py --compress target/release/compress [--gptq-python PY]
      [--arch llama,qwen3] [--cols ct-sym-4,gptq-4,dense] [--skip-cols gptq-asym-2]
      [--tol 1e-4] [--work DIR] [--report FILE]

The python running this needs torch, transformers and compressed-tensors. GPTQ cells run in a
second interpreter (--gptq-python, env COMPRESS_GPTQ_PYTHON, or this one if it has gptqmodel
and optimum) that also needs gptqmodel and optimum; see README.md beside this file.
"""

import argparse
import importlib.metadata as md
import json
import re
import os
import shutil
import subprocess
import sys
import tempfile
import traceback

os.environ.setdefault("TQDM_DISABLE", "1")  # loaders' progress bars
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.normpath(os.path.join(HERE, "..", ".."))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "transformers")
SIDE_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "tokenizer.model",
    "chat_template.jinja",
]


# ------------------------------------------------------------------------------------------
# loading (runs in this interpreter, or in the GPTQ worker interpreter)


def load_logits(out_dir, ids, logits_path, expect_quant_modules, dtype="float32"):
    """Load `out_dir` with transformers (in `dtype`), write its logits on `ids` as float32 to
    `logits_path`. Returns {"ok": bool, "error": str, "notes": [...]}."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    notes = []
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            out_dir,
            dtype=getattr(torch, dtype),
            attn_implementation="eager",
            output_loading_info=True,
        )
    except Exception as e:  # the loader's own error is the cell's message
        return {"ok": False, "error": f"from_pretrained: {type(e).__name__}: {e}".splitlines()[0]}
    bad = {k: sorted(v) for k, v in info.items() if v and k != "error_msgs"}
    if info.get("error_msgs"):
        bad["error_msgs"] = [str(x) for x in info["error_msgs"]]
    if bad:
        return {"ok": False, "error": f"loading info: {json.dumps(bad)[:400]}"}
    kinds = sorted(
        {type(m).__name__ for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj"))}
    )
    if expect_quant_modules and any(k == "Linear" for k in kinds):
        return {"ok": False, "error": f"decoder linears loaded as {kinds}, not quantized modules"}
    notes.append("modules: " + ",".join(kinds))
    model.eval()
    x = torch.tensor(ids, dtype=torch.int64)
    try:
        with torch.no_grad():
            tensors = {"logits": model(input_ids=x).logits.float().contiguous()}
    except Exception as e:  # the loaded model's own error is the cell's message
        return {"ok": False, "error": f"forward: {type(e).__name__}: {e}".splitlines()[0]}
    fp16_exact = None
    if expect_quant_modules:
        # GPTQ kernels dequantize in the scales' dtype (F16 in GPTQ v1): (q - z)·s is rounded to
        # F16 before the matmul, while we dequantize in F32. Check that this rounding is the
        # whole difference: the loader's own F16 weights must equal its F32 dequantization
        # rounded to F16, and the model with the F32 dequantization (the loader's unpacking,
        # zero-point and g_idx handling, only the arithmetic widened) gives the `logits_f32`.
        fp16_exact = True
        with torch.no_grad():
            for name, mod in list(model.named_modules()):
                if not hasattr(mod, "qweight"):
                    continue
                w16 = mod.dequantize_weight().detach().clone()
                mod.scales = mod.scales.float()
                if hasattr(mod, "clear_weight_cache"):
                    mod.clear_weight_cache()
                w32 = mod.dequantize_weight().detach().float()
                if w16.dtype != torch.float16 or not torch.equal(w16, w32.to(w16.dtype)):
                    fp16_exact = False
                lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=getattr(mod, "bias", None) is not None)
                lin.weight.copy_(w32.T)
                if lin.bias is not None:
                    lin.bias.copy_(mod.bias.float())
                parent = model.get_submodule(name.rsplit(".", 1)[0])
                setattr(parent, name.rsplit(".", 1)[1], lin)
            tensors["logits_f32"] = model(input_ids=x).logits.float().contiguous()
    save_file(tensors, logits_path)
    return {"ok": True, "error": "", "notes": notes, "fp16_exact": fp16_exact}


def worker_main():
    """--worker: read [{out_dir, ids, logits_path, expect_quant_modules}] as JSON on stdin,
    answer one JSON list on stdout (after a marker line: loaders print banners)."""
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")
    jobs = json.load(sys.stdin)
    res = []
    for j in jobs:
        try:
            r = load_logits(j["out_dir"], j["ids"], j["logits_path"], j["expect_quant_modules"])
        except Exception as e:
            r = {"ok": False, "error": f"{type(e).__name__}: {e}".splitlines()[0],
                 "trace": traceback.format_exc()[-2000:]}
        res.append(r)
    res_versions = versions()
    sys.stdout.write("\n@@INTEROP-RESULT@@\n" + json.dumps({"results": res, "versions": res_versions}) + "\n")
    sys.stdout.flush()


def versions():
    v = {"python": sys.version.split()[0]}
    for p in ("torch", "transformers", "compressed-tensors", "safetensors", "gptqmodel", "optimum", "accelerate"):
        try:
            v[p] = md.version(p)
        except md.PackageNotFoundError:
            pass
    return v


def can_import(python, mods):
    try:
        r = subprocess.run(
            [python, "-c", "import " + ", ".join(mods)],
            capture_output=True,
            timeout=300,
        )
        return r.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def find_gptq_python(arg):
    mods = ["gptqmodel", "optimum", "transformers"]
    cands = []
    if arg:
        cands.append(arg)
    if os.environ.get("COMPRESS_GPTQ_PYTHON"):
        cands.append(os.environ["COMPRESS_GPTQ_PYTHON"])
    cands += [
        sys.executable,
        os.path.expanduser("~/.cache/compress-gptq-venv/bin/python"),
        "/work/gptqvenv/bin/python",
    ]
    for c in cands:
        if c and os.path.exists(c) and can_import(c, mods):
            return c
    return None


# ------------------------------------------------------------------------------------------
# the matrix


def arches(ref_model):
    a = {"llama": ref_model}
    for n in ["llama-tied", "mistral", "qwen2", "qwen3", "llama3-rope", "llama-linear-rope", "qwen3-moe",
              "mixtral", "qwen2-moe"]:
        a[n] = os.path.join(FIXTURES, n)
    return a


# Rows whose reference loader cannot do some cells, and why (shown as "n/a" with the reason in
# the matrix, never counted as passing), and the tolerance their cells compare at.
# transformers 5.17 + compressed-tensors 0.19 decompress a Qwen3-MoE's stacked experts into
# bfloat16 even in a float32 model (`Qwen3MoeExperts.gate_up_proj` stays bf16; the values equal
# our dequantization, checked element by element), so its quantized MoE logits are a bf16
# computation: compared at the FP4 cells' bf16 tolerance.
ROW_LIMITS = {
    "qwen3-moe": {
        "tol": 3e-2,
        "na": {
            "gptq": "compress refuses: GPTQ v1 has no ignore list and the routers stay dense",
            "ct-asym": "transformers 5.17 cannot convert the zero points of stacked experts "
            "(from_pretrained: automatic conversion of the weights failed)",
            "ct-chan-asym": "as ct-asym",
            "ct-skip-down": "asymmetric: as ct-asym",
            "ct-fp8_dynamic": "bf16 experts (above) under per-token FP8 input quantization: "
            "inputs one bf16 step apart land on other FP8 codes (4.2e-2 measured, not a loader we "
            "can compare at float32)",
            "ct-nvfp4a16": "transformers 5.17 drops the experts' weight_global_scale "
            "(unexpected keys) when it stacks them",
        },
    },
}
# Qwen2-MoE and Mixtral stack their experts the same way in transformers 5.17 (same conversion
# path), so the same limits apply. Mixtral's checkpoint names (`block_sparse_moe.gate`) are
# renamed on load (`mlp.gate`), and with a quantization_config present transformers 5.17 keeps
# that renamed router in its stored bfloat16 inside a float32 model (seen by listing the loaded
# parameters' dtypes); its forward then fails on the dtype mismatch, and the MXFP4A16 file,
# which loads another way, runs bf16 routing.
ROW_LIMITS["qwen2-moe"] = {
    "tol": 3e-2,
    "na": dict(
        ROW_LIMITS["qwen3-moe"]["na"],
        **{
            "ct-sym-2": "bf16 experts (above) flip one near-tied route: one token of 48 at 1.7e-1, "
            "the other 47 within 3e-3 (per-row check by hand)",
        },
    ),
}
ROW_LIMITS["mixtral"] = {
    "tol": 3e-2,
    "na": dict(
        ROW_LIMITS["qwen3-moe"]["na"],
        **{
            "ct-sym": "transformers 5.17 keeps the renamed router (block_sparse_moe.gate → "
            "mlp.gate) in bf16 in a float32 model: its forward fails (float != BFloat16)",
            "ct-mxfp4a16": "router and experts in bf16 (as ct-sym): 1.0e-1, not comparable at "
            "float32",
            "ct-mixed": "the same loader limit as ct-sym (and the column's MLP pattern names "
            "Mixtral's w1/w2/w3 experts not at all)",
        },
    ),
}


def row_na(rn, cn):
    """Why the loader cannot do cell (rn, cn), if it cannot."""
    for prefix, why in ROW_LIMITS.get(rn, {}).get("na", {}).items():
        if cn.startswith(prefix):
            return why
    return None


def columns():
    """name -> (format, rtn fields, loader kind, expected quantization_config fields)."""
    cols = {}
    for sym in (True, False):
        for b in (2, 3, 4, 8):
            cols[f"ct-{'sym' if sym else 'asym'}-{b}"] = (
                "compressed-tensors",
                f"bits: {b}, group_size: 32, sym: {str(sym).lower()}",
                "ct",
                {"bits": b, "sym": sym, "group_size": 32, "strategy": "group"},
            )
    for b in (2, 3, 4, 8):
        cols[f"gptq-{b}"] = (
            "gptq",
            f"bits: {b}, group_size: 32, sym: true",
            "gptq",
            {"bits": b, "sym": True, "group_size": 32},
        )
    cols["dense"] = ("dense", "bits: 4, group_size: 32, sym: false", "dense", {})
    # extras, where loaders and writers have been seen to disagree
    cols["ct-chan-asym-4"] = (
        "compressed-tensors",
        "bits: 4, strategy: channel, group_size: -1, sym: false",
        "ct",
        {"bits": 4, "sym": False, "group_size": None, "strategy": "channel"},
    )
    cols["ct-skip-down-4"] = (
        "compressed-tensors",
        'bits: 4, group_size: 32, sym: false, ignore: ["re:.*down_proj$"]',
        "ct",
        {"bits": 4, "sym": False, "group_size": 32, "strategy": "group", "ignored": "down_proj"},
    )
    # several schemes in one file (what a size budget writes): one config group per grid,
    # each naming its modules — the attention linears 2-bit asymmetric, the MLP 4-bit
    cols["ct-mixed"] = (
        "compressed-tensors",
        'bits: 4, group_size: 32, targets: ["re:.*(gate|up|down)_proj$"]}\n  - rtn: {bits: 2, group_size: 32, '
        'sym: false, targets: ["re:.*self_attn.*"]',
        "ct-mixed",
        {"groups": 2},
    )
    for b in (2, 4):
        cols[f"gptq-asym-{b}"] = (
            "gptq",
            f"bits: {b}, group_size: 32, sym: false",
            "gptq",
            {"bits": b, "sym": False, "group_size": 32},
        )
    # the float schemes (issue #39): FP8 loads in float32 (its per-token FP8 activations are
    # applied on both sides; FP8_BLOCK's activation groups of 128 do not fit the fixtures'
    # 64-wide inputs, and compress refuses that); compressed-tensors 0.19 loads the FP4 files in
    # bfloat16 only, so those cells compare a bfloat16 model with our float32 logits
    for scheme, fmt, dtype, tol in (
        # 5e-3: on the bf16 reference model (the only bf16 row) transformers' FP8_DYNAMIC
        # logits differ from ours by 2.5e-3 (perplexity 204.973 vs 204.986 on 100 kB of
        # wikitext2), on every float32 fixture by < 1e-6 — not yet explained (issue #39 notes)
        ("FP8_DYNAMIC", "float-quantized", "float32", 5e-3),
        ("NVFP4A16", "nvfp4-pack-quantized", "bfloat16", 3e-2),
        ("MXFP4A16", "mxfp4-pack-quantized", "bfloat16", 3e-2),
    ):
        cols[f"ct-{scheme.lower()}"] = (
            "compressed-tensors",
            f"scheme: {scheme}",
            "ct-float",
            {"format": fmt, "dtype": dtype, "tol": tol},
        )
    return cols


def golden_ids(model_dir):
    g = os.path.join(model_dir, "golden.safetensors")
    from safetensors.torch import load_file
    import torch

    if os.path.exists(g):
        return load_file(g)["input_ids"].tolist(), g
    # the real model has no golden file: fixed pseudo-random ids, [2, 24] like the fixtures
    with open(os.path.join(model_dir, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab, (2, 24), generator=gen).tolist(), None


def st_tensors(d):
    """name -> (dtype, shape, bytes) of every safetensors file in d."""
    import glob

    from safetensors import safe_open

    out = {}
    for p in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
        if os.path.basename(p) == "golden.safetensors":
            continue
        with safe_open(p, framework="pt") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                out[k] = t
    return out


def check_config(src, out, kind, want):
    """Problems with the output's config.json / quantize_config.json (empty = fine)."""
    from transformers import AutoConfig

    errs = []
    with open(os.path.join(src, "config.json")) as f:
        cs = json.load(f)
    with open(os.path.join(out, "config.json")) as f:
        co = json.load(f)
    q = co.pop("quantization_config", None)
    # raw JSON: every source key kept with its value
    for k, v in cs.items():
        if k == "quantization_config":
            continue
        if k not in co:
            errs.append(f"config.json lost `{k}`")
        elif co[k] != v:
            errs.append(f"config.json `{k}`: {v!r} -> {co[k]!r}")
    # what transformers makes of it
    a = AutoConfig.from_pretrained(src).to_dict()
    b = AutoConfig.from_pretrained(out).to_dict()
    for d in (a, b):
        d.pop("quantization_config", None)
        d.pop("transformers_version", None)
        d.pop("_name_or_path", None)  # the folder it was read from
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            errs.append(f"AutoConfig `{k}`: {a.get(k)!r} -> {b.get(k)!r}")
    if kind == "dense":
        if q is not None:
            errs.append("dense output has a quantization_config")
        return errs
    if q is None:
        return errs + ["no quantization_config"]
    if kind == "ct":
        ign = q.get("ignore") or []
        if "lm_head" not in ign:
            errs.append(f"ignore {ign} lacks lm_head")
        if want.get("ignored") and not any(want["ignored"] in x for x in ign):
            errs.append(f"ignore {ign} lacks the skipped {want['ignored']}")
        if q.get("quant_method") != "compressed-tensors" or q.get("format") != "pack-quantized":
            errs.append(f"quant_method/format {q.get('quant_method')}/{q.get('format')}")
        w = q["config_groups"]["group_0"]["weights"]
        for k_ours, k_ct in (("bits", "num_bits"), ("sym", "symmetric"), ("group_size", "group_size"), ("strategy", "strategy")):
            if w.get(k_ct) != want[k_ours]:
                errs.append(f"weights.{k_ct} = {w.get(k_ct)!r}, asked {want[k_ours]!r}")
    if kind == "ct-mixed":
        groups = q.get("config_groups") or {}
        if q.get("quant_method") != "compressed-tensors" or q.get("format") != "pack-quantized":
            errs.append(f"quant_method/format {q.get('quant_method')}/{q.get('format')}")
        if len(groups) != want["groups"]:
            errs.append(f"{len(groups)} config groups, expected {want['groups']}")
        named = [t for g in groups.values() for t in g.get("targets", [])]
        if "Linear" in named or len(named) != len(set(named)):
            errs.append("mixed groups must name each module once")
    if kind == "ct-float":
        if "lm_head" not in (q.get("ignore") or []):
            errs.append(f"ignore {q.get('ignore')} lacks lm_head")
        if q.get("quant_method") != "compressed-tensors" or q.get("format") != want["format"]:
            errs.append(f"quant_method/format {q.get('quant_method')}/{q.get('format')}, asked {want['format']}")
    if kind == "gptq":
        for k in ("bits", "group_size", "sym"):
            if q.get(k) != want[k]:
                errs.append(f"{k} = {q.get(k)!r}, asked {want[k]!r}")
        if q.get("quant_method") != "gptq" or q.get("checkpoint_format", "gptq") != "gptq":
            errs.append(f"quant_method/checkpoint_format {q.get('quant_method')}/{q.get('checkpoint_format')}")
        qc = os.path.join(out, "quantize_config.json")
        if not os.path.exists(qc):
            errs.append("no quantize_config.json")
        else:
            with open(qc) as f:
                if json.load(f) != q:
                    errs.append("quantize_config.json differs from config.json's quantization_config")
    return errs


def check_tensors_and_files(src, out, kind):
    import torch

    errs = []
    ts, to = st_tensors(src), st_tensors(out)
    with open(os.path.join(src, "config.json")) as f:
        tied = json.load(f).get("tie_word_embeddings", False)
    if tied and "lm_head.weight" in to:
        errs.append("tied checkpoint gained lm_head.weight")
    # embed, norms, lm_head, biases, routers: every tensor but a decoder linear's weight (Mixtral
    # names its experts' linears w1/w2/w3)
    keep = [k for k in ts if not re.search(r"(proj|\.w[123])\.weight$", k)]
    for k in keep:
        if k not in to:
            errs.append(f"`{k}` missing from the output")
        elif to[k].dtype != ts[k].dtype or not torch.equal(to[k], ts[k]):
            errs.append(f"`{k}` not copied unchanged")
    for f in SIDE_FILES:
        a, b = os.path.join(src, f), os.path.join(out, f)
        if os.path.exists(a):
            if not os.path.exists(b):
                errs.append(f"{f} not copied")
            elif open(a, "rb").read() != open(b, "rb").read():
                errs.append(f"{f} differs from the source")
    if os.path.exists(os.path.join(src, "generation_config.json")):
        from transformers import GenerationConfig

        if GenerationConfig.from_pretrained(src).to_dict() != GenerationConfig.from_pretrained(out).to_dict():
            errs.append("GenerationConfig differs")
    if os.path.exists(os.path.join(src, "tokenizer.json")):
        try:
            from transformers import AutoTokenizer

            text = "The interop suite checks 123 tokens, ünïcode and  spaces."
            ea = AutoTokenizer.from_pretrained(src)(text)["input_ids"]
            eb = AutoTokenizer.from_pretrained(out)(text)["input_ids"]
            if ea != eb:
                errs.append("tokenizer encodes differently from the output folder")
        except Exception as e:
            errs.append(f"AutoTokenizer: {type(e).__name__}: {e}".splitlines()[0])
    return errs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compress", required=True, help="our binary")
    ap.add_argument("--gptq-python", default=None, help="interpreter with gptqmodel + optimum")
    ap.add_argument("--ref-model", default=os.path.join(REPO, "..", "shared", "models", "ref-llama-9m"),
                    help="the untied llama (a real small model)")
    ap.add_argument("--arch", default="", help="comma-separated subset of rows")
    ap.add_argument("--cols", default="", help="comma-separated subset of columns")
    ap.add_argument("--skip-cols", default="", help="comma-separated columns to leave out")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--work", default=None, help="keep outputs here (default: a temp dir, removed)")
    ap.add_argument("--report", default=None, help="also write the Markdown here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker_main()
        return 0

    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    binary = os.path.abspath(a.compress)
    rows = arches(os.path.abspath(a.ref_model))
    cols = columns()
    if a.arch:
        rows = {k: v for k, v in rows.items() if k in a.arch.split(",")}
    if a.cols:
        cols = {k: v for k, v in cols.items() if k in a.cols.split(",")}
    if a.skip_cols:
        cols = {k: v for k, v in cols.items() if k not in a.skip_cols.split(",")}
    missing = [n for n, d in rows.items() if not os.path.exists(os.path.join(d, "config.json"))]
    if missing:
        print(f"missing model folders: {missing}", file=sys.stderr)
        return 2
    gptq_py = None
    if any(c[2] == "gptq" for c in cols.values()):
        gptq_py = find_gptq_python(a.gptq_python)
    work = a.work or tempfile.mkdtemp(prefix="compress-interop-")
    os.makedirs(work, exist_ok=True)

    cells = {}  # (row, col) -> {"status": "ok"|"fail"|"golden-only", "msg", "rel"}
    gptq_jobs = []
    for rn, src in rows.items():
        ids, _ = golden_ids(src)
        id_args = []
        for r in ids:
            id_args += ["--ids", ",".join(str(x) for x in r)]
        for cn, (fmt, rtn, kind, want) in cols.items():
            cell = {"status": "fail", "msg": "", "rel": None, "rel_golden": None}
            cells[(rn, cn)] = cell
            if row_na(rn, cn):
                cell["status"], cell["msg"] = "n/a", row_na(rn, cn)
                continue
            base = os.path.join(work, f"{rn}__{cn}")
            out = base + ".out"
            yml = base + ".yaml"
            with open(yml, "w") as f:
                f.write(f"model: {src}\noutput: {out}\npasses:\n  - rtn: {{{rtn}}}\nexport: {{format: {fmt}}}\n")
            p = subprocess.run([binary, yml, "--quiet", "--overwrite"], capture_output=True, text=True)
            if p.returncode != 0:
                cell["msg"] = "compress: " + (p.stderr.strip().splitlines() or ["exit %d" % p.returncode])[-1]
                continue
            ours_path = base + ".ours.safetensors"
            p = subprocess.run([binary, "logits", "--model", out, *id_args, "--out", ours_path, "--quiet"],
                               capture_output=True, text=True)
            if p.returncode != 0:
                cell["msg"] = "compress logits: " + (p.stderr.strip().splitlines() or ["?"])[-1]
                continue
            errs = []
            try:
                errs += check_config(src, out, kind, want)
                errs += check_tensors_and_files(src, out, kind)
            except Exception as e:
                errs.append(f"check: {type(e).__name__}: {e}".splitlines()[0])
            cell["checks"] = errs
            job = {"out_dir": out, "ids": ids, "logits_path": base + ".ref.safetensors",
                   "expect_quant_modules": kind == "gptq", "ours": ours_path, "src": src}
            if kind == "gptq":
                if gptq_py is None:
                    cell["status"] = "golden-only"
                    cell["msg"] = "no GPTQ loader installed (gptqmodel + optimum); bytes checked by tests/formats/packing_fixtures.rs"
                    if errs:
                        cell["status"], cell["msg"] = "fail", "; ".join(errs)
                    continue
                gptq_jobs.append(((rn, cn), job))
            else:
                r = load_logits(job["out_dir"], ids, job["logits_path"], False, want.get("dtype", "float32"))
                tol = max(want.get("tol") or a.tol, ROW_LIMITS.get(rn, {}).get("tol", 0))
                finish_cell(cell, r, job, tol)

    worker_versions = {}
    if gptq_jobs:
        p = subprocess.run(
            [gptq_py, os.path.abspath(__file__), "--worker", "--compress", binary],
            input=json.dumps([j for _, j in gptq_jobs]),
            capture_output=True,
            text=True,
            env=dict(os.environ, GPTQMODEL_DISABLE_PACK_EXT="1"),
        )
        marker = "@@INTEROP-RESULT@@"
        if p.returncode != 0 or marker not in p.stdout:
            tail = (p.stderr.strip().splitlines() or ["?"])[-1]
            for key, _ in gptq_jobs:
                cells[key]["msg"] = f"GPTQ loader process failed: {tail}"
        else:
            payload = json.loads(p.stdout.split(marker, 1)[1])
            worker_versions = payload["versions"]
            for (key, job), r in zip(gptq_jobs, payload["results"]):
                finish_cell(cells[key], r, job, a.tol)

    md_text = render(rows, cols, cells, a.tol, binary, gptq_py, worker_versions)
    print(md_text)
    if a.report:
        with open(a.report, "w") as f:
            f.write(md_text)
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if any(c["status"] == "fail" for c in cells.values()) else 0


def finish_cell(cell, r, job, tol):
    import torch
    from safetensors.torch import load_file

    errs = list(cell.get("checks", []))
    if not r["ok"]:
        errs.insert(0, r["error"])
    else:
        ref = load_file(job["logits_path"])["logits"]
        ours = load_file(job["ours"])
        if ours["input_ids"].tolist() != job["ids"]:
            errs.append("compress logits echoed other input_ids")
        o = ours["logits"]
        if o.shape != ref.shape:
            errs.append(f"logits shape {list(o.shape)} vs transformers {list(ref.shape)}")
        else:
            rel = ((ref - o).abs().max() / ref.abs().max()).item()
            cell["rel"] = rel
            if not rel <= tol:
                f32 = load_file(job["logits_path"]).get("logits_f32")
                rel32 = None if f32 is None else ((f32 - o).abs().max() / f32.abs().max()).item()
                if rel32 is not None and rel32 <= tol and r.get("fp16_exact"):
                    cell["fp16"] = rel32  # the loader's F16 dequantization is the whole difference
                else:
                    msg = f"logits differ: max rel {rel:.2e} > {tol:g}"
                    if rel32 is not None:
                        msg += f" (with the loader's dequantization widened to F32: {rel32:.2e})"
                    errs.append(msg + zero_point_hint(job["out_dir"]))
            g = os.path.join(job["src"], "golden.safetensors")
            if os.path.exists(g):
                gl = load_file(g)["logits"]
                cell["rel_golden"] = ((gl - ref).abs().max() / gl.abs().max()).item()
        cell["notes"] = r.get("notes", [])
    cell["status"] = "fail" if errs else "ok"
    cell["msg"] = "; ".join(errs)


def zero_point_hint(out_dir):
    """For GPTQ v1 asym outputs: how many zero points are 0 (v1 stores zero-1 per field)."""
    try:
        with open(os.path.join(out_dir, "config.json")) as f:
            q = json.load(f).get("quantization_config", {})
        if q.get("quant_method") != "gptq" or q.get("sym", True):
            return ""
        bits = q["bits"]
        n0 = 0
        for name, t in st_tensors(out_dir).items():
            if not name.endswith(".qzeros"):
                continue
            w = t.to(dtype=__import__("torch").int64) & 0xFFFFFFFF
            for i in range(w.shape[1] * 32 // bits):
                wi, off = divmod(i * bits, 32)
                v = w[:, wi] >> off
                if off + bits > 32:
                    v = v | (w[:, wi + 1] << (32 - off))
                n0 += int((((v & ((1 << bits) - 1)) + 1) & ((1 << bits) - 1) == 0).sum())
        if n0 == 0:
            return ""
        return (f"; {n0} zero point(s) are 0: GPTQ v1 stores zero-1, we write it per field as "
                f"{(1 << bits) - 1}, GPTQModel adds 1 to the packed word (v1->v2) and the carry "
                f"raises the next field's zero point by one (see tests/fixtures/packing/README.md)")
    except Exception as e:  # a hint only
        return f"; (zero-point check failed: {e})"


def render(rows, cols, cells, tol, binary, gptq_py, worker_versions):
    L = []
    L.append("# Interop matrix: our outputs in the reference loaders\n")
    try:
        ver = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.strip()
    except OSError:
        ver = "?"
    v = versions()
    L.append(f"- ours: `{ver}` ({binary})")
    L.append("- loader (compressed-tensors, dense): " + ", ".join(f"{k} {x}" for k, x in v.items()))
    if gptq_py:
        L.append(f"- loader (GPTQ v1, `{gptq_py}`): " + ", ".join(f"{k} {x}" for k, x in worker_versions.items()))
    else:
        L.append("- loader (GPTQ v1): none installed → GPTQ cells golden-only (bytes: tests/formats/packing_fixtures.rs)")
    L.append(f"- ✓ = loads with no missing/unexpected keys, config and copied tensors/files check out, and "
             f"max|logits_transformers − logits_ours| / max|logits_transformers| ≤ {tol:g}")
    L.append("- ✓ f16 = GPTQ cell whose logits differ by more than that only because GPTQModel "
             "dequantizes in F16 (GPTQ v1 scales are F16; (q − z)·s is rounded to F16 before the matmul, "
             "we keep F32): its F16 weights equal its own F32 dequantization rounded to F16, and with that "
             "dequantization widened to F32 the logits agree within the tolerance. Exact for 2/3/4-bit "
             "symmetric with bf16-born scales (8 + 3 significant bits fit F16's 11); not for 8-bit or asym.")
    L.append("- RTN, default targets (every decoder linear), group_size 32 unless the column says otherwise\n")
    head = "| arch | " + " | ".join(cols) + " |"
    L.append(head)
    L.append("|" + "---|" * (len(cols) + 1))
    foot = []
    na = []
    for rn in rows:
        line = [rn]
        for cn in cols:
            c = cells[(rn, cn)]
            if c["status"] == "ok" and c.get("fp16") is not None:
                line.append("✓ f16")
            elif c["status"] == "ok":
                line.append("✓")
            elif c["status"] == "golden-only":
                line.append("golden-only")
            elif c["status"] == "n/a":
                na.append(f"{rn} × {cn}: {c['msg']}")
                line.append(f"n/a [{len(na)}]")
            else:
                foot.append(f"{rn} × {cn}: {c['msg']}")
                line.append(f"✗ [{len(foot)}]")
        L.append("| " + " | ".join(line) + " |")
    L.append("")
    if foot:
        L.append("Failures:\n")
        for i, m in enumerate(foot, 1):
            L.append(f"{i}. {m}")
        L.append("")
    if na:
        L.append("Not possible with these loaders (see ROW_LIMITS):\n")
        for i, m in enumerate(na, 1):
            L.append(f"{i}. {m}")
        L.append("")
    L.append("Max relative logit difference, transformers vs `compress logits` (and, in brackets, "
             "the quantized model vs the unquantized golden logits):\n")
    L.append(head)
    L.append("|" + "---|" * (len(cols) + 1))
    for rn in rows:
        line = [rn]
        for cn in cols:
            c = cells[(rn, cn)]
            if c.get("rel") is None:
                line.append("–")
            else:
                s = f"{c['rel']:.1e}"
                if c.get("fp16") is not None:
                    s += f" / f32 {c['fp16']:.1e}"
                if c.get("rel_golden") is not None:
                    s += f" ({c['rel_golden']:.2f})"
                line.append(s)
        L.append("| " + " | ".join(line) + " |")
    notes = sorted({n for c in cells.values() for n in c.get("notes", [])})
    if notes:
        L.append("\nModule classes seen after loading: " + "; ".join(notes))
    passed = sum(c["status"] == "ok" for c in cells.values())
    failed = sum(c["status"] == "fail" for c in cells.values())
    skipped = sum(c["status"] == "golden-only" for c in cells.values())
    nas = sum(c["status"] == "n/a" for c in cells.values())
    L.append(f"\nCells: {passed} ✓, {failed} ✗, {skipped} golden-only, {nas} n/a.")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    sys.exit(main())
