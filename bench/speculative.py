"""Speculative decoding on one GPU: what a verify step costs against a decode step, and tokens/s.

The Llama-3-8B-shaped random checkpoint of bench/gpu_speed.py (--layers of them, nf4 on the workers),
four `distllm join` workers sharing the GPU (4 stages, loopback TCP, CURVE, direct links), and a small
draft model of the same vocabulary held by the host (random weights: hidden 512, 2 layers). Random
weights agree by chance only, so the acceptance is near zero: what this measures is the cost side,

- plain decoding: ms per trip (one token through the 4 stages) and tokens/s;
- speculation forced to --k drafts a step: ms per verify trip (the last token and k drafts through the
  4 stages, each position run as a decode step runs it), its ratio to a plain trip, tokens/s;
- speculation adaptive (up to --k): tokens/s, which must stay within 5% of plain decoding when the
  drafts do not pay;
- the verify trip for k = 1..8 forced, against a plain trip (each stage runs a verify step's positions
  as rows of its padded decode step: one step for up to 16 positions);
- with --self-draft, the target as its own draft, adaptive: tokens/s against plain (on random weights the
  host's bf16 copy and the workers' nf4 rarely agree: bench/network.py --speculate measures agreeing drafts);

and every run's tokens against the same layers decoded in one process.

    python bench/speculative.py [--layers 16] [--tokens 48] [--k 4] [--self-draft]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

import distllm  # noqa: E402
from gpu_speed import ROOT, build_checkpoint, log, start_workers  # noqa: E402

PROMPT = list(range(10, 42))


def build_draft(path: str) -> str:
    from transformers import AutoModelForCausalLM, LlamaConfig

    if os.path.exists(os.path.join(path, "config.json")):
        return path
    config = LlamaConfig(vocab_size=128256, hidden_size=512, intermediate_size=1536, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=8192,
                         bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    distllm._tiny_tokenizer().save_pretrained(path)
    return path


def time_drafts(cluster) -> list[float]:
    """Time every draft the host's drafter makes (seconds, appended to the list returned): a draft runs on the
    host's thread, while windows are in flight or, for the first window of a trip, before it goes."""
    spec = cluster._core._speculation
    drafts: list[float] = []
    inner = spec.drafter.draft

    def timed(sid, tokens, k):
        t0 = time.perf_counter()
        try:
            return inner(sid, tokens, k)
        finally:
            drafts.append(time.perf_counter() - t0)

    spec.drafter.draft = timed
    return drafts


def measure(cluster, tokens: int, drafts: list[float] | None = None) -> dict:
    mark = len(drafts) if drafts is not None else 0
    before = cluster.stats()
    stamps, got = [], []
    for tok in cluster.stream(PROMPT, max_new_tokens=tokens):
        stamps.append(time.perf_counter())
        got.append(tok)
    after = cluster.stats()
    delta = {k: after[k] - before[k] for k in ("trips", "tokens", "drafted", "accepted", "verify_steps")}
    seconds = stamps[-1] - stamps[0]
    taken = sorted(drafts[mark:]) if drafts is not None else []
    return {"draft_ms": taken[len(taken) // 2] * 1e3 if taken else float("nan"),
            "tokens": got, "tok_s": (len(stamps) - 1) / seconds, "trip_ms": seconds * 1e3 / max(1, delta["trips"] - 1),
            "acceptance": delta["accepted"] / delta["drafted"] if delta["drafted"] else 0.0,
            "per_trip": delta["tokens"] / max(1, delta["trips"]), "verify_steps": delta["verify_steps"]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--self-draft", action="store_true", help="also the target as its own draft (the host runs it in "
                    "bf16 through transformers, the workers in nf4: random weights' near ties make them disagree)")
    args = ap.parse_args()
    import transformers

    print(f"torch {torch.__version__} transformers {transformers.__version__} "
          f"device {torch.cuda.get_device_name(0)}", flush=True)
    cache = os.path.join(ROOT, ".bench-cache")
    os.makedirs(cache, exist_ok=True)
    path = build_checkpoint(os.path.join(cache, f"llama8b-{args.layers}"), args.layers)
    draft = build_draft(os.path.join(cache, "draft-512x2"))
    log("checkpoints ready")
    decode = distllm._reference_decoder(path, "nf4")
    want, _ = decode(PROMPT, args.tokens)
    del decode
    gc.collect()
    torch.cuda.empty_cache()
    log("reference done")
    rows = {}
    with distllm.host(path, quant="nf4", bind="127.0.0.1", workers=4, stages=4, calibrate=False, rebalance_s=0,
                      speculate=args.k, speculate_adaptive=False, draft=draft) as cluster:
        procs = start_workers(cluster.join_string, ["cuda:0"] * 4, "spec")
        try:
            cluster.wait_ready(900)
            cluster.generate(PROMPT, max_new_tokens=8)  # warm-up: graphs captured, timings measured
            drafts = time_drafts(cluster)
            for name, k, adaptive in (("plain", 0, True), (f"forced k={args.k}", args.k, False),
                                      (f"adaptive k<={args.k}", args.k, True), ("plain again", 0, True)):
                cluster.set_speculation(k, adaptive=adaptive, windows=1)  # (the cost of one verify trip)
                rows[name] = measure(cluster, args.tokens, drafts)
                log(name, {key: v for key, v in rows[name].items() if key != "tokens"})
            for k in range(1, 9):  # what a verify trip costs per k (the random draft: few accepted)
                cluster.set_speculation(k, adaptive=False, windows=1)
                rows[f"forced k={k}"] = measure(cluster, args.tokens, drafts)
                log(f"forced k={k}", rows[f"forced k={k}"]["trip_ms"])
            rows["verify rows"] = {"rows": [w.get("verify_rows") for w in cluster.workers() if w["layers"]]}
        finally:
            for p in procs:
                p.kill()
                p.wait()
    if args.self_draft:
        with distllm.host(path, quant="nf4", bind="127.0.0.1", workers=4, stages=4, calibrate=False,
                          rebalance_s=0, speculate=8, draft=path) as cluster:
            procs = start_workers(cluster.join_string, ["cuda:0"] * 4, "self")
            try:
                cluster.wait_ready(900)
                cluster.generate(PROMPT, max_new_tokens=8)
                for name, k in (("plain (self-draft cluster)", 0), ("target as its own draft, adaptive k<=8", 8)):
                    cluster.set_speculation(k, adaptive=True)
                    rows[name] = measure(cluster, args.tokens)
                    log(name, {key: v for key, v in rows[name].items() if key != "tokens"})
            finally:
                for p in procs:
                    p.kill()
                    p.wait()
    log("verify rows per stage", rows.pop("verify rows")["rows"])
    plain = rows["plain"]
    print("\n| run | tok/s | ms a trip | trip / plain trip | ms a draft (median) | drafts accepted | tokens a trip | "
          "verify steps | tokens = reference |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['tok_s']:.1f} | {r['trip_ms']:.1f} | {r['trip_ms'] / plain['trip_ms']:.2f} | "
              f"{r['draft_ms']:.2f} | {r['acceptance']:.2f} | {r['per_trip']:.2f} | {r['verify_steps']} | "
              f"{r['tokens'] == want} |")
    return 0 if all(r["tokens"] == want for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
