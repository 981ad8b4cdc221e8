"""What checkpoints cost: per-token write cost on a local store, and what a Hub store pushes.

Runs the same batch job (tiny model, local workers) three times in one process: without a
store, with a local directory store, and with a Hub store (the real huggingface_hub client
against the local fake Hub from tests/, pushing every --push-s seconds). Prints tokens/s of
each, the writer thread's time per checkpoint write, bytes written per token, and the bytes
and commits a Hub push carries per minute of a running job.

    python bench/checkpoints.py [--prompts 64] [--tokens 64] [--workers 2] [--push-s 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import distllm  # noqa: E402
from fakehub import FakeHub  # noqa: E402


def run(prompts: list[str], args, **options) -> dict:
    with distllm.local("tiny", workers=args.workers, quant="none", **options) as cluster:
        cluster.generate("warm up", max_new_tokens=4)
        before = cluster.stats()["tokens"]
        t0 = time.perf_counter()
        job = cluster.map(prompts, max_new_tokens=args.tokens, name=f"bench-{time.time_ns()}")
        job.results(progress=False)
        elapsed = time.perf_counter() - t0
        tokens = cluster.stats()["tokens"] - before
        out = {"tokens": tokens, "seconds": elapsed, "tok_s": tokens / elapsed}
        if cluster._ckpt is not None:
            assert cluster.checkpoint(60.0), cluster.store_status
            out.update(cluster._ckpt.stats)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--push-s", type=float, default=5.0)
    args = parser.parse_args()
    prompts = [f"prompt number {i}: " + "xy" * (i % 9) for i in range(args.prompts)]

    plain = run(prompts, args)
    with tempfile.TemporaryDirectory() as folder:
        local = run(prompts, args, store=folder)
    with FakeHub() as hub, tempfile.TemporaryDirectory() as cache:
        os.environ["DISTLLM_CACHE"] = cache  # a fresh mirror
        hub_run = run(prompts, args, store="hf://bench/state", hub_endpoint=hub.endpoint, token="hf_bench",
                      store_push_s=args.push_s)
        commits = len(hub.commit_bytes)
        commit_payload = sum(hub.commit_bytes)

    print(f"job: {args.prompts} prompts x {args.tokens} new tokens, {args.workers} local workers, tiny model, "
          f"{distllm.torch.get_num_threads()} torch threads, {os.cpu_count()} cores")
    print(f"{'store':<10}{'tokens/s':>10}{'vs none':>9}{'writes':>8}{'us/write':>10}{'bytes/token':>13}")
    print(f"{'none':<10}{plain['tok_s']:>10.1f}{1.0:>9.2f}")
    for name, r in (("local", local), ("hub", hub_run)):
        print(f"{name:<10}{r['tok_s']:>10.1f}{r['tok_s'] / plain['tok_s']:>9.2f}{r['writes']:>8}"
              f"{r['write_s'] / max(1, r['writes']) * 1e6:>10.0f}{r['bytes'] / r['tokens']:>13.0f}")
    minutes = hub_run["seconds"] / 60
    print(f"hub: {commits} commits in {hub_run['seconds']:.1f} s (push every {args.push_s:g} s); "
          f"{hub_run['pushed_bytes'] / 1e3:.1f} kB of files, {commit_payload / 1e3:.1f} kB on the wire "
          f"(base64 + NDJSON); {commit_payload / minutes / 1e3:.0f} kB/min at {hub_run['tok_s']:.0f} tokens/s "
          f"= {commit_payload / hub_run['tokens']:.0f} B per generated token")


if __name__ == "__main__":
    main()
