#!/usr/bin/env python3
"""Soak and stall probe for `verity serve` (not part of CI; a few minutes on 2 cores).

Starts the server itself on a free port with an adapter folder, then:

1. probe: the stalls one local client could cause before (issue #16, item 4):
   - /health latency while four ~1.9 MB prompts are sent at once (each refused as too
     long);
   - how long a 4-token request waits while a ~2,400-token prompt is prefilled, against
     the same request alone;
   - 40 half-open connections (half-sent headers): how many are still open after the
     header timeout.
2. soak: C clients x R requests (completions and chats, n of 1-4, streamed or not, some
   with a verifier), mixed with feedback on their traces, learn steps and adapter saves;
   then the runtime's counters must be back to 0, no request may fail, and the server's
   RSS after the run is compared with its RSS after warm-up (the first 25% of requests,
   which include the first learn steps and adapter saves: the optimizer state and the
   autograd buffers are allocated then); the RSS every 5% is reported too.

usage: scripts/soak.py [--verity target/release/verity] [--model PATH]
                       [--clients 64] [--requests 100] [--out soak.json]
Prints one JSON object with every figure; exits 1 if a soak bar fails.
"""

import argparse
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time

HEADER_TIMEOUT_S = 5.0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port, method, path, body=None, timeout=600):
    """(status, parsed JSON or raw text, seconds)."""
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    conn.request(method, path, body=data, headers=headers)
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    elapsed = time.monotonic() - started
    ctype = resp.getheader("content-type", "")
    if ctype.startswith("application/json"):
        return resp.status, json.loads(raw), elapsed
    return resp.status, raw.decode("utf-8", "replace"), elapsed


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def wait_healthy(port, proc, limit=300):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"verity serve exited with {proc.returncode}")
        try:
            status, _, _ = request(port, "GET", "/health", timeout=2)
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    sys.exit("verity serve did not become healthy")


