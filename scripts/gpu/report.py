#!/usr/bin/env python3
"""Collects the parts of a GPU check into OUT/gpu-check.json and OUT/gpu-check.md.

    report.py OUT_DIR [--command "bash scripts/gpu-check.sh OUT"]

Reads OUT/env.txt (key=value lines from gpu-check.sh), OUT/status/*.json (each part's exit
code, time, timeout) and OUT/parts/*.json (what each part measured), and judges the bars of
issue 13. A part that failed or was skipped shows as "not measured" with its reason; the
table never shows a number that was not measured. Plain Python (no torch, no numpy).
"""

import argparse
import datetime
import glob
import json
import os

BAR_B64_VS_PEER = 3.0
BAR_B64_VS_B1 = 20.0
BAR_ROOFLINE_B1 = 0.30
BAR_STATS_EXTRA_PERCENT = 3.0
BAR_GRPO_SECONDS = 10.0
BAR_HANDOFF_SECONDS = 1e-3


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_env(out):
    env = {}
    try:
        with open(os.path.join(out, "env.txt")) as f:
            for line in f:
                if "=" in line:
                    k, v = line.rstrip("\n").split("=", 1)
                    env[k] = v
    except OSError:
        pass
    return env


def log_tail(out, name, lines=15):
    try:
        with open(os.path.join(out, "logs", name + ".log"), errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return None


def fmt(x, unit=""):
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, str):
        return x
    if abs(x) >= 100:
        s = "%.0f" % x
    elif abs(x) >= 1:
        s = "%.2f" % x
    elif x == 0:
        s = "0"
    elif abs(x) >= 1e-3:
        s = "%.4f" % x
    else:
        s = "%.2e" % x
    return s + unit


def cell_text(text):
    """A Markdown table cell: pipes escaped, one line."""
    return str(text).replace("|", "\\|").replace("\n", " ")


