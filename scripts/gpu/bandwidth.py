#!/usr/bin/env python3
"""Measured HBM bandwidth: the denominator of the decode roofline.

    bandwidth.py --out FILE.json [--gib 4] [--iters 20]

Times device-to-device copies of a --gib GiB buffer with CUDA events and reports
(bytes read + bytes written) / time, the best of three rounds. Batch-1 decode reads every
weight once per token, so tokens/s × weight bytes / this bandwidth is the fraction of the
roofline a decoder reaches (a copy is about the best a real kernel streams).
"""

import argparse
import json


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--gib", type=float, default=4.0)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()

    import torch

    n = int(args.gib * (1 << 30))
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    src.fill_(1)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    best = 0.0
    for _ in range(3):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.iters):
            dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1000.0
        best = max(best, 2.0 * n * args.iters / seconds)
    props = torch.cuda.get_device_properties(0)
    report = {
        "device": props.name,
        "memory_bytes": props.total_memory,
        "buffer_bytes": n,
        "iters": args.iters,
        "copy_bandwidth_bytes_per_second": best,
        "counting": "bytes read + bytes written",
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print("%s: %.0f GB/s device-to-device copy (read + write)" % (props.name, best / 1e9))


if __name__ == "__main__":
    main()
