#!/usr/bin/env python3
"""Check an EoRA adapter with Hugging Face peft itself.

Loads CKPT (a compressed-tensors checkpoint we wrote, with the PEFT LoRA adapter in
CKPT/adapter/) with transformers + peft, runs it on fixed token ids, and compares the logits
with `compress logits` on the same folder (which evaluates base + adapter). Also reports how far
the base alone is from base + adapter, so a silently ignored adapter cannot pass.

Usage: /work/refvenv/bin/python scripts/peft-check.py CKPT [COMPRESS_BIN]
"""
import json, os, subprocess, sys, tempfile

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

ckpt = sys.argv[1]
binary = sys.argv[2] if len(sys.argv) > 2 else "target/release/compress"
ids = [[(7 * i + 3 * b + 1) % 4000 + 10 for i in range(48)] for b in range(2)]

base = AutoModelForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32)
base.eval()
with torch.no_grad():
    x = torch.tensor(ids)
    base_logits = base(x).logits.float()
    model = PeftModel.from_pretrained(base, os.path.join(ckpt, "adapter"))
    model.eval()
    cfg = model.peft_config["default"]
    peft_logits = model(x).logits.float()

with tempfile.TemporaryDirectory() as d:
    out = os.path.join(d, "logits.safetensors")
    cmd = [binary, "logits", "--model", ckpt, "--out", out, "--quiet"]
    for row in ids:
        cmd += ["--ids", ",".join(map(str, row))]
    subprocess.run(cmd, check=True)
    ours = load_file(out)["logits"].float()

def stats(a, b):
    d = (a - b).abs()
    return {"max_abs": d.max().item(), "mean_abs": d.mean().item(),
            "argmax_agree": (a.argmax(-1) == b.argmax(-1)).float().mean().item()}

res = {
    "checkpoint": ckpt,
    "peft_r": cfg.r, "peft_lora_alpha": cfg.lora_alpha,
    "adapted_modules": sum(1 for n, _ in model.named_modules() if n.endswith("lora_A")),
    "peft_vs_compress": stats(peft_logits, ours),
    "base_only_vs_compress": stats(base_logits, ours),
    "logit_scale_mean_abs": ours.abs().mean().item(),
}
print(json.dumps(res, indent=1))
ok = res["peft_vs_compress"]["max_abs"] < 1e-2 * max(1.0, ours.abs().max().item()) \
    and res["peft_vs_compress"]["max_abs"] < res["base_only_vs_compress"]["max_abs"]
print("PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