def probe(port):
    out = {}
    # /health while four ~1.9 MB prompts arrive at once.
    big = {"prompt": "word " * 380_000, "max_tokens": 1}
    latencies, answers = [], []
    done = threading.Event()

    def poll():
        while not done.is_set():
            _, _, s = request(port, "GET", "/health", timeout=30)
            latencies.append(s)
            time.sleep(0.01)

    def send_big():
        status, body, s = request(port, "POST", "/v1/completions", big)
        answers.append((status, s))

    poller = threading.Thread(target=poll)
    poller.start()
    senders = [threading.Thread(target=send_big) for _ in range(4)]
    for t in senders:
        t.start()
    for t in senders:
        t.join()
    done.set()
    poller.join()
    out["health_during_big_prompts_ms"] = {
        "max": round(max(latencies) * 1000, 1),
        "median": round(sorted(latencies)[len(latencies) // 2] * 1000, 1),
        "polls": len(latencies),
    }
    out["big_prompt_answers"] = [
        {"status": st, "seconds": round(s, 3)} for st, s in answers
    ]

    # A short request while a long prompt is prefilled.
    short = {"prompt": "Hi", "max_tokens": 1, "temperature": 0}
    _, _, alone = request(port, "POST", "/v1/completions", short)
    long_prompt = {"prompt": "The quick brown fox jumps. " * 400, "max_tokens": 1}
    result = {}

    def send_long():
        _, body, s = request(port, "POST", "/v1/completions", long_prompt)
        result["long"] = s
        result["long_prompt_tokens"] = body["usage"]["prompt_tokens"] if isinstance(body, dict) else None

    t = threading.Thread(target=send_long)
    t.start()
    time.sleep(0.05)
    _, _, behind = request(port, "POST", "/v1/completions", short)
    t.join()
    out["short_request_s"] = {
        "alone": round(alone, 3),
        "behind_long_prefill": round(behind, 3),
        "long_request": round(result["long"], 3),
        "long_prompt_tokens": result["long_prompt_tokens"],
    }

    # 40 half-open connections.
    socks = []
    for _ in range(40):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        socks.append(s)
    time.sleep(HEADER_TIMEOUT_S + 1.5)
    still_open = 0
    for s in socks:
        s.setblocking(False)
        try:
            data = s.recv(1)
            if data:
                still_open += 1  # it answered something: not closed
        except BlockingIOError:
            still_open += 1
        except OSError:
            pass
        s.close()
    out["half_open_still_open_after_timeout"] = still_open
    return out


PROMPTS = [f"What is {a} + {b}? Answer with a number." for a, b in
           [(2, 3), (7, 8), (12, 30), (5, 9), (41, 1), (6, 6)]]


def gauge(metrics, name):
    for line in metrics.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.split()[-1])
    return None


def soak(port, pid, clients, requests_per_client):
    errors, trace_ids, lock = [], [], threading.Lock()
    total = clients * requests_per_client
    done = [0]
    warm_rss = [None]
    rss_series = []
    latencies = []

    def one(rng, i):
        kind = rng.random()
        if kind < 0.08 and trace_ids:
            with lock:
                ids = rng.sample(trace_ids, min(3, len(trace_ids)))
            body = {"feedback": [{"trace_id": t, "reward": rng.choice([0.0, 1.0])} for t in ids]}
            status, resp, _ = request(port, "POST", "/v1/feedback", body)
            # A trace already trained on or forgotten is a 404, which is its answer.
            return status in (200, 404), resp
        if kind < 0.10:
            status, resp, _ = request(port, "POST", "/v1/learn", {"action": "step"})
            return status in (200, 400), resp  # 400: not enough traces with rewards yet
        if kind < 0.11:
            status, resp, _ = request(port, "POST", "/v1/adapters", {"action": "save", "id": "learned", "path": f"soak/{i % 3}"})
            return status == 200, resp
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        n = rng.choice([1, 1, 2, 4])
        ext = {"verifier": "math", "reference": str(a + b)} if rng.random() < 0.5 else {}
        if n > 1:
            ext["selection"] = rng.choice(["majority", "esc:2", "weighted:self_certainty"])
        common = {"max_tokens": rng.choice([4, 8, 16]), "n": n, "temperature": 0.8,
                  "verity": ext}
        if rng.random() < 0.5:
            body = dict(common, prompt=f"Q: {a} + {b} = ?\nA:")
            path = "/v1/completions"
        else:
            body = dict(common, messages=[{"role": "user", "content": f"What is {a} + {b}?"}])
            path = "/v1/chat/completions"
        stream = rng.random() < 0.25
        if stream:
            body["stream"] = True
        status, resp, s = request(port, "POST", path, body)
        with lock:
            latencies.append(s)
        if status != 200:
            return False, resp
        if stream:
            return resp.rstrip().endswith("data: [DONE]"), resp[-300:]
        with lock:
            trace_ids.extend(t["id"] for t in resp["verity"]["traces"])
            del trace_ids[:-2000]
        return True, None

    def client(c):
        rng = random.Random(c)
        for r in range(requests_per_client):
            try:
                ok, detail = one(rng, c * requests_per_client + r)
            except Exception as e:  # noqa: BLE001 - a dropped connection is a failure
                ok, detail = False, repr(e)
            with lock:
                done[0] += 1
                if not ok:
                    errors.append(str(detail)[:300])
                if warm_rss[0] is None and done[0] >= total // 4:
                    warm_rss[0] = rss_kib(pid)
                if done[0] % max(1, total // 20) == 0:
                    rss_series.append(rss_kib(pid) // 1024)
                    print(f"soak: {done[0]}/{total} requests, {len(errors)} errors, "
                          f"RSS {rss_kib(pid) // 1024} MiB", file=sys.stderr, flush=True)

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - started
    time.sleep(1.0)
    _, health, _ = request(port, "GET", "/health")
    _, metrics, _ = request(port, "GET", "/metrics")
    end_rss = rss_kib(pid)
    latencies.sort()
    return {
        "clients": clients,
        "requests": total,
        "errors": len(errors),
        "first_errors": errors[:5],
        "wall_s": round(wall, 1),
        "generation_latency_s": {
            "median": round(latencies[len(latencies) // 2], 3) if latencies else None,
            "p99": round(latencies[int(len(latencies) * 0.99)], 3) if latencies else None,
        },
        "after": {
            "running_requests": health["running_requests"],
            "waiting_requests": health["waiting_requests"],
            "in_flight": gauge(metrics, "verity_in_flight_requests"),
            "kv_reserved": gauge(metrics, "verity_kv_reserved_tokens"),
        },
        "rss_mib": {"every_5_percent": rss_series,
                    "after_warmup": warm_rss[0] // 1024, "end": end_rss // 1024,
                    "growth_pct": round(100.0 * (end_rss - warm_rss[0]) / warm_rss[0], 2)},
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--verity", default="target/release/verity")
    ap.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--skip-probe", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()

    port = free_port()
    adapters = tempfile.mkdtemp(prefix="verity-soak-")
    proc = subprocess.Popen(
        [args.verity, "serve", "--model", args.model, "--port", str(port),
         "--adapter-dir", adapters, "--header-timeout", str(HEADER_TIMEOUT_S),
         "--max-queued", "256"],
        stderr=subprocess.DEVNULL)
    try:
        wait_healthy(port, proc)
        report = {"model": args.model}
        if not args.skip_probe:
            report["probe"] = probe(port)
            print(json.dumps(report["probe"]), file=sys.stderr, flush=True)
        report["soak"] = soak(port, proc.pid, args.clients, args.requests)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    s = report["soak"]
    ok = (s["errors"] == 0 and s["after"]["running_requests"] == 0
          and s["after"]["waiting_requests"] == 0 and s["after"]["in_flight"] == 0
          and s["after"]["kv_reserved"] == 0
          and s["rss_mib"]["growth_pct"] < 5.0)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
