#!/usr/bin/env python3
"""Random-weight models for the GPU check, made with the installed transformers.

Writes Hugging Face folders (config.json, model.safetensors in bf16, tokenizer files) that
both verity and transformers load, and prompts.json with the prompt token ids of the
numerics checks:

    make_models.py --out DIR [--tokenizers DIR] [--seed 0] [--summary FILE.json]

- DIR/qwen2.5-1.5b: Qwen2ForCausalLM with Qwen2.5-1.5B's shapes (28 layers, hidden 1536,
  12 query / 2 KV heads, FFN 8960, 151,936 embedding rows, tied embeddings), with the
  Qwen2.5 tokenizer when --tokenizers has it (exported from the Qwen2.5-Coder GGUF, it
  lists 151,936 ids: the 151,665 of the HF tokenizer plus padding entries; verity accepts
  a tokenizer up to the embedding's row count, never more).
- DIR/llama-small: LlamaForCausalLM with SmolLM2-135M's shapes (30 layers, hidden 576, 9/3
  heads, FFN 1536, 49,152 rows, tied), with the SmolLM2 tokenizer when available.

--tokenizers holds qwen2.5/ and smollm2/, each a folder with tokenizer.json (+
tokenizer_config.json, generation_config.json) as `verity bench tokenizer` writes them
(scripts/gpu-pack.sh puts them into gpu-bin/). Without them a 257-token byte-level
tokenizer is built with the `tokenizers` package: enough for every check here, which feed
token ids, not text.

Weights: transformers' own initialisation (normal, std 0.02) under a fixed torch seed, then
the RMSNorm weights set to 1 + N(0, 0.1²) and the biases to N(0, 0.02²): the default ones
and zeros would hide a norm weight or a q/k/v bias that an implementation reads wrongly.
Speed does not depend on the values, and both sides load the very same file.
"""

import argparse
import inspect
import json
import os
import random
import shutil
import sys
import time

QWEN_1_5B = {
    "kind": "qwen2",
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}

