"""A model split across real worker processes gives exactly transformers' tokens.

Every family, with 1 to 4 workers, float32 and nf4: prompts of 1..64 tokens are
submitted at once (several sessions in flight, prompts longer than a prefill chunk)
and each completion is compared token for token with `generate(do_sample=False)` on
the whole model in this process, quantized by the same code path where it applies.
"""

from __future__ import annotations

import functools

import pytest
import torch

import distllm
from conftest import FAMILIES, prompt_of, reference_generate, reference_model, reference_sampled, write_model

PROMPT_LENGTHS = (1, 7, 30, 64)
NEW_TOKENS = 32


@functools.lru_cache(maxsize=None)
def _expected(path: str, quant: str) -> dict[int, list[int]]:
    ref = reference_model(path, quant)
    return {n: reference_generate(ref, prompt_of(n), NEW_TOKENS) for n in PROMPT_LENGTHS}


def _generate_concurrently(cluster, prompts: dict[int, list[int]], **params) -> dict[int, list[int]]:
    streams = {n: cluster.stream(p, max_new_tokens=NEW_TOKENS, **params) for n, p in prompts.items()}
    return {n: list(s) for n, s in streams.items()}


@pytest.mark.parametrize("quant", ["none", "nf4"])
@pytest.mark.parametrize("family", FAMILIES)
def test_tokens_identical_to_transformers(family, quant, model_dir):
    path = model_dir(family)
    want = _expected(path, quant)
    assert any(len(v) == NEW_TOKENS for v in want.values()), "reference ended early everywhere: weak test"
    prompts = {n: prompt_of(n) for n in PROMPT_LENGTHS}
    for workers in (1, 2, 3, 4):
        with distllm.local(path, workers=workers, stages=workers, quant=quant, prefill_chunk=16) as cluster:
            assert len(cluster.layer_map()) == workers
            got = _generate_concurrently(cluster, prompts)
        for n in PROMPT_LENGTHS:
            assert got[n] == want[n], f"{family}/{quant}, {workers} workers, prompt of {n} tokens"


def test_seeded_sampling_is_reproducible_and_matches_reference(model_dir):
    path = model_dir("qwen2")
    prompt = prompt_of(12)
    options = dict(max_new_tokens=24, temperature=0.9, top_p=0.95, top_k=40)
    with distllm.local(path, workers=3, stages=3, quant="none", prefill_chunk=5) as cluster:
        first = cluster.generate(prompt, seed=7, **options)
        again = cluster.generate(prompt, seed=7, **options)
        other = cluster.generate(prompt, seed=8, **options)
    assert first == again
    assert first != other
    params = distllm.SamplingParams(seed=7, **options)
    assert first == reference_sampled(reference_model(path), prompt, params)


def test_text_in_text_out_and_stream_pieces(model_dir):
    path = model_dir("llama")
    with distllm.local(path, workers=2, stages=2, quant="none") as cluster:
        text = cluster.generate("Hello, world", max_new_tokens=20)
        pieces = list(cluster.stream("Hello, world", max_new_tokens=20))
        ids = cluster.generate(cluster.tokenizer("Hello, world")["input_ids"], max_new_tokens=20)
    assert isinstance(text, str) and text
    assert "".join(pieces) == text
    assert len(pieces) > 1, "stream must yield pieces as they are decoded"
    assert text == cluster.tokenizer.decode(ids, skip_special_tokens=True)


def test_bad_requests_are_refused_and_cluster_keeps_serving(model_dir):
    path = model_dir("llama")  # context of 256 positions
    with distllm.local(path, workers=2, stages=2, quant="none") as cluster:
        with pytest.raises(distllm.PromptTooLongError, match="256"):
            cluster.generate(prompt_of(300), max_new_tokens=4)
        with pytest.raises(distllm.RequestError, match="vocabulary"):
            cluster.generate([5, 100_000], max_new_tokens=4)
        with pytest.raises(distllm.RequestError, match="max_new_tokens"):
            cluster.generate([5, 6], max_new_tokens=-1)
        with pytest.raises(distllm.RequestError, match="empty"):
            cluster.generate([], max_new_tokens=4)
        assert cluster.generate([5, 6], max_new_tokens=0) == []
        # A prompt that nearly fills the context stops at the context's end.
        out = cluster.generate(prompt_of(250), max_new_tokens=50)
        assert len(out) <= 6
        assert len(cluster.generate(prompt_of(5), max_new_tokens=8)) > 0


