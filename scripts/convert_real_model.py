#!/usr/bin/env python3
"""Convert a llama.cpp GGUF checkpoint of a Llama-architecture model into a Hugging Face folder.

Writes OUT_DIR/{config.json, generation_config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, special_tokens_map.json, SOURCE.json}, following the conventions of
transformers' LlamaForCausalLM exactly:

* tensor names model.embed_tokens.weight, model.layers.N.self_attn.{q,k,v,o}_proj.weight,
  model.layers.N.mlp.{gate,up,down}_proj.weight, model.layers.N.{input,post_attention}_layernorm
  .weight, model.norm.weight, and lm_head.weight only when the GGUF has an untied output.weight
  (tied: omitted, and config.tie_word_embeddings = true);
* llama.cpp's convert_hf_to_gguf.py permutes the rows of Q (by n_head) and K (by n_head_kv)
  so that its RoPE works on interleaved pairs; that permutation is undone here so HF's
  rotate_half RoPE sees the original layout;
* quantized GGUF tensors (Q4_0, Q4_1, Q8_0, K-quants, ...) are dequantized with the gguf
  package's reference dequantizer; F16/BF16/F32 tensors are widened exactly.
* the tokenizer (GGUF "gpt2" byte-level BPE) is rebuilt as a tokenizers-library tokenizer.json:
  vocab + merges from the GGUF, CONTROL/USER_DEFINED tokens as special added tokens, and the
  pre-tokenizer that matches tokenizer.ggml.pre (llama.cpp's regexes for that pre-type).

Only numpy and gguf are needed (the safetensors file is written directly).

usage: convert_real_model.py GGUF OUT_DIR [--dtype float32|bfloat16] [--name NAME]
       [--source-note TEXT]
"""
import argparse
import hashlib
import json
import os
import struct
import sys

import numpy as np
import gguf
from gguf.quants import dequantize

# ----------------------------------------------------------------------------- metadata


def field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


# ----------------------------------------------------------------------------- weights


