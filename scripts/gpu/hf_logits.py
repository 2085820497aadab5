#!/usr/bin/env python3
"""The peer side of the numerics check: transformers' logits for given prompt ids.

    hf_logits.py --model DIR --ids 1,2,3 [--steps 16] [--adapter PEFT_DIR] --out FILE.json

Loads the Hugging Face folder on the GPU, optionally wraps it in the PEFT adapter, and for
each of two precisions writes the last prompt position's logits row and a greedy
continuation of --steps tokens (each with its log-prob and the gap between the two largest
logits), in the same layout `verity bench logits` writes:

- "bf16": the model as stored (bf16 weights and activations), what verity's CUDA path is
  compared with;
- "f32": the same weights converted to f32 (exact: every bf16 value is an f32 value), TF32
  off. This is the reference both bf16 implementations are measured against, and what
  verity's CPU (f32) path must match closely.
"""

import argparse
import inspect
import json
import sys
import time


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def load(path, torch, transformers):
    """The HF folder in bf16 on the GPU (`torch_dtype` is called `dtype` from transformers 5
    on; the cast after it is exact: the file holds bf16)."""
    major = int(transformers.__version__.split(".")[0])
    key = "dtype" if major >= 5 else "torch_dtype"
    model = transformers.AutoModelForCausalLM.from_pretrained(path, **{key: torch.bfloat16})
    return model.to(device="cuda", dtype=torch.bfloat16).eval()


def cache_argument(model):
    """The forward's name for the KV cache: `cache` from transformers 5.x (where
    `past_key_values` is deprecated), `past_key_values` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def cache_of(output):
    past = getattr(output, "cache", None)
    return past if past is not None else output.past_key_values


def greedy(model, ids, steps, torch):
    """Last-position logits of `ids` and `steps` greedy tokens, one forward each (KV cache)."""
    out = {"logits": None, "greedy": []}
    cache = cache_argument(model)
    with torch.no_grad():
        x = torch.tensor([ids], device="cuda")
        res = model(input_ids=x, use_cache=True)
        past = cache_of(res)
        row = res.logits[0, -1].float()
        out["logits"] = row.cpu().tolist()
        for _ in range(steps):
            top = torch.topk(row, 5)
            chosen = int(torch.argmax(row))
            logprob = float(torch.log_softmax(row.double(), dim=-1)[chosen])
            vals = top.values.tolist()
            out["greedy"].append({
                "id": chosen,
                "logprob": logprob,
                "top2_gap": vals[0] - vals[1],
                "top5": [[int(i), float(v)] for i, v in zip(top.indices.tolist(), vals)],
            })
            step = torch.tensor([[chosen]], device="cuda")
            res = model(input_ids=step, use_cache=True, **{cache: past})
            past = cache_of(res)
            row = res.logits[0, -1].float()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--ids", required=True)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--adapter", default=None)
    ap.add_argument("--precisions", default="bf16,f32")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch
    import transformers

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    ids = [int(t) for t in args.ids.split(",") if t.strip()]
    start = time.time()
    model = load(args.model, torch, transformers)
    peft_version = None
    if args.adapter:
        import peft

        peft_version = peft.__version__
        model = peft.PeftModel.from_pretrained(model, args.adapter).eval()
    report = {
        "model": args.model,
        "adapter": args.adapter,
        "prompt_ids": ids,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft_version,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "load_seconds": time.time() - start,
    }
    for precision in args.precisions.split(","):
        t0 = time.time()
        if precision == "f32":
            model = model.float()
        elif precision != "bf16":
            raise SystemExit("unknown precision " + precision)
        report[precision] = greedy(model, ids, args.steps, torch)
        report[precision]["seconds"] = time.time() - t0
        log("%s: greedy %s" % (precision, [g["id"] for g in report[precision]["greedy"]]))
    with open(args.out, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
