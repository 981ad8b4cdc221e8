"""distllm over a slow network: the latency proxy (tests/netem.py) between workers and host.

For each round trip (0, 50, 150 ms) and stage count (2, 4), on the tiny model with one
worker process per stage dialing the proxy:
- single-stream ms per token against the floor: one round trip per stage per token
  (the host relays between stages) plus the compute measured at 0 ms;
- tokens/s with 16 sessions in flight, and its ratio to the single stream;
- time from starting the workers to serving;
- bytes per token per hop on the wire (both directions, counted by the proxy);
- the stall when every connection is cut mid-stream (reconnect, steps sent again).

    python bench/network.py [--rtt 0,50,150] [--stages 2,4] [--tokens 24]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import distllm  # noqa: E402
from netem import LatencyProxy  # noqa: E402

SESSIONS = 16


def run(rtt_ms: float, stages: int, tokens: int, compute_ms: dict) -> dict:
    prompt = list(range(3, 19))
    logs = tempfile.mkdtemp(prefix="distllm-net-")
    with distllm.host("tiny", quant="none", bind="127.0.0.1", workers=stages, stages=stages,
                      calibrate=False, rebalance_s=0) as cluster:
        port = int(distllm.JoinInfo.parse(cluster.join_string).endpoint.rsplit(":", 1)[1])
        with LatencyProxy(port, rtt_ms=rtt_ms, jitter_ms=rtt_ms / 20) as proxy:
            t0 = time.perf_counter()
            procs = [subprocess.Popen([sys.executable, "-m", "distllm", "join", proxy.rewrite(cluster.join_string),
                                       "--name", f"s{i}"], stdout=subprocess.DEVNULL,
                                      stderr=open(os.path.join(logs, f"s{i}.log"), "w")) for i in range(stages)]
            try:
                cluster.wait_ready(300)
                ready_s = time.perf_counter() - t0
                want = cluster.generate(prompt, max_new_tokens=tokens)
                before = sum(proxy.bytes.values())
                stamps = []
                for _ in cluster.stream(prompt, max_new_tokens=tokens):
                    stamps.append(time.perf_counter())
                gaps = [b - a for a, b in zip(stamps, stamps[1:])]
                ms = statistics.median(gaps) * 1e3
                hop_bytes = (sum(proxy.bytes.values()) - before) / len(stamps) / stages

                def one(i: int) -> None:
                    cluster.generate([3 + i] + prompt, max_new_tokens=tokens)

                threads = [threading.Thread(target=one, args=(i,)) for i in range(SESSIONS)]
                t2 = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                many = SESSIONS * tokens / (time.perf_counter() - t2)

                stamps, got = [], []
                for i, tok in enumerate(cluster.stream(prompt, max_new_tokens=tokens)):
                    stamps.append(time.perf_counter())
                    got.append(tok)
                    if i == tokens // 3:
                        proxy.cut()
                gaps = [b - a for a, b in zip(stamps, stamps[1:])]
                cut_stall = max(gaps) - statistics.median(gaps)
                stats = cluster.stats()
            finally:
                for p in procs:
                    p.kill()
                    p.wait()
    if rtt_ms == 0:
        compute_ms[stages] = ms
    floor = stages * rtt_ms + compute_ms.get(stages, 0.0)
    return {"rtt": rtt_ms, "stages": stages, "ms": ms, "floor": floor, "single_tok_s": 1e3 / ms,
            "many_tok_s": many, "ready_s": ready_s, "hop_bytes": hop_bytes, "cut_stall": cut_stall,
            "identical": got == want, "replays": stats["replays"] + stats["restarts"], "lost": stats["failures"]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rtt", default="0,50,150")
    ap.add_argument("--stages", default="2,4")
    ap.add_argument("--tokens", type=int, default=24)
    args = ap.parse_args()
    compute_ms: dict = {}
    rows = []
    for stages in [int(s) for s in args.stages.split(",")]:
        for rtt in [float(r) for r in args.rtt.split(",")]:
            rows.append(run(rtt, stages, args.tokens, compute_ms))
            print(rows[-1], flush=True)
    print(f"\n| round trip | stages | ms/token | floor | / floor | tok/s 1 stream | tok/s {SESSIONS} sessions | "
          f"x | join to serving s | bytes/token/hop | cut stall s | same tokens after cut | replays | lost |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['rtt']:.0f} ms | {r['stages']} | {r['ms']:.1f} | {r['floor']:.1f} | {r['ms'] / r['floor']:.2f} | "
              f"{r['single_tok_s']:.1f} | {r['many_tok_s']:.1f} | {r['many_tok_s'] / r['single_tok_s']:.1f} | "
              f"{r['ready_s']:.1f} | {r['hop_bytes']:.0f} | {r['cut_stall']:.2f} | {r['identical']} | "
              f"{r['replays']} | {r['lost']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