def test_unsupported_model_names_the_supported_families(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path)
    with pytest.raises(distllm.UnsupportedModelError) as err:
        distllm.host(str(tmp_path), workers=1)
    message = str(err.value)
    assert "gpt2" in message
    for family in FAMILIES:
        assert family in message


def test_unknown_option_is_named():
    with pytest.raises(TypeError, match="qaunt"):
        distllm.Config.build(qaunt="nf4")
    with pytest.raises(ValueError, match="quant"):
        distllm.Config(quant="fp3")


def test_int8_tokens_identical_to_reference_quantized_the_same_way(model_dir):
    path = model_dir("qwen3")
    prompts = {n: prompt_of(n) for n in (3, 40)}
    ref = reference_model(path, "int8")
    want = {n: reference_generate(ref, p, 16) for n, p in prompts.items()}
    with distllm.local(path, workers=2, stages=2, quant="int8", prefill_chunk=16) as cluster:
        got = {n: cluster.generate(p, max_new_tokens=16) for n, p in prompts.items()}
    assert got == want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_replay_computes_generated_positions_one_at_a_time_as_they_first_ran(dtype, tmp_path):
    # Kernels round differently for one position and for many: a replay that ran the generated
    # positions as one chunk would rebuild a slightly different cache (GPU greedy tokens then drift).
    path = write_model(str(tmp_path), "llama", hidden=256, intermediate=512, layers=2)
    files = distllm._ModelFiles(path)
    config = distllm._load_config(files)

    def shard():
        return distllm.StageShard(files, config, 0, 2, quant="none", dtype=dtype, device=torch.device("cpu"))

    hidden = torch.randn(1, 40, 256)
    first = shard()  # the first pass: an 8-position prompt, then one position per generated token
    ref = torch.cat([first.forward("s", hidden[:, :8], 0)]
                    + [first.forward("s", hidden[:, i:i + 1], i) for i in range(8, 40)], dim=1)
    assert torch.equal(shard().forward("s", hidden, 0, decode_from=8), ref)
    assert not torch.equal(shard().forward("s", hidden, 0), ref)  # the shortcut it replaces differs


def test_a_replay_of_a_prompt_and_one_generated_position_splits_them(tmp_path):
    path = write_model(str(tmp_path), "llama", hidden=256, intermediate=512, layers=2)
    files = distllm._ModelFiles(path)
    config = distllm._load_config(files)

    def shard():
        return distllm.StageShard(files, config, 0, 2, quant="none", dtype=torch.float32,
                                  device=torch.device("cpu"))

    hidden = torch.randn(1, 8, 256)
    first = shard()
    ref = torch.cat([first.forward("s", hidden[:, :7], 0), first.forward("s", hidden[:, 7:], 7)], dim=1)
    assert torch.equal(shard().forward("s", hidden, 0, decode_from=7), ref)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma"])
def test_preallocated_cache_gives_what_the_growing_cache_gives(family, model_dir):
    # The GPU path (fixed buffers, masks over their whole capacity) checked here on the CPU: a long
    # prefill that outgrows the first buffers, decode steps past sliding windows, and a replay.
    path = model_dir(family)
    files = distllm._ModelFiles(path)
    config = distllm._load_config(files)

    def shard(static):
        return distllm.StageShard(files, config, 1, 4, quant="none", dtype=torch.float32,
                                  device=torch.device("cpu"), static_cache=static, cuda_graphs=False)

    hidden = torch.randn(1, 300, config.hidden_size)
    outs = {}
    for static in (False, True):
        s = shard(static)
        got = [s.forward("a", hidden[:, :260], 0)] + [s.forward("a", hidden[:, i:i + 1], i) for i in range(260, 290)]
        got.append(s.forward("a", hidden[:, 280:300], 280, decode_from=250))  # replay from 280, then 10 more
        s.forward("b", hidden[:, :5], 0)  # another session beside it
        got.append(s.forward("b", hidden[:, 5:6], 5))
        outs[static] = got
    for dynamic, static in zip(outs[False], outs[True]):
        torch.testing.assert_close(static, dynamic, rtol=1e-4, atol=1e-4)
    assert distllm.StageShard(files, config, 1, 2, quant="none", dtype=torch.float32,
                              device=torch.device("cpu")).static is False  # CPU workers keep the growing cache
