"""A slow node, seen by the host and routed around: throughput before, during and after.

Three `distllm join` worker processes serve a random Llama (hidden 512, 12 layers, float32) on
this machine, each with room for half its layers: two stages and a standby. One request after
another streams 32 tokens. Then the first stage's worker is made slow from outside, in one of
three ways:

- ``throttle``: its process is stopped 30 ms of every 40 ms (SIGSTOP/SIGCONT: a notebook VM
  sharing its cores, a throttled GPU, a busy laptop) for `--slow-s` seconds, then let go;
- ``relay``: every worker reaches the host through a relay; the slow node's goes from loopback
  speed to a 200 ms round trip for `--slow-s` seconds (the others stay at loopback speed);
- ``flap``: throttled in 5-second bursts every 20 s (no node should thrash: at most one move
  a minute).

Printed: tokens/s per request over time, what the host believed of each node (its compute as
reported, its step cost as the host measured it), the moves and why, and whether every
request's tokens were identical to the first one's (greedy, same prompt).

    python bench/stragglers.py                      # throttle, 90 s
    python bench/stragglers.py --case relay
    python bench/stragglers.py --case flap --slow-s 120
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import distllm  # noqa: E402
from conftest import write_model  # noqa: E402
from netem import LatencyProxy, Throttle, join_processes, memory_fraction_for  # noqa: E402


def beliefs(cluster) -> str:
    rows = []
    for w in cluster.workers():
        if not w["alive"]:
            continue
        layers = f"{w['layers'][0]}..{w['layers'][1] - 1}" if w["layers"] else "standby"
        cost = f"{w['cost_ms']:.1f}" if w["cost_ms"] is not None else "-"
        compute = f"{w['compute_ms']:.1f}" if w["compute_ms"] is not None else "-"
        rows.append(f"{w['name']}: {layers}, computes {compute} ms, costs {cost} ms, rtt {w['rtt_ms'] or 0:.1f} ms")
    return "; ".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", choices=("throttle", "relay", "flap"), default="throttle")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--before-s", type=float, default=20.0, help="seconds of requests before the node slows")
    ap.add_argument("--slow-s", type=float, default=90.0, help="seconds it stays slow (throttle, flap)")
    ap.add_argument("--after-s", type=float, default=60.0, help="seconds of requests after it recovers")
    ap.add_argument("--rebalance-s", type=float, default=10.0)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    moves: list[str] = []

    class Moves(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            text = record.getMessage()
            if text.startswith("rebalancing") or "is fast again" in text:
                moves.append(f"t={time.monotonic() - t0:6.1f}s {text}")

    logging.getLogger("distllm").addHandler(Moves())
    tmp = tempfile.mkdtemp(prefix="distllm-straggler-")
    model = write_model(os.path.join(tmp, "model"), "llama", hidden=args.hidden, layers=args.layers,
                        intermediate=args.hidden * 2, num_attention_heads=8, num_key_value_heads=4,
                        max_position_embeddings=2048)
    prompt = list(range(3, 19))
    names = ["s0", "s1", "s2"]
    threads = str(max(1, (os.cpu_count() or 1) // 3))
    with (distllm.host(model, quant="none", bind="127.0.0.1", workers=3, max_stages=2, calibrate=True,
                       rebalance_s=args.rebalance_s, direct_links=False) as cluster, contextlib.ExitStack() as stack):
        core = cluster._core
        cluster.config.memory_fraction = memory_fraction_for(args.layers // 2, core._layer_bytes + core._kv_bytes)
        port = int(distllm.JoinInfo.parse(cluster.join_string).endpoint.rsplit(":", 1)[1])
        relays = [stack.enter_context(LatencyProxy(port, seed=i)) for i in range(3)] if args.case == "relay" else []
        strings = [relays[i].rewrite(cluster.join_string) if relays else cluster.join_string for i in range(3)]
        procs = []
        for i, name in enumerate(names):
            procs += stack.enter_context(join_processes(strings[i], [name], tmp,
                                                        env={**os.environ, "OMP_NUM_THREADS": threads}))
        cluster.wait_ready(300)
        want = cluster.generate(prompt, max_new_tokens=args.tokens)
        plan = cluster.layer_map()
        print(f"plan: {plan}")
        middle = plan[0][2]
        throttle = Throttle(procs[names.index(middle)].pid)
        stack.callback(throttle.close)
        t0 = time.monotonic()
        slow_from, slow_to = args.before_s, args.before_s + args.slow_s
        if args.case == "throttle":
            throttle.on = lambda: slow_from <= time.monotonic() - t0 < slow_to
        elif args.case == "relay":  # its relay's latency follows the phase (its process runs as ever)
            done = threading.Event()

            def latency() -> None:
                while not done.wait(0.1):
                    relays[names.index(middle)].one_way = 0.1 if slow_from <= time.monotonic() - t0 < slow_to else 0.0

            threading.Thread(target=latency, daemon=True).start()
            stack.callback(done.set)
            throttle.on = lambda: slow_from <= time.monotonic() - t0 < slow_to and (
                time.monotonic() - t0 - slow_from) % 20.0 < 5.0
        end = slow_to + args.after_s
        rows, same = [], True
        last_print = 0.0
        while time.monotonic() - t0 < end:
            t1 = time.monotonic()
            got = cluster.generate(prompt, max_new_tokens=args.tokens)
            t2 = time.monotonic()
            same &= got == want
            rows.append((t1 - t0, args.tokens / (t2 - t1)))
            if t2 - t0 - last_print >= 5.0:
                last_print = t2 - t0
                phase = "slow" if slow_from <= t2 - t0 < slow_to else "normal"
                print(f"t={t2 - t0:6.1f}s {rows[-1][1]:6.1f} tok/s [{phase}] {beliefs(cluster)}", flush=True)
        stats = cluster.stats()

    def mean(a: float, b: float) -> float:
        xs = [r for t, r in rows if a <= t < b]
        return sum(xs) / len(xs) if xs else float("nan")

    print()
    print(f"case {args.case}: the slow node was {middle} (plan at the start: {plan})")
    for m in moves:
        print("  " + m)
    before = mean(0, slow_from)
    print(f"tokens/s before: {before:.1f}")
    for a in range(int(slow_from), int(slow_to), 10):
        print(f"  slow phase t={a:3d}..{a + 10:3d}s: {mean(a, a + 10):6.1f} tok/s ({mean(a, a + 10) / before:.0%})")
    print(f"tokens/s after it recovered (last 30 s): {mean(end - 30, end):.1f}")
    print(f"rebalances: {stats['rebalances']}; every request's tokens identical: {same}")


if __name__ == "__main__":
    main()
