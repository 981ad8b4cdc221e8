"""What guarding the output costs: tokens/s of one stream under each mode, in one run.

The tiny model, one stage, local worker processes on this machine: one holder (no checks); one holder with
5% spot checks (the host recomputes those steps); two holders with verify="first" (the first answer is used,
the other compared); two holders with verify="agree" (a step is used once both agree). Every run's tokens
are compared with the first's.

    python bench/verify_modes.py [--tokens 48] [--requests 6]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import distllm  # noqa: E402

PROMPT = list(range(5, 21))


def run(label: str, workers: int, tokens: int, requests: int, **options) -> tuple[str, float, list, dict]:
    with distllm.local("tiny", workers=workers, stages=1, quant="none", calibrate=False, rebalance_s=0.0,
                       **options) as cluster:
        cluster.generate(PROMPT, max_new_tokens=4)  # warm
        t0 = time.perf_counter()
        outs = [cluster.generate(PROMPT, max_new_tokens=tokens) for _ in range(requests)]
        rate = requests * tokens / (time.perf_counter() - t0)
        return label, rate, outs[0], cluster.stats()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--requests", type=int, default=6)
    args = ap.parse_args()
    rows = [run("one holder", 1, args.tokens, args.requests),
            run("one holder, spot_check=0.05", 1, args.tokens, args.requests, spot_check=0.05),
            run('two holders, verify="first"', 2, args.tokens, args.requests, replicas=2),
            run('two holders, verify="agree"', 2, args.tokens, args.requests, replicas=2, verify="agree")]
    base = rows[0][1]
    print(f"{'mode':<32}{'tokens/s':>10}{'x one holder':>14}{'checks':>8}{'spot':>6}  same tokens")
    for label, rate, tokens, stats in rows:
        print(f"{label:<32}{rate:>10.1f}{rate / base:>14.2f}{stats['checks']:>8}{stats['spot_checks']:>6}  "
              f"{tokens == rows[0][2]}")


if __name__ == "__main__":
    main()
