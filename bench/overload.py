"""Overload: what admission does for the requests it admits.

The tiny model on local workers behind the OpenAI-compatible API, `max_active` requests decoded at
once and `max_queued` waiting. First `max_active` streams alone (the baseline); then the same streams
while a flood of --flood more requests arrives at once and keeps coming back as soon as it is
refused or served (from a process of its own). Per phase: the admitted streams' median time between tokens, and how many flood
requests were answered 429 (with Retry-After), were served, or failed otherwise.

    python bench/overload.py [--active 4] [--queued 4] [--flood 64] [--tokens 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import httpx  # noqa: E402

import distllm  # noqa: E402


def stream_gaps(url: str, tokens: int, seed: int) -> list[float]:
    """One streamed completion's gaps between chunks, in seconds."""
    body = {"model": "tiny", "prompt": f"Story {seed}:", "max_tokens": tokens, "stream": True, "seed": seed,
            "temperature": 0.8}
    stamps = []
    with httpx.Client(timeout=120) as client, client.stream("POST", f"{url}/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps, stamps[1:])]


def flood_process(url: str, flood: int, ready, go, stop, counts) -> None:
    """The flood, in a process of its own (its client threads must not share the host's interpreter)."""
    def flooder(i: int) -> None:
        with httpx.Client(timeout=120) as client:
            go.wait()
            while not stop.is_set():
                r = client.post(f"{url}/completions", json={"model": "tiny", "prompt": f"Flood {i}", "max_tokens": 8})
                key = 0 if r.status_code == 429 else 1 if r.status_code == 200 else 2
                with counts.get_lock():
                    counts[key] += 1
                if r.status_code == 429:
                    assert int(r.headers["Retry-After"]) >= 1
                    time.sleep(0.05)  # a client that does not wait the Retry-After: the worst case

    threads = [threading.Thread(target=flooder, args=(i,)) for i in range(flood)]
    for t in threads:
        t.start()
    ready.set()
    for t in threads:
        t.join()


def phase(url: str, active: int, tokens: int, flood: int) -> dict:
    import multiprocessing as mp

    gaps: list[float] = []
    ctx = mp.get_context("spawn")
    ready, go, stop, counts = ctx.Event(), ctx.Event(), ctx.Event(), ctx.Array("i", 3)

    def admitted(i: int) -> None:
        gaps.extend(stream_gaps(url, tokens, i))

    flooders = ctx.Process(target=flood_process, args=(url, flood, ready, go, stop, counts)) if flood else None
    if flooders is not None:
        flooders.start()
        ready.wait(120)
    threads = [threading.Thread(target=admitted, args=(i,)) for i in range(active)]
    for t in threads:
        t.start()
    time.sleep(0.3)  # the admitted ones hold their slots first
    go.set()
    for t in threads:
        t.join()
    stop.set()
    if flooders is not None:
        flooders.join()
    return {"itl_ms": statistics.median(gaps) * 1e3 if gaps else float("nan"), "429": counts[0],
            "served": counts[1], "other": counts[2]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--active", type=int, default=4)
    ap.add_argument("--queued", type=int, default=4)
    ap.add_argument("--flood", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=200)
    args = ap.parse_args()
    with distllm.local("tiny", workers=2, quant="none", calibrate=False, max_active=args.active,
                       max_queued=args.queued) as cluster:
        server = cluster.serve(port=0)
        base = phase(server.url, args.active, args.tokens, 0)
        flooded = phase(server.url, args.active, args.tokens, args.flood)
        stats = cluster.stats()
    print(f"\n| phase | admitted streams | median ms between tokens | flood 429 | flood served | flood other |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in (("alone", base), (f"with a flood of {args.flood}", flooded)):
        print(f"| {name} | {args.active} | {r['itl_ms']:.1f} | {r['429']} | {r['served']} | {r['other']} |")
    print(f"\nslowdown of the admitted streams: {flooded['itl_ms'] / base['itl_ms']:.2f}x "
          f"(max_active={args.active}, max_queued={args.queued}); requests ended {stats['requests']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
