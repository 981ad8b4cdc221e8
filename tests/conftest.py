"""Shared fixtures: tiny random models of every supported family, references, a fake Hub.

Models are built from a config, saved with `save_pretrained` and loaded back through
the same code path a Hub repo takes; nothing is downloaded.
"""

from __future__ import annotations

import os
import tempfile
import time

# No test may reach the real Hub: a stray request goes to a closed local port and
# fails at once. Tests that need a Hub pass the fake one's endpoint explicitly.
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="distllm-hf-cache-")  # fresh: downloads are observable
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DISTLLM_CACHE", tempfile.mkdtemp(prefix="distllm-cache-"))

import pytest
import torch

import distllm

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma")

# The other families the generic layer loop runs (tests/test_families.py), each with what makes its tiny
# config exercise the family's own parts (sliding layers mixed with full ones, softcaps, multipliers,
# partial rotary, experts and shared experts, sinks); built with AutoConfig.for_model.
MORE_FAMILIES = {
    "gemma2": dict(sliding_window=8, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma3_text": dict(sliding_window=8, sliding_window_pattern=2),
    "olmo2": {},
    "olmo3": dict(sliding_window=8),
    "granite": dict(embedding_multiplier=2.0, logits_scaling=4.0, residual_multiplier=0.5, attention_multiplier=0.3),
    "cohere": dict(logit_scale=0.5),
    "cohere2": dict(sliding_window=8, logit_scale=0.5),
    "phi": dict(partial_rotary_factor=0.5),
    "starcoder2": {},
    "stablelm": dict(partial_rotary_factor=0.25),
    "glm4": {},
    "smollm3": {},
    "exaone4": dict(sliding_window=8),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                      shared_expert_intermediate_size=64),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=8),
}


def family_config(family: str, *, hidden: int = 64, layers: int = 4, intermediate: int = 128, **over):
    """Return a small random-model config of `family` (weights std 0.2, vocab of the tiny tokenizer): one of
    FAMILIES, of MORE_FAMILIES, or any other model type transformers knows (AutoConfig.for_model)."""
    import transformers as tf

    vocab = len(distllm._tiny_tokenizer())
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, initializer_range=0.2, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0)
    if family not in FAMILIES:
        return tf.AutoConfig.for_model(family, **{**common, "head_dim": 16, **MORE_FAMILIES.get(family, {}), **over})
    extra = {
        "llama": (tf.LlamaConfig, {}),
        "mistral": (tf.MistralConfig, {"sliding_window": 8}),
        # Qwen2 with sliding layers from layer 2 on: a stage mixes full and windowed masks.
        "qwen2": (tf.Qwen2Config, {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2}),
        "qwen3": (tf.Qwen3Config, {"head_dim": 16}),
        "phi3": (tf.Phi3Config, {"sliding_window": 16}),
        "gemma": (tf.GemmaConfig, {"head_dim": 16, "tie_word_embeddings": True}),
    }[family]
    cls, specific = extra
    return cls(**{**common, **specific, **over})


def write_model(path: str, family: str, *, seed: int = 0, max_shard_size: str | None = None, **over) -> str:
    """Write a random model of `family` and the tiny tokenizer to `path`; return `path`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family, **over))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    distllm._tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """Return a function family -> directory of that family's tiny model (built once per session)."""
    made: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in made:
            made[family] = write_model(str(tmp_path_factory.mktemp(family)), family)
        return made[family]

    return get


def reference_model(path: str, quant: str = "none"):
    """Load the whole model in this process; quantize its decoder layers the way workers do."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if quant != "none":
        for layer in model.model.layers:
            distllm.quantize_linears(layer, quant, torch.float32, torch.device("cpu"))
    return model


def reference_generate(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy tokens of transformers' own generate()."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def reference_sampled(model, prompt: list[int], params: distllm.SamplingParams) -> list[int]:
    """Sample with distllm's sampler on logits of the whole model, recomputed from scratch each step."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(params.max_new_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            ids.append(distllm.sample(logits, params, len(ids)))
            if ids[-1] == 2:
                break
    return ids[len(prompt):]


def prompt_of(length: int, seed: int = 0) -> list[int]:
    """A deterministic prompt of `length` printable-character token ids."""
    g = torch.Generator().manual_seed(seed + length)
    return torch.randint(3, 98, (length,), generator=g).tolist()


@pytest.fixture(scope="session")
def model8(tmp_path_factory):
    """An 8-layer tiny llama: enough layers for three stages and a standby."""
    return write_model(str(tmp_path_factory.mktemp("llama8")), "llama", layers=8)


def holder_of(cluster, layer: int):
    """The live local worker process holding `layer` (its first replica)."""
    for first, last, names in cluster.layer_map():
        if first <= layer <= last:
            name = names.split(", ")[0]
            return next(p for p in cluster.local_processes if p.name == name)
    raise AssertionError(f"nobody holds layer {layer}")


def wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    """Poll `predicate` until it holds; fail the test naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def reference_text(path: str, prompt: str, max_new_tokens: int, quant: str = "none") -> str:
    """The completion a single process (transformers' generate, greedy) gives for a text prompt."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    new = reference_generate(reference_model(path, quant), ids, max_new_tokens)
    return distllm._completion_text(tokenizer, ids, new)
