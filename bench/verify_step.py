"""What checking k drafts costs one stage, against one plain decode step (issue 34's question, per k).

One StageShard (the layers a worker holds) on this machine's device; a session with a 64-token context.
For k = 1..8, the median of --reps runs of:

- decode: one position (a plain decode step);
- verify, today: the last token and k drafts, each position run as a decode step (exact: the numbers
  of plain decoding, whatever the device);
- one pass: the k + 1 positions in one forward (a prefill-style step: one computation; on a GPU its
  numbers are not bit-for-bit a decode step's, which is why today's verify does not use it).

Printed as ms and as multiples of one decode step, and whether the one pass gave every position the very
numbers of today's verify (bit for bit).

    python bench/verify_step.py                       # the tiny model on this machine's device
    python bench/verify_step.py --hidden 2048 --layers 8 --quant nf4
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
    ap.add_argument("--hidden", type=int, default=0, help="a random Llama of this hidden size (0: the tiny model)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--quant", default="none")
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
        model = "tiny"
    files = distllm._model_files(distllm._resolve_model(model))
    config = distllm._load_config(files)
    dtype = distllm._compute_dtype(config, "auto", device)
    shard = distllm.StageShard(files, config, 0, int(config.num_hidden_layers), quant=args.quant, dtype=dtype,
                               device=device)
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

    shard.forward("s", x[:, :context], 0)  # the context every step below sees

    def step(n: int, decode_from: int | None) -> torch.Tensor:
        return shard.forward("s", x[:, context:context + n], context, decode_from)

    with torch.inference_mode():
        one = timed(lambda: step(1, context))
        print(f"device {device}, {model if not args.hidden else f'random Llama hidden {args.hidden}'}, "
              f"{config.num_hidden_layers} layers, {args.quant}, dtype {dtype}; decode step {one:.2f} ms")
        print(f"{'k':>3}{'verify ms':>11}{'x decode':>10}{'one pass ms':>13}{'x decode':>10}  one pass = decode's numbers")
        for k in range(1, 9):
            exact = timed(lambda: step(k + 1, context))
            fused = timed(lambda: step(k + 1, None))
            same = torch.equal(step(k + 1, context), step(k + 1, None))  # bit for bit, every position
            print(f"{k:>3}{exact:>11.2f}{exact / one:>10.2f}{fused:>13.2f}{fused / one:>10.2f}  {'yes' if same else 'no'}")


if __name__ == "__main__":
    main()
