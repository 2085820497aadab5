#!/usr/bin/env python3
"""The peer side of the speed check: transformers `generate` tokens/s by batch size.

    hf_generate.py --model DIR --batches 64,16,1 --prompt-tokens 128 --new-tokens 256
                   --cache dynamic|static --out FILE.json

Same workload as `verity bench decode --prompt-tokens 128 --tokens 256`: each batch row a
128-token prompt, exactly 256 new tokens (min_new_tokens = max_new_tokens, so that an EOS
cannot end a row early), bf16, wall time of the whole `generate` call (prefill included,
as on verity's side). The peer gets its best settings: greedy decoding (cheaper than the
temperature sampling verity is measured with), SDPA attention, and the script runs once
with the dynamic cache and once with the static one (which newer transformers compile with
torch.compile); the report keeps the faster per batch. Each batch size is warmed up once
with the same shapes (a static cache compiles on its first call). The JSON is rewritten
after every batch so that a run cut short by its timeout keeps what it measured.
"""

import argparse
import json
import sys
import time


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--batches", default="64,16,1")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--cache", choices=["dynamic", "static"], default="dynamic")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch
    import transformers

    # (`torch_dtype` is called `dtype` from transformers 5 on.)
    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, **{key: torch.bfloat16})
    model = model.to(device="cuda", dtype=torch.bfloat16).eval()
    vocab = model.config.vocab_size
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = model.config.eos_token_id
    report = {
        "model": args.model,
        "cache": args.cache,
        "decoding": "greedy",
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "batches": [],
    }

    def save():
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)

    gen = torch.Generator(device="cuda")
    gen.manual_seed(0)
    for b in [int(x) for x in args.batches.split(",") if x.strip()]:
        ids = torch.randint(256, vocab - 512, (b, args.prompt_tokens), device="cuda", generator=gen)
        mask = torch.ones_like(ids)

        def run(new_tokens):
            kwargs = dict(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=0,
            )
            if args.cache == "static":
                kwargs["cache_implementation"] = "static"
            torch.cuda.synchronize()
            t0 = time.time()
            with torch.no_grad():
                out = model.generate(**kwargs)
            torch.cuda.synchronize()
            seconds = time.time() - t0
            return (out.shape[1] - args.prompt_tokens) * b, seconds

        t0 = time.time()
        # Warm-up: the static cache compiles for these exact shapes, so it runs in full.
        run(args.new_tokens if args.cache == "static" else 8)
        warmup = time.time() - t0
        tokens, seconds = run(args.new_tokens)
        row = {
            "batch": b,
            "tokens_per_second": tokens / seconds,
            "generated_tokens": tokens,
            "seconds": seconds,
            "warmup_seconds": warmup,
        }
        report["batches"].append(row)
        save()
        log("%s cache, batch %d: %.1f tok/s (warm-up %.1f s)" % (args.cache, b, tokens / seconds, warmup))
    save()


if __name__ == "__main__":
    main()
