"""Workers load only their layers: from the Hub (only the shards they need) or a directory,
and a worker's memory grows with its share of the layers, not with the model."""

from __future__ import annotations

import json
import os

import pytest
import torch

import distllm
from conftest import prompt_of, reference_generate, reference_model, write_model
from fakehub import FakeHub

MB = 1 << 20


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
    """An 8-layer Llama saved in many small shards (a couple of layers' tensors per file)."""
    return write_model(str(tmp_path_factory.mktemp("sharded")), "llama", layers=8, max_shard_size="100KB")


def _shards_of_layers(path: str, start: int, end: int) -> set[str]:
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    return {file for name, file in weight_map.items()
            if any(name.startswith(f"model.layers.{i}.") for i in range(start, end))}


def test_stage_fetches_only_its_shards_from_the_hub(sharded_dir, tmp_path):
    with FakeHub({"me/tiny-llama": sharded_dir}) as hub:
        files = distllm._ModelFiles("me/tiny-llama", endpoint=hub.endpoint, cache_dir=str(tmp_path))
        config = distllm._load_config(files)
        assert files.revision == FakeHub.COMMIT  # pinned, so every node loads the same commit
        distllm.StageShard(files, config, 2, 4, quant="none", dtype=torch.float32, device=torch.device("cpu"))
        fetched = {f for f in hub.downloads("me/tiny-llama") if f.endswith(".safetensors")}
    assert fetched == _shards_of_layers(sharded_dir, 2, 4)
    assert len(fetched) < len(set(json.load(open(os.path.join(sharded_dir, "model.safetensors.index.json")))
                                  ["weight_map"].values()))


def test_cluster_from_a_hub_repo_id(sharded_dir):
    prompt = prompt_of(20)
    want = reference_generate(reference_model(sharded_dir), prompt, 16)
    with FakeHub({"me/tiny-llama": sharded_dir}) as hub:
        with distllm.local("me/tiny-llama", workers=3, stages=3, quant="none", hub_endpoint=hub.endpoint) as cluster:
            got = cluster.generate(prompt, max_new_tokens=16)
            workers = cluster.workers()
        assert any(f.endswith(".safetensors") for f in hub.downloads("me/tiny-llama"))
    assert got == want
    for w in workers:
        assert set(w["files"]) == _shards_of_layers(sharded_dir, *w["layers"]), w["name"]


def test_worker_memory_grows_with_its_layers_not_the_model(tmp_path):
    # 8 layers of ~13.6 MB each (float32): one worker holds all, four hold two each.
    path = write_model(str(tmp_path), "llama", hidden=512, intermediate=1536, layers=8,
                       num_attention_heads=8, num_key_value_heads=8, max_shard_size="30MB")
    layer_mb = distllm._layer_params(distllm._load_config(distllm._ModelFiles(path))) * 4 / MB

    def growth(workers: int) -> list[float]:
        # No calibration: its temporary layer would blur the resident-memory growth measured here.
        with distllm.local(path, workers=workers, stages=workers, quant="none", calibrate=False) as cluster:
            return [(w["rss_after"] - w["rss_before"]) / MB for w in cluster.workers()]

    [whole] = growth(1)
    quarters = growth(4)
    assert whole > 0.8 * 8 * layer_mb, f"a worker holding all 8 layers grew only {whole:.0f} MB"
    for q in quarters:
        assert q < 0.45 * whole, f"a worker holding 2 of 8 layers grew {q:.0f} MB, the whole model {whole:.0f} MB"
        assert q > 0.8 * 2 * layer_mb


def test_nf4_worker_holds_a_quarter_of_float32(tmp_path):
    # 4 layers of ~64 MB in float32, large enough that fixed costs (code pages touched on
    # first use of the kernels) do not hide the per-layer size.
    path = write_model(str(tmp_path), "llama", hidden=1024, intermediate=4096, layers=4,
                       num_attention_heads=8, num_key_value_heads=8)

    def growth(quant: str) -> float:
        with distllm.local(path, workers=1, quant=quant) as cluster:
            [w] = cluster.workers()
            return (w["rss_after"] - w["rss_before"]) / MB

    full, nf4 = growth("none"), growth("nf4")
    assert nf4 < 0.35 * full, f"nf4 layers took {nf4:.0f} MB against {full:.0f} MB in float32"


def test_a_single_weights_file_on_the_hub_is_read_by_range_each_worker_its_share(tmp_path):
    """One model.safetensors with no index (many small repos): each node fetches its header and then only its
    own tensors by HTTP range requests, never the whole file; tokens equal the whole model's."""
    path = write_model(str(tmp_path / "single"), "llama", layers=8)
    assert not os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    size = os.path.getsize(os.path.join(path, "model.safetensors"))
    prompt = prompt_of(12)
    want = reference_generate(reference_model(path), prompt, 12)
    with FakeHub({"me/one-file": path}) as hub:
        with distllm.local("me/one-file", workers=3, stages=3, quant="none", hub_endpoint=hub.endpoint) as cluster:
            got = cluster.generate(prompt, max_new_tokens=12)
            shown = [w["download_bytes"] for w in cluster.workers()]
        gets = [p for method, p in hub.requests if method == "GET" and p.endswith("/model.safetensors")]
        ranged = [r for r in hub.ranges if r[1] == "model.safetensors"]
    assert got == want
    assert gets and len(gets) == len(ranged)  # every read of the weights file was a range request
    header = [r for r in ranged if r[2] < 8 + 64 * 1024]  # (the header's two reads, by each node)
    tensors = sum(end - start for _, _, start, end in ranged if (_, _, start, end) not in header)
    assert tensors < 1.5 * size  # about each tensor once, by the node that holds it (not the file per node)
    assert all(s is not None and s < size / 2 for s in shown)  # a worker's share, as the host shows it
