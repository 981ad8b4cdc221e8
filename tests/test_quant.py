"""Every 4-bit layer distllm makes computes through one bitsandbytes path, whatever the CPU.

bitsandbytes 0.50 on a CPU with AVX512-BF16 repacks an eval-mode `Linear4bit` on its
first forward and dequantizes it in bfloat16 from then on; a training-mode one keeps
the float32 path. A worker's layers and the tests' reference must take the same one,
or their tokens part ways (issue 19: 7 tests failed on such a CPU).
"""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

import distllm
from conftest import reference_model


def _cpu_has_avx512_bf16() -> bool:
    """What the kernel says about this CPU (not what bitsandbytes says: that is under test)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any("avx512_bf16" in line.split() for line in f if line.startswith("flags"))
    except OSError:
        pytest.skip("no /proc/cpuinfo to read the CPU's flags from")


def _linears(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in module.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


@pytest.fixture(scope="module")
def worker_and_reference_layers(tmp_path_factory):
    """Layer 1 of a tiny llama as a worker's shard holds it and as the tests' reference does (nf4)."""
    from conftest import write_model

    path = write_model(str(tmp_path_factory.mktemp("quant")), "llama")
    files = distllm._ModelFiles(path)
    shard = distllm.StageShard(files, distllm._load_config(files), 1, 2, quant="nf4", dtype=torch.float32,
                               device=torch.device("cpu"))
    return _linears(shard.layers[0]), _linears(reference_model(path, "nf4").model.layers[1])


def test_a_workers_4bit_layer_and_the_references_give_bit_identical_outputs(worker_and_reference_layers):
    worker, reference = worker_and_reference_layers
    assert set(worker) == set(reference) and len(worker) == 7  # q, k, v, o, gate, up, down
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():  # as a worker runs its steps
        for name, mine in worker.items():
            x = torch.randn(3, mine.in_features, generator=g)
            for _ in range(2):  # the first call may repack the weight: compare before and after it
                assert torch.equal(mine(x), reference[name](x)), name


def test_4bit_layers_take_the_path_this_cpu_has_and_are_in_eval_mode(worker_and_reference_layers):
    packs = _cpu_has_avx512_bf16()
    assert bnb.functional.has_avx512bf16() == packs  # bitsandbytes reads the CPU as the kernel does
    layer = distllm.quantize_linears(torch.nn.Sequential(torch.nn.Linear(64, 32)), "nf4", torch.float32,
                                     torch.device("cpu"))[0]
    assert not layer.training  # eval mode, as the workers' shards run
    with torch.inference_mode():
        layer(torch.randn(2, 64))
    for q in [layer, *(m for side in worker_and_reference_layers for m in side.values())]:
        # The repack leaves this flag on the quant state: bfloat16 dequantization from then on.
        assert bool(getattr(q.weight.quant_state, "packing_format_for_cpu", False)) == packs
