"""Time one 4096 x 4096 nf4 matmul at batch 1 through both bitsandbytes CPU paths.

A `Linear4bit` in training mode dequantizes in float32; one in eval mode, on a CPU with
AVX512-BF16, is repacked on its first forward and dequantizes in bfloat16 (bitsandbytes
0.50). distllm keeps its layers in eval mode; this prints what that buys and costs here:
ms per matmul and the error against a float32 dequantization, per path.

    python bench/bnb_cpu_path.py
"""

from __future__ import annotations

import time

import bitsandbytes as bnb
import torch

import distllm


def main() -> None:
    torch.manual_seed(0)
    dense = torch.nn.Linear(4096, 4096, bias=False)
    x = torch.randn(1, 4096)
    print(f"AVX512-BF16 (bitsandbytes): {bnb.functional.has_avx512bf16()}")
    for training in (True, False):
        layer = distllm.quantize_linears(torch.nn.Sequential(dense), "nf4", torch.float32, torch.device("cpu"))[0]
        layer.train(training)
        exact = x @ bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float().T
        with torch.inference_mode():
            y = layer(x)  # the first call repacks where it will
            t0 = time.perf_counter()
            for _ in range(50):
                layer(x)
            ms = (time.perf_counter() - t0) / 50 * 1e3
        packed = bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))
        print(f"{'training' if training else 'eval':8s} mode: {'repacked' if packed else 'float32 path':12s} "
              f"{ms:7.2f} ms/matmul, relative error {((y - exact).norm() / exact.norm()).item():.1e}")


if __name__ == "__main__":
    main()
