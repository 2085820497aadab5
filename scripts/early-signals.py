#!/usr/bin/env python3
"""How much the first k samples of a question say about whether majority@n gets it right.

Reads a trace file written by `verity eval --out` (its "sample" and "rule" lines) and
prints, for each early signal, the AUROC of that signal over the first k samples (in
drawing order) against majority vote's correctness over all n. An answer-agreement
stopping rule (ESC, adaptive consistency) can only save tokens without losing answers
where the first samples carry this information: an AUROC near 0.5 means stopping early
changes right and wrong answers alike.

usage: scripts/early-signals.py TRACES.jsonl [K ...]   (K defaults to 2 and 4)
"""

import collections
import json
import statistics
import sys


def auroc(positives, negatives):
    """Probability that a random positive scores above a random negative (ties count half)."""
    if not positives or not negatives:
        return float("nan")
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    path = sys.argv[1]
    ks = [int(k) for k in sys.argv[2:]] or [2, 4]
    samples = collections.defaultdict(list)
    majority_right = {}
    with open(path) as f:
        for line in f:
            d = json.loads(line)
            if d["kind"] == "sample":
                samples[d["question"]].append(d)
            elif d["kind"] == "rule" and d["rule"] == "majority":
                majority_right[d["question"]] = d["correct"]
    if not majority_right:
        sys.exit(f"{path}: no 'majority' rule lines (run verity eval with --select majority)")
    for s in samples.values():
        s.sort(key=lambda d: d["index"])

    def leader_share(s):
        # As in verity's rules, a sample without an answer does not vote.
        votes = collections.Counter(d["answer"] for d in s if d["answer"] is not None)
        return max(votes.values(), default=0) / len(s)

    signals = {
        "leader's share of the first k answers": leader_share,
        "mean length (shorter scores higher)": lambda s: -statistics.mean(
            len(d["token_end"]) for d in s
        ),
    }
    for score in sorted(samples[next(iter(samples))][0]["scores"]):
        signals[f"mean {score}"] = lambda s, score=score: statistics.mean(
            d["scores"][score] for d in s
        )

    right = sum(majority_right.values())
    print(f"{path}: {len(majority_right)} questions, majority right on {right}")
    print(f"{'signal over the first k samples':<44}" + "".join(f"  k = {k:<3}" for k in ks))
    for name, signal in signals.items():
        row = []
        for k in ks:
            pos, neg = [], []
            for q, s in samples.items():
                if q in majority_right:
                    (pos if majority_right[q] else neg).append(signal(s[:k]))
            row.append(auroc(pos, neg))
        print(f"{name:<44}" + "".join(f"  {a:>7.3f}" for a in row))


if __name__ == "__main__":
    main()