def unpermute(w, n_head):
    """Inverse of llama.cpp convert_hf_to_gguf.LlamaModel.permute for a [out, in] matrix."""
    out, inn = w.shape
    head_dim = out // n_head
    assert head_dim * n_head == out and head_dim % 2 == 0, (w.shape, n_head)
    return w.reshape(n_head, head_dim // 2, 2, inn).swapaxes(1, 2).reshape(out, inn)


def tensor_to_f32(t):
    """A GGUF tensor as a float32 numpy array in HF (row-major [out, in]) layout."""
    tt = t.tensor_type
    if tt == gguf.GGMLQuantizationType.F32:
        a = np.asarray(t.data, dtype=np.float32)
    elif tt == gguf.GGMLQuantizationType.F16:
        a = np.asarray(t.data, dtype=np.float16).astype(np.float32)
    elif tt == gguf.GGMLQuantizationType.BF16:
        raw = np.asarray(t.data).view(np.uint16).astype(np.uint32) << 16
        a = raw.view(np.float32)
    else:
        a = dequantize(t.data, tt).astype(np.float32, copy=False)
    # GGUF shape is ggml order (ne0 = innermost); numpy wants it reversed.
    shape = tuple(int(x) for x in reversed(list(t.shape)))
    return np.ascontiguousarray(a.reshape(shape))


LAYER_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GLOBAL_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_name(gname):
    if gname in GLOBAL_MAP:
        return GLOBAL_MAP[gname]
    parts = gname.split(".", 2)
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in LAYER_MAP:
        return f"model.layers.{int(parts[1])}.{LAYER_MAP[parts[2]]}"
    return None


def to_bf16_bits(a):
    """float32 -> bfloat16 bit pattern (uint16), round to nearest even."""
    u = a.astype(np.float32).view(np.uint32)
    rounded = u + 0x7FFF + ((u >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


def write_safetensors(path, tensors, dtype, metadata):
    """tensors: list of (name, float32 array). Writes a standard safetensors file."""
    header = {"__metadata__": metadata}
    blobs = []
    offset = 0
    for name, a in tensors:
        if dtype == "bfloat16":
            b = to_bf16_bits(a).tobytes()
            st = "BF16"
        else:
            b = a.astype("<f4").tobytes()
            st = "F32"
        header[name] = {"dtype": st, "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    hjson = json.dumps(header, separators=(",", ":")).encode()
    hjson += b" " * ((8 - len(hjson) % 8) % 8)  # align data start to 8 bytes
    tmp = path + ".part"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- tokenizer

# llama.cpp llama-vocab.cpp: pre-tokenizer regexes per tokenizer.ggml.pre. We express the ones
# we know as HF pre-tokenizers. GPT-2's own regex is what ByteLevel(use_regex=True) applies.
DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                    "minerva"}


def pre_tokenizer_for(pre):
    bytelevel = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                 "use_regex": True}
    if pre in DIGITS_THEN_GPT2:
        return {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, bytelevel]}
    if pre in (None, "default", "gpt-2", "gpt2"):
        return bytelevel
    raise SystemExit(f"tokenizer.ggml.pre = {pre!r}: no HF pre-tokenizer mapping here; add one")


def build_tokenizer(reader):
    model = field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise SystemExit(f"tokenizer.ggml.model = {model!r}: only byte-level BPE ('gpt2') is "
                         "handled by this converter")
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    merges = field(reader, "tokenizer.ggml.merges")
    pre = field(reader, "tokenizer.ggml.pre")
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise SystemExit("duplicate tokens in GGUF vocab")
    added = []
    for i, (t, ty) in enumerate(zip(tokens, types)):
        # gguf.TokenType: 1 NORMAL, 2 UNKNOWN, 3 CONTROL, 4 USER_DEFINED, 5 UNUSED, 6 BYTE
        if ty in (3, 4):
            added.append({"id": i, "content": t, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": ty == 3})
    tok = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer_for(pre),
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True,
                           "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": [m.split(" ") for m in merges]},
    }
    add_bos = bool(field(reader, "tokenizer.ggml.add_bos_token", False))
    bos_id = field(reader, "tokenizer.ggml.bos_token_id")
    if add_bos and bos_id is not None:
        bos = tokens[bos_id]
        tok["post_processor"] = {"type": "Sequence", "processors": [
            tok["post_processor"],
            {"type": "TemplateProcessing",
             "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                        {"Sequence": {"id": "A", "type_id": 0}}],
             "pair": [{"SpecialToken": {"id": bos, "type_id": 0}},
                      {"Sequence": {"id": "A", "type_id": 0}},
                      {"SpecialToken": {"id": bos, "type_id": 1}},
                      {"Sequence": {"id": "B", "type_id": 1}}],
             "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}]}
    return tok, tokens, added, add_bos


# ----------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("out")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--name", default=None)
    ap.add_argument("--source-note", default="")
    args = ap.parse_args()

    r = gguf.GGUFReader(args.gguf)
    arch = field(r, "general.architecture")
    if arch != "llama":
        raise SystemExit(f"general.architecture = {arch!r}: only 'llama' is handled")
    p = lambda k, d=None: field(r, f"{arch}.{k}", d)
    n_layer = int(p("block_count"))
    hidden = int(p("embedding_length"))
    n_head = int(p("attention.head_count"))
    n_kv = int(p("attention.head_count_kv", n_head))
    ffn = int(p("feed_forward_length"))
    ctx = int(p("context_length"))
    # GGUF stores these as float32: take the shortest decimal that round-trips (1e-05, not
    # 9.999999747378752e-06), which is what the original config.json held.
    f32 = lambda x: float(str(np.float32(x)))
    eps = f32(p("attention.layer_norm_rms_epsilon"))
    theta = f32(p("rope.freq_base", 10000.0))
    head_dim = int(p("attention.key_length", hidden // n_head))
    rope_dim = int(p("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise SystemExit(f"partial rotary ({rope_dim} of {head_dim}) is not LlamaForCausalLM")
    if p("rope.scaling.type") not in (None, "none"):
        raise SystemExit("rope scaling present: map it to config.rope_scaling before using")

    names = {t.name for t in r.tensors}
    unknown = sorted(n for n in names if hf_name(n) is None)
    if unknown:
        raise SystemExit(f"GGUF tensors with no HF mapping: {unknown[:10]}")
    tied = "output.weight" not in names

    tokenizer, tokens, added, add_bos = build_tokenizer(r)
    vocab_size = len(tokens)

    os.makedirs(args.out, exist_ok=True)
    out_tensors = []
    src_types = {}
    for t in r.tensors:
        name = hf_name(t.name)
        a = tensor_to_f32(t)
        src_types[t.tensor_type.name] = src_types.get(t.tensor_type.name, 0) + 1
        if t.name.endswith("attn_q.weight"):
            a = unpermute(a, n_head)
        elif t.name.endswith("attn_k.weight"):
            a = unpermute(a, n_kv)
        out_tensors.append((name, a))

    # shape checks against the config we are about to write
    want = {"model.embed_tokens.weight": (vocab_size, hidden), "model.norm.weight": (hidden,)}
    for i in range(n_layer):
        L = f"model.layers.{i}."
        want.update({
            L + "input_layernorm.weight": (hidden,),
            L + "post_attention_layernorm.weight": (hidden,),
            L + "self_attn.q_proj.weight": (n_head * head_dim, hidden),
            L + "self_attn.k_proj.weight": (n_kv * head_dim, hidden),
            L + "self_attn.v_proj.weight": (n_kv * head_dim, hidden),
            L + "self_attn.o_proj.weight": (hidden, n_head * head_dim),
            L + "mlp.gate_proj.weight": (ffn, hidden),
            L + "mlp.up_proj.weight": (ffn, hidden),
            L + "mlp.down_proj.weight": (hidden, ffn),
        })
    if not tied:
        want["lm_head.weight"] = (vocab_size, hidden)
    got = {n: a.shape for n, a in out_tensors}
    if set(got) != set(want):
        raise SystemExit(f"tensor set mismatch: missing {sorted(set(want) - set(got))[:5]} "
                         f"extra {sorted(set(got) - set(want))[:5]}")
    bad = [(n, got[n], want[n]) for n in want if tuple(got[n]) != want[n]]
    if bad:
        raise SystemExit(f"shape mismatch: {bad[:5]}")

    # HF order: embed, layers in order, norm, lm_head
    def order(n):
        if n == "model.embed_tokens.weight":
            return (0, 0, n)
        if n.startswith("model.layers."):
            return (1, int(n.split(".")[2]), n)
        return (2, 0, n)
    out_tensors.sort(key=lambda x: order(x[0]))

    write_safetensors(os.path.join(args.out, "model.safetensors"), out_tensors, args.dtype,
                      {"format": "pt"})

    bos = field(r, "tokenizer.ggml.bos_token_id")
    eos = field(r, "tokenizer.ggml.eos_token_id")
    pad = field(r, "tokenizer.ggml.padding_token_id")
    unk = field(r, "tokenizer.ggml.unknown_token_id")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": ffn,
        "max_position_embeddings": ctx,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": n_head,
        "num_hidden_layers": n_layer,
        "num_key_value_heads": n_kv,
        "pad_token_id": pad,
        "pretraining_tp": 1,
        "rms_norm_eps": eps,
        "rope_scaling": None,
        "rope_theta": theta,
        "tie_word_embeddings": tied,
        "torch_dtype": args.dtype,
        "use_cache": True,
        "vocab_size": vocab_size,
    }
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    gen = {k: v for k, v in (("bos_token_id", bos), ("eos_token_id", eos),
                             ("pad_token_id", pad)) if v is not None}
    with open(os.path.join(args.out, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
        f.write("\n")

    with open(os.path.join(args.out, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer, f, ensure_ascii=False, indent=2)
        f.write("\n")
    tname = lambda i: tokens[i] if i is not None and 0 <= i < len(tokens) else None
    special = [a["content"] for a in added if a["special"]]
    tok_cfg = {
        "add_bos_token": add_bos,
        "add_prefix_space": False,
        "added_tokens_decoder": {str(a["id"]): {k: a[k] for k in ("content", "lstrip",
                                 "normalized", "rstrip", "single_word", "special")}
                                 for a in added},
        "additional_special_tokens": [t for t in special if t in ("<|im_start|>", "<|im_end|>")]
        or None,
        "bos_token": tname(bos),
        "clean_up_tokenization_spaces": False,
        "eos_token": tname(eos),
        "model_max_length": ctx,
        "pad_token": tname(pad),
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": tname(unk),
        "vocab_size": vocab_size,
    }
    tmpl = field(r, "tokenizer.chat_template")
    if tmpl:
        tok_cfg["chat_template"] = tmpl
    tok_cfg = {k: v for k, v in tok_cfg.items() if v is not None}
    with open(os.path.join(args.out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tok_cfg, f, ensure_ascii=False, indent=2)
        f.write("\n")
    stm = {k: tok_cfg[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")
           if k in tok_cfg}
    if "additional_special_tokens" in tok_cfg:
        stm["additional_special_tokens"] = tok_cfg["additional_special_tokens"]
    with open(os.path.join(args.out, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(stm, f, ensure_ascii=False, indent=2)
        f.write("\n")

    h = hashlib.sha256()
    with open(args.gguf, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    source = {
        "name": args.name,
        "note": args.source_note,
        "gguf_file": os.path.basename(args.gguf),
        "gguf_sha256": h.hexdigest(),
        "gguf_general_name": field(r, "general.name"),
        "gguf_license": field(r, "general.license"),
        "gguf_tensor_types": src_types,
        "output_dtype": args.dtype,
        "conversion": "dequantized with gguf.quants; Q/K rows un-permuted (llama.cpp permute "
                      "inverse); tied lm_head omitted" if tied else
                      "dequantized with gguf.quants; Q/K rows un-permuted",
    }
    with open(os.path.join(args.out, "SOURCE.json"), "w") as f:
        json.dump(source, f, indent=2)
        f.write("\n")
    print(json.dumps({"out": args.out, "layers": n_layer, "hidden": hidden, "heads": n_head,
                      "kv_heads": n_kv, "vocab": vocab_size, "tied": tied,
                      "tensors": len(out_tensors), "source_types": src_types}))


if __name__ == "__main__":
    sys.exit(main())
