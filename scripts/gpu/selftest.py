#!/usr/bin/env python3
"""A CPU-only test of the GPU check's judging code (compare.py, report.py) on synthetic
files in the formats `verity bench logits|decode|train`, hf_logits.py, hf_generate.py and
bandwidth.py write. Needs no torch, no GPU, no verity binary:

    python3 scripts/gpu/selftest.py

It checks that close rows pass and a broken one fails, that a near-tie excuses a greedy
difference and a wide gap does not, and that the report judges the bars and names what
was not measured.
"""

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
V = 2000
STEPS = 6


def row(rng, sigma=1.0):
    return [rng.gauss(0.0, sigma) for _ in range(V)]


def noisy(base, rng, eps):
    return [x + rng.uniform(-eps, eps) for x in base]


def greedy_from(rows):
    out = []
    for r in rows:
        order = sorted(range(V), key=lambda i: -r[i])
        out.append({"id": order[0], "top2_gap": r[order[0]] - r[order[1]], "logprob": -1.0,
                    "top5": [[i, r[i]] for i in order[:5]]})
    return out


def stats(shift=0.0):
    return {"logprob": -1.0 + shift, "entropy": 7.0 + shift, "self_certainty": 0.5 + shift, "confidence": 2.0 + shift}


def verity_file(path, first, rows, device, ids, engine_tokens=None, device_shift=0.0):
    greedy = greedy_from(rows)
    for g in greedy:
        g["stats"] = stats()
        g["device_stats"] = stats(device_shift)
    data = {
        "device": device,
        "prompt_ids": ids,
        "vocab_size": V,
        "logits": first,
        "greedy": greedy,
        "engine": {"tokens": engine_tokens or [g["id"] for g in greedy], "stats": [stats() for _ in greedy]},
    }
    json.dump(data, open(path, "w"))


def hf_file(path, ref_rows, bf16_rows, ids):
    json.dump({
        "prompt_ids": ids,
        "f32": {"logits": ref_rows[0], "greedy": greedy_from(ref_rows)},
        "bf16": {"logits": bf16_rows[0], "greedy": greedy_from(bf16_rows)},
    }, open(path, "w"))


def compare(tmp, name, extra):
    out = os.path.join(tmp, "cmp_%s.json" % name)
    subprocess.check_call([sys.executable, os.path.join(HERE, "compare.py"), "--name", name, "--out", out] + extra,
                          stdout=subprocess.DEVNULL)
    result = json.load(open(out))
    return (0 if result["pass"] else 1), result


