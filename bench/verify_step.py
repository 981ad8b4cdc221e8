"""What checking k drafts costs one stage, against one plain decode step (issue 34's question, per k).

One StageShard (the layers a worker holds) on this machine's device, a session with a 64-token context
(and --others sessions beside it). For k = 1..8, the median of --reps runs, on two stages built alike:

- a stage with a cache per session (decode_batch 1, the CPU's default): a decode step of one position;
  a verify step of the last token and k drafts run one position at a time (exact: decoding's numbers);
  and a one pass of the k + 1 positions (a prefill-style step: not decoding's numbers bit for bit);
- a pooled stage (decode_batch --rows, the GPU's default: every step padded to that many rows): a decode
  step, and a verify step whose k + 1 positions are rows of one padded step (exact: see _DecodePool).

Printed as ms and as multiples of the plain stage's decode step, and whether each kind of verify step
gave every position the numbers of that stage's own decoding, bit for bit.

    python bench/verify_step.py                       # the tiny model on this machine's device
    python bench/verify_step.py --hidden 4096 --layers 4 --quant nf4
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

import distllm  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny", help="tiny, smollm2 (the trained model) or a path")
    ap.add_argument("--hidden", type=int, default=0, help="a random Llama of this hidden size (0: --model)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--quant", default="none")
    ap.add_argument("--rows", type=int, default=0, help="the pooled stage's rows (0: 16 on a GPU, 8 on a CPU)")
    ap.add_argument("--others", type=int, default=3, help="sessions sharing the pooled stage (idle this step)")
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    device = distllm._default_device()
    if args.hidden:
        from transformers import LlamaConfig, LlamaForCausalLM

        path = tempfile.mkdtemp(prefix="distllm-verify-")
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                                     num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 128),
                                     num_key_value_heads=max(1, args.hidden // 512))).save_pretrained(path)
        model = path
    else:
        model = args.model
    files = distllm._model_files(distllm._resolve_model(model))
    config = distllm._load_config(files)
    dtype = distllm._compute_dtype(config, "auto", device)
    rows = args.rows or (16 if device.type == "cuda" else 8)

    def build(batch: int, decoding_rows: bool = False) -> distllm.StageShard:
        return distllm.StageShard(files, config, 0, int(config.num_hidden_layers), quant=args.quant, dtype=dtype,
                                  device=device, batch=batch, static_cache=batch > 1 or None,
                                  decoding_rows=decoding_rows)

    plain, pooled = build(1), build(rows)
    per_rows = build(1, decoding_rows=True) if device.type == "cpu" else None
    hidden = int(config.hidden_size)
    context = 64
    x = torch.randn(1, context + 9, hidden, dtype=dtype)

    def timed(fn) -> float:
        times = []
        for _ in range(args.reps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    with torch.inference_mode():
        for shard in (plain, pooled, per_rows):
            if shard is not None:
                shard.forward("s", x[:, :context], 0)  # the context every step below sees
        for i in range(args.others):
            pooled.forward(f"other{i}", x[:, :context // 2], 0)

        def step(shard: distllm.StageShard, n: int, decode_from: int | None) -> torch.Tensor:
            return shard.forward("s", x[:, context:context + n], context, decode_from)

        def one_by_one(shard: distllm.StageShard, n: int) -> torch.Tensor:
            return torch.cat([shard.forward("s", x[:, context + j:context + j + 1], context + j) for j in range(n)], 1)

        one = timed(lambda: step(plain, 1, context))
        pool_one = timed(lambda: step(pooled, 1, context))
        print(f"device {device}, {model if not args.hidden else f'random Llama hidden {args.hidden}'}, "
              f"{config.num_hidden_layers} layers, {args.quant}, dtype {dtype}, torch threads {torch.get_num_threads()}")
        print(f"decode step: a cache per session {one:.2f} ms; pooled ({rows} rows) {pool_one:.2f} ms "
              f"({pool_one / one:.2f}x)")
        if per_rows is not None:  # a CPU stage of a speculating cluster: a lone row doubled, queries one by one
            rows_one = timed(lambda: step(per_rows, 1, context))
            print(f"a cache per session with decoding rows ({per_rows.decoding_rows} positions a pass): decode "
                  f"step {rows_one:.2f} ms ({rows_one / one:.2f}x)")
            for k in range(1, 9):
                ms = timed(lambda: step(per_rows, k + 1, context))
                same = torch.equal(step(per_rows, k + 1, context), one_by_one(per_rows, k + 1))
                print(f"  k={k}: verify {ms:.2f} ms ({ms / one:.2f}x one plain decode step, {ms / rows_one:.2f}x "
                      f"its own), exact: {'yes' if same else 'NO'}")
        print(f"{'k':>3} | {'verify, one at a time':>22} | {'one pass':>18} | {'pooled, one step':>18} | exact: "
              "one at a time / one pass / pooled")
        for k in range(1, 9):
            exact = timed(lambda: step(plain, k + 1, context))
            fused = timed(lambda: step(plain, k + 1, None))
            rows_ms = timed(lambda: step(pooled, k + 1, context)) if k + 1 <= rows else float("nan")
            ref, ref_pool = one_by_one(plain, k + 1), one_by_one(pooled, k + 1)
            same = [torch.equal(step(plain, k + 1, context), ref), torch.equal(step(plain, k + 1, None), ref),
                    torch.equal(step(pooled, k + 1, context), ref_pool)]
            print(f"{k:>3} | {exact:>8.2f} ms {exact / one:>7.2f}x | {fused:>6.2f} ms {fused / one:>6.2f}x | "
                  f"{rows_ms:>6.2f} ms {rows_ms / one:>6.2f}x | " + " / ".join("yes" if v else "NO" for v in same))


if __name__ == "__main__":
    main()