class Table:
    def __init__(self, statuses, out):
        self.rows = []
        self.statuses = statuses
        self.out = out

    def why_missing(self, parts):
        reasons = []
        for p in parts:
            st = self.statuses.get(p)
            if st is None:
                reasons.append("%s: did not run" % p)
            elif st.get("skipped"):
                reasons.append("%s: skipped (%s)" % (p, st["skipped"]))
            elif st.get("timed_out"):
                reasons.append("%s: timed out after %ss" % (p, st.get("limit")))
            elif st.get("rc") not in (0, None):
                reasons.append("%s: exit %s" % (p, st.get("rc")))
        return "; ".join(reasons) or "not measured"

    def add(self, metric, verity=None, peer=None, ratio=None, bar=None, ok=None, parts=(), note=None, unit=""):
        measured = verity is not None or peer is not None or ok is not None
        row = {
            "metric": metric,
            "verity": verity,
            "peer": peer,
            "ratio": ratio,
            "bar": bar,
            "pass": ok,
            "unit": unit,
        }
        if not measured:
            row["not_measured"] = self.why_missing(parts)
        if note:
            row["note"] = note
        self.rows.append(row)

    def markdown(self):
        lines = [
            "| metric | verity | peer | ratio | bar | result |",
            "|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            if "not_measured" in r:
                result = "not measured: " + r["not_measured"]
            elif r["pass"] is None:
                result = "info"
            else:
                result = "**pass**" if r["pass"] else "**FAIL**"
            if r.get("note"):
                result += " (" + r["note"] + ")"
            cells = [
                r["metric"], fmt(r["verity"], r["unit"]), fmt(r["peer"], r["unit"]),
                fmt(r["ratio"], "×") if isinstance(r["ratio"], (int, float)) else fmt(r["ratio"]),
                r["bar"] or "—", result,
            ]
            lines.append("| " + " | ".join(cell_text(c) for c in cells) + " |")
        return "\n".join(lines)


def by_batch(rows):
    return {r["batch"]: r for r in rows or []}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--command", default="bash scripts/gpu-check.sh OUT")
    args = ap.parse_args()
    out = args.out
    env = read_env(out)
    statuses = {}
    for path in glob.glob(os.path.join(out, "status", "*.json")):
        st = read_json(path)
        if st:
            statuses[st["name"]] = st
    parts = {}
    for path in glob.glob(os.path.join(out, "parts", "*.json")):
        parts[os.path.basename(path)[:-5]] = read_json(path)
    t = Table(statuses, out)

    # Speed.
    dec = parts.get("decode_verity") or {}
    vb = by_batch(dec.get("batches"))
    hf_runs = {c: by_batch((parts.get("decode_hf_" + c) or {}).get("batches")) for c in ("dynamic", "static")}
    peer = {}
    for c, rows in hf_runs.items():
        for b, r in rows.items():
            if b not in peer or r["tokens_per_second"] > peer[b]["tokens_per_second"]:
                peer[b] = dict(r, cache=c)
    speed_parts = ("decode_verity", "decode_hf_dynamic", "decode_hf_static")
    for b in (64, 16, 1):
        v = vb.get(b, {}).get("tokens_per_second")
        p = peer.get(b, {}).get("tokens_per_second")
        ratio = v / p if v and p else None
        t.add("decode tok/s, Qwen2.5-1.5B shape, bf16, batch %d (128-token prompt, 256 new)" % b,
              v, p, ratio,
              "≥ %g× transformers" % BAR_B64_VS_PEER if b == 64 else None,
              (ratio >= BAR_B64_VS_PEER) if (b == 64 and ratio is not None) else None,
              speed_parts, note=("peer: %s cache, greedy" % peer[b]["cache"]) if b in peer else None)
    v1, v64 = vb.get(1, {}).get("tokens_per_second"), vb.get(64, {}).get("tokens_per_second")
    t.add("verity batch 64 / batch 1", v64, v1, v64 / v1 if v1 and v64 else None, "≥ %g×" % BAR_B64_VS_B1,
          (v64 / v1 >= BAR_B64_VS_B1) if v1 and v64 else None, ("decode_verity",))
    bw = (parts.get("bandwidth") or {}).get("copy_bandwidth_bytes_per_second")
    wbytes = dec.get("weight_bytes_per_token")
    roof = v1 * wbytes / bw if v1 and wbytes and bw else None
    p1 = peer.get(1, {}).get("tokens_per_second")
    peer_roof = p1 * wbytes / bw if p1 and wbytes and bw else None
    t.add("batch-1 fraction of the HBM roofline (tok/s × weight bytes / copy bandwidth)", roof, peer_roof, None,
          "≥ %d%%" % (BAR_ROOFLINE_B1 * 100), (roof >= BAR_ROOFLINE_B1) if roof is not None else None,
          ("decode_verity", "bandwidth"),
          note="weights %.2f GB/token, copy bandwidth %.0f GB/s" % (wbytes / 1e9, bw / 1e9) if wbytes and bw else None)
    for s in dec.get("stats") or []:
        b = s["batch"]
        extra = s["extra_time_percent"]
        t.add("statistics on vs off, batch %d (extra time)" % b, extra, None, None,
              "≤ %g%%" % BAR_STATS_EXTRA_PERCENT if b == 64 else None,
              (extra <= BAR_STATS_EXTRA_PERCENT) if b == 64 else None, ("decode_verity",), unit="%",
              note="%.0f vs %.0f tok/s" % (s["with_stats"]["tokens_per_second"], s["without_stats"]["tokens_per_second"]))
    if not any(s["batch"] == 64 for s in dec.get("stats") or []):
        t.add("statistics on vs off, batch 64 (extra time)", None, None, None, "≤ %g%%" % BAR_STATS_EXTRA_PERCENT,
              None, ("decode_verity",))

    # Training.
    tr = parts.get("train") or {}
    step = tr.get("step_seconds")
    handoff = max((s["handoff_seconds"] for s in tr.get("steps") or [] if s.get("applied")), default=None)
    skipped = [s.get("skipped") for s in tr.get("steps") or [] if s.get("skipped")]
    t.add("GRPO trainer step: 8 prompts × 8 samples × 256 tokens, LoRA r16 all linear (s)", step, None, None,
          "≤ %g s" % BAR_GRPO_SECONDS, (step <= BAR_GRPO_SECONDS) if step is not None else None, ("train",),
          note=("steps skipped: %s" % skipped) if skipped else None)
    rollout = 64 * 256 / v64 if v64 else None
    total = step + rollout if step is not None and rollout is not None else None
    t.add("GRPO step with its rollouts (trainer step + 64×256 tokens at verity's batch-64 rate, estimate) (s)",
          total, None, None, "≤ %g s" % BAR_GRPO_SECONDS, (total <= BAR_GRPO_SECONDS) if total is not None else None,
          ("train", "decode_verity"))
    t.add("trainer → decoder hand-off (µs)", handoff * 1e6 if handoff is not None else None, None, None,
          "≤ %g µs" % (BAR_HANDOFF_SECONDS * 1e6), (handoff <= BAR_HANDOFF_SECONDS) if handoff is not None else None,
          ("train",))

    # Numerics.
    for name, label in (("qwen2.5-1.5b", "Qwen2.5-1.5B shape"), ("llama-small", "Llama (SmolLM2-135M shape)")):
        n = parts.get("numerics_" + name) or {}
        c = n.get("checks") or {}
        srcs = ("logits_%s_verity_cuda" % name, "logits_%s_hf" % name, "numerics_" + name)
        b16 = c.get("bf16_logits")
        t.add("%s: last-position logits, bf16, max |Δ| to the f32 reference (σ)" % label,
              b16 and b16["verity"], b16 and b16["transformers"], None,
              "≤ %s σ" % fmt(b16["bound"]) if b16 else "≤ max(2× peer, 2^-6) σ", b16 and b16["pass"], srcs)
        d = n.get("verity_cuda_vs_transformers_bf16_max_abs")
        t.add("%s: verity CUDA vs transformers CUDA, max |Δ| (σ)" % label,
              d / n["reference_sigma"] if d is not None and n.get("reference_sigma") else None, None, None, None, None, srcs)
        f32 = c.get("f32_logits")
        t.add("%s: verity CPU f32 vs transformers f32, max |Δ| (σ)" % label, f32 and f32["verity"], None, None,
              "≤ %g σ" % f32["bound"] if f32 else None, f32 and f32["pass"],
              srcs + ("logits_%s_verity_cpu" % name,))
        for key, what in (("greedy_bf16", "greedy tokens, verity CUDA vs transformers bf16"),
                          ("greedy_f32", "greedy tokens, verity CPU vs transformers f32")):
            g = c.get(key)
            note = None
            if g and g.get("first_difference") is not None:
                note = "first difference at step %d, top-2 gap %s vs near-tie bound %s" % (
                    g["first_difference"], fmt(g["top2_gap"]), fmt(g["near_tie_bound"]))
            t.add("%s: %s (tokens agreeing)" % (label, what), g and g["agree"], g and g["compared"], None,
                  "agree up to a near-tie", g and g["pass"], srcs, note=note)
        for dev in ("cuda", "cpu"):
            s = c.get("device_stats_" + dev)
            for check, what in ((s, "statistics on the %s device" % dev), (c.get("engine_" + dev), "engine trace on %s" % dev)):
                if check and "error" in check:
                    t.add("%s: %s" % (label, what), None, None, None, None, False, srcs, note="error: " + check["error"][:300])
            if s and "max_abs" in s:
                t.add("%s: statistics on the %s device vs src/stats.rs on the copied row (max |Δ| nats)" % (label, dev),
                      max(s["max_abs"].values()), None, None, "≤ %g" % s["bound"], s["pass"], srcs)
            e = c.get("engine_" + dev)
            if e and "tokens" in e:
                t.add("%s: engine greedy trace vs direct forward_step on %s (tokens; stats max |Δ| nats)" % (label, dev),
                      e["tokens"]["agree"], e["tokens"]["compared"], None,
                      "agree; stats ≤ %g" % e["stats_bound"], e["pass"], srcs,
                      note="stats max |Δ| %s" % fmt(max(e["stats_max_abs"].values())))

    # PEFT.
    pe = parts.get("numerics_peft") or {}
    pc = pe.get("checks") or {}
    b16 = pc.get("bf16_logits")
    srcs = ("train", "peft_verity", "peft_hf", "numerics_peft")
    t.add("PEFT round trip: verity-trained adapter in peft, bf16 logits max |Δ| to the f32 reference (σ)",
          b16 and b16["verity"], b16 and b16["transformers"], None,
          "≤ %s σ" % fmt(b16["bound"]) if b16 else "≤ max(2× peer, 2^-6) σ", b16 and b16["pass"], srcs)
    eff = pc.get("adapter_effect")
    t.add("PEFT round trip: the adapter's own effect on the logits (σ; must dwarf the bound)",
          pe.get("verity_adapter_effect_sigma"), eff and eff["effect"], None, "> 5× the bound",
          eff and eff["pass"], srcs)
    g = pc.get("greedy_bf16")
    t.add("PEFT round trip: greedy tokens with the adapter (agreeing)", g and g["agree"], g and g["compared"], None,
          "agree up to a near-tie", g and g["pass"], srcs)

    # Test binaries.
    for r in (parts.get("tests") or {}).get("binaries", []):
        t.add("test binary %s" % r["name"], r.get("summary"), None, None, "exit 0", r["rc"] == 0, ("tests",),
              note="%.0f s" % r["seconds"])

    bw_row = parts.get("bandwidth") or {}
    t.add("HBM copy bandwidth (GB/s, read + write)", bw / 1e9 if bw else None, None, None, None, None, ("bandwidth",))

    failures = {}
    for name, st in sorted(statuses.items()):
        if st.get("rc") not in (0, None) or st.get("timed_out") or st.get("skipped"):
            failures[name] = dict(st, log_tail=log_tail(out, name))
    judged = [r["pass"] for r in t.rows if r["pass"] is not None]
    report = {
        "date": env.get("date") or datetime.datetime.utcnow().isoformat() + "Z",
        "gpu": env.get("gpu") or bw_row.get("device"),
        "driver": env.get("driver"),
        "command": args.command,
        "elapsed_seconds": env.get("elapsed_seconds"),
        "environment": env,
        "bars_passed": sum(1 for p in judged if p),
        "bars_judged": len(judged),
        "rows": t.rows,
        "parts": {k: v for k, v in parts.items()},
        "status": statuses,
        "problems": failures,
    }
    with open(os.path.join(out, "gpu-check.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    md = [
        "# verity GPU check",
        "",
        "- date: %s" % report["date"],
        "- GPU: %s, driver %s" % (report["gpu"], report["driver"]),
        "- command: `%s`" % args.command,
        "- verity: %s" % env.get("verity_version", "?"),
        "- peer: torch %s, transformers %s, peft %s" % (env.get("torch", "?"), env.get("transformers", "?"), env.get("peft", "?")),
        "- elapsed: %s s; bars passed: %d of %d judged" % (env.get("elapsed_seconds", "?"), report["bars_passed"], report["bars_judged"]),
        "",
        t.markdown(),
        "",
    ]
    if failures:
        md.append("## Parts that failed, timed out or were skipped")
        md.append("")
        for name, st in failures.items():
            what = st.get("skipped") or ("timed out after %ss" % st.get("limit") if st.get("timed_out") else "exit %s" % st.get("rc"))
            md.append("- **%s**: %s" % (name, what))
            if st.get("log_tail"):
                md.append("")
                md.append("  ```")
                md.extend("  " + l for l in st["log_tail"].rstrip().splitlines())
                md.append("  ```")
        md.append("")
    with open(os.path.join(out, "gpu-check.md"), "w") as f:
        f.write("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