LLAMA_SMALL = {
    "kind": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

MODELS = [
    # (folder, shape, tokenizer folder under --tokenizers)
    ("qwen2.5-1.5b", QWEN_1_5B, "qwen2.5"),
    ("llama-small", LLAMA_SMALL, "smollm2"),
]

# Top-level config.json keys verity reads (src/model/config.rs, ModelConfig::from_hf_json).
VERITY_KEYS = [
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "rms_norm_eps",
    "rope_theta",
    "max_position_embeddings",
    "tie_word_embeddings",
]

PROMPT_TOKENS = 32


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def build_model(shape, seed):
    import torch
    import transformers

    fields = {k: v for k, v in shape.items() if k != "kind"}
    if shape["kind"] == "qwen2":
        config = transformers.Qwen2Config(use_sliding_window=False, **fields)
        cls = transformers.Qwen2ForCausalLM
    else:
        config = transformers.LlamaConfig(attention_bias=False, mlp_bias=False, **fields)
        cls = transformers.LlamaForCausalLM
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = cls(config)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen, device=device))
            elif name.endswith(".bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=gen, device=device))
    return model.to(torch.bfloat16), config


def effective(config):
    """The values a transformers config object really holds for the keys verity reads
    (rope_theta may live in `rope_parameters` in newer versions)."""
    out = {}
    for key in VERITY_KEYS:
        value = getattr(config, key, None)
        if key == "rope_theta" and value is None:
            params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
            value = params.get("rope_theta")
        out[key] = value
    return out


def check_effective(config, shape, where):
    got = effective(config)
    bad = ["%s=%r (want %r)" % (k, got[k], shape[k]) for k in VERITY_KEYS if got[k] is None or (
        float(got[k]) != float(shape[k]) if isinstance(shape[k], float) else got[k] != shape[k])]
    if bad:
        raise SystemExit("%s: transformers config differs from the intended shape: %s" % (where, ", ".join(bad)))


def fix_config_for_verity(folder, shape):
    """Makes sure config.json carries, at top level, every field verity reads.

    transformers 5 moves rope_theta into `rope_parameters` (seen with 5.24: no top-level
    `rope_theta` in config.json) and may write a `rope_scaling` of type "default"; verity
    reads `rope_theta` at top level and accepts only llama3 scaling. The values written are the ones the model was built with.
    Returns the list of changes made.
    """
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        data = json.load(f)
    changes = []
    for key in VERITY_KEYS:
        want = shape[key]
        have = data.get(key)
        if have is None or (isinstance(want, float) and float(have) != want) or (
            not isinstance(want, float) and have != want
        ):
            data[key] = want
            changes.append("%s: %r -> %r" % (key, have, want))
    arch = "Qwen2ForCausalLM" if shape["kind"] == "qwen2" else "LlamaForCausalLM"
    if data.get("architectures") != [arch]:
        changes.append("architectures: %r -> %r" % (data.get("architectures"), [arch]))
        data["architectures"] = [arch]
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    if data.get("head_dim") not in (None, head_dim):
        raise SystemExit("config.json has head_dim %r, expected %d" % (data["head_dim"], head_dim))
    scaling = data.get("rope_scaling")
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind in (None, "default"):
            data["rope_scaling"] = None
            changes.append("rope_scaling: %r -> null (plain RoPE)" % (scaling,))
        else:
            raise SystemExit("unexpected rope_scaling %r in %s" % (scaling, path))
    if changes:
        with open(path, "w") as f:
            json.dump(data, f, indent=2)
    return changes


def drop_tied_head(folder):
    """verity refuses a separate lm_head.weight when the embeddings are tied (it would be a
    second copy that could disagree); transformers normally leaves it out. Returns whether
    it had to be removed."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    single = os.path.join(folder, "model.safetensors")
    if not os.path.exists(single):
        index = os.path.join(folder, "model.safetensors.index.json")
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        if "lm_head.weight" in weight_map:
            raise SystemExit("sharded checkpoint with a tied lm_head.weight: not handled")
        return False
    with safe_open(single, framework="pt") as f:
        keys = list(f.keys())
        if "lm_head.weight" not in keys:
            return False
        tensors = {k: f.get_tensor(k) for k in keys if k != "lm_head.weight"}
    save_file(tensors, single, metadata={"format": "pt"})
    return True


def byte_level_tokenizer(folder, eos_id):
    """A 256-byte byte-level BPE tokenizer plus one special token, with no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    # GPT-2's byte → printable character map.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    vocab = {chr(c): i for i, c in enumerate(cs)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|endoftext|>", "add_bos_token": False}, f)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [tok.token_to_id("<|endoftext|>")]}, f)
    return tok.get_vocab_size()


def tokenizer_vocab(folder):
    with open(os.path.join(folder, "tokenizer.json")) as f:
        data = json.load(f)
    ids = list(data["model"]["vocab"].values()) + [t["id"] for t in data.get("added_tokens", [])]
    return max(ids) + 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizers", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default=None, help="comma-separated folder names to make")
    ap.add_argument("--summary", default=None, help="also write the summary JSON here")
    args = ap.parse_args()

    import torch
    import transformers

    os.makedirs(args.out, exist_ok=True)
    summary = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "seed": args.seed,
        "models": {},
    }
    prompts = {}
    only = set(args.only.split(",")) if args.only else None
    for name, shape, tok_name in MODELS:
        if only is not None and name not in only:
            continue
        start = time.time()
        folder = os.path.join(args.out, name)
        if os.path.isdir(folder):
            shutil.rmtree(folder)
        model, config = build_model(shape, args.seed)
        check_effective(model.config, shape, name + " (built)")
        params = sum(p.numel() for p in model.parameters())
        # safetensors (the only format transformers 5 writes; 4.x needs the flag).
        if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
            model.save_pretrained(folder, safe_serialization=True)
        else:
            model.save_pretrained(folder)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        changes = fix_config_for_verity(folder, shape)
        # What transformers reads back from the folder is what verity reads.
        check_effective(transformers.AutoConfig.from_pretrained(folder), shape, name + " (saved)")
        dropped = drop_tied_head(folder)
        src = os.path.join(args.tokenizers, tok_name) if args.tokenizers else None
        if src and os.path.isfile(os.path.join(src, "tokenizer.json")):
            for f in os.listdir(src):
                shutil.copy(os.path.join(src, f), os.path.join(folder, f))
            tokenizer = "carried: " + tok_name
            vocab = tokenizer_vocab(folder)
        else:
            vocab = byte_level_tokenizer(folder, shape["eos_token_id"])
            tokenizer = "byte-level, built here (no carried tokenizer)"
        if vocab > shape["vocab_size"]:
            raise SystemExit("%s: tokenizer has %d ids, embedding %d rows" % (name, vocab, shape["vocab_size"]))
        # Prompt ids: ordinary tokens (not the special ids at the top of the vocabulary).
        rng = random.Random(args.seed * 1000 + len(name))
        hi = min(vocab, shape["vocab_size"])
        low = 256 if hi > 1024 else 0
        prompts[name] = [rng.randrange(low, hi - 512 if hi > 1024 else hi) for _ in range(PROMPT_TOKENS)]
        size = sum(
            os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors")
        )
        summary["models"][name] = {
            "path": folder,
            "architecture": shape["kind"],
            "parameters": params,
            "weights_bytes": size,
            "tokenizer": tokenizer,
            "tokenizer_ids": vocab,
            "config_fixes": changes,
            "dropped_tied_lm_head": dropped,
            "seconds": round(time.time() - start, 2),
        }
        log("%s: %.2fB parameters, %.2f GB in %.1f s; tokenizer %s (%d ids)%s" % (
            name, params / 1e9, size / 1e9, time.time() - start, tokenizer, vocab,
            "; config fixes: " + ", ".join(changes) if changes else ""))
    with open(os.path.join(args.out, "prompts.json"), "w") as f:
        json.dump(prompts, f)
    summary["prompts"] = prompts
    text = json.dumps(summary, indent=2)
    print(text)
    if args.summary:
        with open(args.summary, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
