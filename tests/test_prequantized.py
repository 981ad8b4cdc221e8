"""Pre-quantized bitsandbytes checkpoints (the `*-bnb-4bit` repos most free-tier users download) are
served as they are stored: workers read their layers' packed 4-bit weights and quant states into
`Linear4bit` with no 16-bit copy and fetch only their share of the files; the tokens equal that
4-bit model's in one process.

The checkpoints are written by transformers + bitsandbytes on the CPU (`save_pretrained` of a model
loaded with `BitsAndBytesConfig(load_in_4bit=True)`), exactly what such a Hub repo holds.
"""

from __future__ import annotations

import json
import os

import bitsandbytes as bnb
import pytest
import torch

import distllm
from conftest import prompt_of, reference_generate, write_model
from fakehub import FakeHub


def _write_4bit(tmp_path_factory, *, quant_type: str, double: bool, layers: int = 6) -> str:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    src = write_model(str(tmp_path_factory.mktemp("float")), "llama", layers=layers)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double,
        bnb_4bit_compute_dtype=torch.float32))
    out = str(tmp_path_factory.mktemp(f"bnb-{quant_type}-{double}"))
    model.save_pretrained(out, max_shard_size="60KB")  # several shards: a worker fetches only its own
    distllm._tiny_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=[("nf4", False), ("nf4", True), ("fp4", False)],
                ids=["nf4", "nf4-double", "fp4"])
def bnb_dir(request, tmp_path_factory):
    quant_type, double = request.param
    return _write_4bit(tmp_path_factory, quant_type=quant_type, double=double)


def _reference(path: str, prompt: list[int], tokens: int) -> list[int]:
    """The same 4-bit checkpoint loaded by transformers in this process."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return reference_generate(model, prompt, tokens)


@pytest.mark.parametrize("workers", [1, 3])
def test_a_4bit_checkpoint_serves_the_tokens_of_that_model_in_one_process(bnb_dir, workers):
    prompt = prompt_of(11)
    want = _reference(bnb_dir, prompt, 20)
    with distllm.local(bnb_dir, workers=workers, stages=workers, calibrate=False) as cluster:
        assert cluster.generate(prompt, max_new_tokens=20) == want


def test_a_workers_layers_are_the_stored_packed_weights_with_no_16_bit_copy(bnb_dir):
    files = distllm._ModelFiles(bnb_dir)
    config = distllm._load_config(files)
    shard = distllm.StageShard(files, config, 2, 4, quant="nf4", dtype=torch.float32, device=torch.device("cpu"))
    from safetensors import safe_open

    with open(os.path.join(bnb_dir, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    name = "model.layers.3.mlp.down_proj.weight"
    with safe_open(os.path.join(bnb_dir, weight_map[name]), "pt") as f:
        stored = f.get_tensor(name)
    q = shard.layers[1].mlp.down_proj
    assert isinstance(q, bnb.nn.Linear4bit) and not q.training
    assert q.weight.dtype == torch.uint8 and torch.equal(q.weight.data, stored)  # as stored, not re-quantized
    want_type = json.load(open(os.path.join(bnb_dir, "config.json")))["quantization_config"]["bnb_4bit_quant_type"]
    assert q.weight.quant_state.quant_type == want_type
    floats = [n for n, p in shard.layers.named_parameters() if p.is_floating_point() and p.dim() == 2]
    assert floats == []  # no 16- or 32-bit matrix anywhere in the stage


def test_workers_fetch_only_their_share_of_a_4bit_repo_and_the_planner_counts_its_real_bytes(bnb_dir, tmp_path):
    with FakeHub({"me/tiny-bnb-4bit": bnb_dir}) as hub:
        files = distllm._ModelFiles("me/tiny-bnb-4bit", endpoint=hub.endpoint, cache_dir=str(tmp_path))
        config = distllm._load_config(files)
        distllm.StageShard(files, config, 3, 6, quant="nf4", dtype=torch.float32, device=torch.device("cpu"))
        fetched = {f for f in hub.downloads("me/tiny-bnb-4bit") if f.endswith(".safetensors")}
    with open(os.path.join(bnb_dir, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    share = {weight_map[k] for k in weight_map if any(k.startswith(f"model.layers.{i}.") for i in range(3, 6))}
    assert fetched == share and len(fetched) < len(set(weight_map.values()))
    # The planner's bytes per layer: what the checkpoint stores for one layer (packed weights and states).
    estimate = distllm._layer_bytes(config, "nf4", torch.float32)
    stored = _stored_bytes(bnb_dir, weight_map, "model.layers.0.")
    assert 0.8 < estimate / stored < 1.25, (estimate, stored)


def _stored_bytes(path: str, weight_map: dict, prefix: str) -> int:
    from safetensors import safe_open

    total = 0
    for file in sorted(set(weight_map.values())):
        with safe_open(os.path.join(path, file), "pt") as f:
            total += sum(f.get_tensor(k).nbytes for k in f.keys() if k.startswith(prefix))
    return total


def test_other_quantized_checkpoints_are_refused_naming_what_works(tmp_path):
    path = write_model(str(tmp_path / "gptq"), "llama")
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(distllm.UnsupportedModelError, match="gptq.*bitsandbytes"):
        distllm._load_config(distllm._ModelFiles(path))


def test_a_checkpoint_no_worker_can_load_fails_within_seconds_with_the_workers_reason(tmp_path):
    """A checkpoint missing one layer's tensors: the host reads it, every worker fails to load it. Requests
    and local() fail at once with the workers' reason instead of waiting out wait_timeout_s (600 s)."""
    import time

    from safetensors.torch import load_file, save_file

    path = write_model(str(tmp_path / "broken"), "llama")
    weights = load_file(os.path.join(path, "model.safetensors"))
    save_file({k: v for k, v in weights.items() if not k.startswith("model.layers.1.")},
              os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    t0 = time.monotonic()
    with pytest.raises(distllm.ClusterNotReadyError, match="no worker could load the model.*lacks"):
        distllm.local(path, workers=2, quant="none", calibrate=False)
    assert time.monotonic() - t0 < 60
    with distllm.host(path, quant="none", calibrate=False, workers=1) as cluster:
        cluster.spawn_local(1)
        with pytest.raises(distllm.ClusterNotReadyError, match="lacks"):
            cluster.generate(prompt_of(5), max_new_tokens=4)
        with pytest.raises(distllm.ClusterNotReadyError, match="lacks"):
            cluster.wait_ready(60)
        assert "no worker could load the model" in cluster.status