def main():
    rng = random.Random(1)
    tmp = tempfile.mkdtemp(prefix="gpu-selftest-")
    failures = []

    def check(cond, what):
        print(("ok   " if cond else "FAIL ") + what)
        if not cond:
            failures.append(what)

    try:
        ids = [5, 6, 7]
        ref = [row(rng) for _ in range(STEPS)]
        hf16 = [noisy(r, rng, 0.01) for r in ref]
        cuda = [noisy(r, rng, 0.012) for r in ref]
        cpu = [noisy(r, rng, 1e-6) for r in ref]
        p = lambda n: os.path.join(tmp, n)
        hf_file(p("hf.json"), ref, hf16, ids)
        verity_file(p("cuda.json"), cuda[0], cuda, "cuda:0", ids)
        verity_file(p("cpu.json"), cpu[0], cpu, "cpu", ids)
        rc, r = compare(tmp, "good", ["--hf", p("hf.json"), "--verity-cuda", p("cuda.json"), "--verity-cpu", p("cpu.json")])
        check(rc == 0 and r["pass"], "close rows pass (%s)" % {k: v.get("pass") for k, v in r["checks"].items()})
        check(r["checks"]["f32_logits"]["verity"] < 1e-5, "f32 error is tiny")

        rc, r = compare(tmp, "cpuonly", ["--hf", p("hf.json"), "--verity-cpu", p("cpu.json")])
        check(rc == 0 and "f32_logits" in r["checks"] and "bf16_logits" not in r["checks"],
              "without a CUDA file the CPU one is still compared")

        # A broken implementation: a logit off by 0.5σ fails the bf16 bound.
        bad = [list(x) for x in cuda]
        bad[0][17] += 0.5
        verity_file(p("bad.json"), bad[0], bad, "cuda:0", ids)
        rc, r = compare(tmp, "bad", ["--hf", p("hf.json"), "--verity-cuda", p("bad.json")])
        check(rc != 0 and not r["checks"]["bf16_logits"]["pass"], "a 0.5σ error fails")

        # Greedy: a different token at a near-tie passes, at a wide gap fails.
        tie_rows = [list(x) for x in ref]
        order = sorted(range(V), key=lambda i: -tie_rows[2][i])
        a, b = order[0], order[1]
        tie_rows[2][b] = tie_rows[2][a] - 0.001  # near-tie at step 2 in the reference...
        hf_tie = [list(x) for x in tie_rows]
        v_tie = [list(x) for x in tie_rows]
        v_tie[2][b] = tie_rows[2][a] + 0.001  # ...which verity breaks the other way
        hf_file(p("hf_tie.json"), tie_rows, hf_tie, ids)
        verity_file(p("tie.json"), v_tie[0], v_tie, "cuda:0", ids)
        rc, r = compare(tmp, "tie", ["--hf", p("hf_tie.json"), "--verity-cuda", p("tie.json")])
        g = r["checks"]["greedy_bf16"]
        check(g["first_difference"] == 2 and g["pass"], "a near-tie excuses a greedy difference (%s)" % g)
        wide = [list(x) for x in tie_rows]
        wide[2][b] = tie_rows[2][a] + 1.0
        verity_file(p("wide.json"), wide[0], wide, "cuda:0", ids)
        rc, r = compare(tmp, "wide", ["--hf", p("hf_tie.json"), "--verity-cuda", p("wide.json")])
        check(not r["checks"]["greedy_bf16"]["pass"], "a greedy difference at a wide gap fails")

        # Device statistics off by 0.01 nats fail; an engine trace that differs fails.
        verity_file(p("stats.json"), cuda[0], cuda, "cuda:0", ids, device_shift=0.01)
        rc, r = compare(tmp, "stats", ["--hf", p("hf.json"), "--verity-cuda", p("stats.json")])
        check(not r["checks"]["device_stats_cuda"]["pass"], "device statistics 0.01 nats off fail")
        eng = [g["id"] for g in greedy_from(cuda)]
        eng[1] = (eng[1] + 1) % V
        verity_file(p("engine.json"), cuda[0], cuda, "cuda:0", ids, engine_tokens=eng)
        rc, r = compare(tmp, "engine", ["--hf", p("hf.json"), "--verity-cuda", p("engine.json")])
        check(not r["checks"]["engine_cuda"]["pass"], "an engine trace that leaves the direct one fails")

        # The adapter's effect: measured against the base files.
        moved = [noisy(r, rng, 0.3) for r in ref]
        hf_file(p("peft_hf.json"), moved, [noisy(r, rng, 0.01) for r in moved], ids)
        verity_file(p("peft_v.json"), noisy(moved[0], rng, 0.01), [noisy(r, rng, 0.01) for r in moved], "cuda:0", ids)
        rc, r = compare(tmp, "peft", ["--hf", p("peft_hf.json"), "--verity-cuda", p("peft_v.json"),
                                      "--hf-base", p("hf.json"), "--verity-base", p("cuda.json")])
        check(r["checks"]["adapter_effect"]["pass"], "an adapter that moves the logits counts as effective")

        # The report: a full set of parts, one missing.
        out = p("out")
        for d in ("parts", "status", "logs"):
            os.makedirs(os.path.join(out, d))
        shutil.copy(p("cmp_good.json"), os.path.join(out, "parts", "numerics_qwen2.5-1.5b.json"))
        shutil.copy(p("cmp_peft.json"), os.path.join(out, "parts", "numerics_peft.json"))
        run = lambda tps, b: {"batch": b, "tokens_per_second": tps, "generated_tokens": b * 256, "seconds": b * 256 / tps}
        json.dump({"weight_bytes_per_token": 3.1e9, "batches": [run(150, 1), run(1800, 16), run(5000, 64)],
                   "stats": [{"batch": 64, "with_stats": run(5000, 64), "without_stats": run(5100, 64), "extra_time_percent": 2.0}]},
                  open(os.path.join(out, "parts", "decode_verity.json"), "w"))
        json.dump({"batches": [run(40, 1), run(600, 16), run(1500, 64)]}, open(os.path.join(out, "parts", "decode_hf_dynamic.json"), "w"))
        json.dump({"batches": [run(90, 1)]}, open(os.path.join(out, "parts", "decode_hf_static.json"), "w"))
        json.dump({"copy_bandwidth_bytes_per_second": 4.0e12, "device": "NVIDIA H200"}, open(os.path.join(out, "parts", "bandwidth.json"), "w"))
        json.dump({"step_seconds": 4.0, "steps": [{"seconds": 6.0, "handoff_seconds": 2e-6, "applied": True},
                                                  {"seconds": 4.0, "handoff_seconds": 3e-6, "applied": True}]},
                  open(os.path.join(out, "parts", "train.json"), "w"))
        for name, rc in (("decode_verity", 0), ("train", 0), ("numerics_llama-small", 124)):
            json.dump({"name": name, "rc": rc, "seconds": 1.0, "limit": 60, "timed_out": rc == 124, "skipped": None},
                      open(os.path.join(out, "status", name + ".json"), "w"))
        open(os.path.join(out, "logs", "numerics_llama-small.log"), "w").write("killed\n")
        open(os.path.join(out, "env.txt"), "w").write("gpu=NVIDIA H200\ndriver=580.00\n")
        subprocess.check_call([sys.executable, os.path.join(HERE, "report.py"), out], stdout=subprocess.DEVNULL)
        rep = json.load(open(os.path.join(out, "gpu-check.json")))
        rows = {r["metric"]: r for r in rep["rows"]}
        b64 = [r for m, r in rows.items() if m.startswith("decode tok/s") and "batch 64" in m][0]
        check(abs(b64["ratio"] - 5000 / 1500) < 1e-9 and b64["pass"], "batch 64: verity / best peer, judged ≥ 3×")
        b1 = [r for m, r in rows.items() if m.startswith("decode tok/s") and "batch 1 " in m][0]
        check(b1["peer"] == 90, "the peer's faster cache (static) is kept per batch")
        roof = [r for m, r in rows.items() if m.startswith("batch-1 fraction")][0]
        check(abs(roof["verity"] - 150 * 3.1e9 / 4.0e12) < 1e-9 and not roof["pass"], "roofline fraction and its bar")
        check(rows["verity batch 64 / batch 1"]["pass"] is True, "batch 64 ≥ 20× batch 1 (33×)")
        llama = [r for m, r in rows.items() if m.startswith("Llama") and "bf16, max" in m][0]
        check("timed out" in llama.get("not_measured", ""), "a timed-out part is named as not measured")
        md = open(os.path.join(out, "gpu-check.md")).read()
        check(md.count("\n|") >= len(rep["rows"]) + 1 and "\\|Δ\\|" in md, "markdown rows, pipes escaped")
    finally:
        shutil.rmtree(tmp)
    if failures:
        print("%d failed" % len(failures))
        sys.exit(1)
    print("all passed")


if __name__ == "__main__":
    main()
