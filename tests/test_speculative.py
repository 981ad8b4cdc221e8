"""Speculative decoding through the pipeline: the host drafts tokens, one step carries them through
every stage, and the host keeps what the target agrees with. The output is exactly plain decoding's.

Real worker processes, float32 tiny models; drafts from prompt lookup and from draft models held by
the host: a slightly perturbed copy of the target (it agrees often, not always) and an unrelated
model (it rarely agrees). Every completion is compared token for token with transformers' generate()
on the whole target (greedy) or with distllm's sampler on the whole model (seeded sampling).
"""

from __future__ import annotations

import os
import signal
import threading

import pytest
import torch

import distllm
from conftest import prompt_of, reference_generate, reference_model, reference_sampled, wait_for, write_model

PROMPTS = (5, 12, 33)
NEW = 40
SPEC = dict(quant="none", speculate=4, speculate_adaptive=False, prefill_chunk=16)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(target, a perturbed copy of it, an unrelated model): the same tokenizer and shape."""
    from transformers import AutoModelForCausalLM

    target = write_model(str(tmp_path_factory.mktemp("target")), "llama", layers=6)
    perturbed = str(tmp_path_factory.mktemp("perturbed"))
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02 * p.std())
    model.save_pretrained(perturbed)
    distllm._tiny_tokenizer().save_pretrained(perturbed)
    unrelated = write_model(str(tmp_path_factory.mktemp("unrelated")), "llama", layers=2, seed=7)
    return target, perturbed, unrelated


def _served(target: str, *, draft: str, prompts: dict, workers: int = 3, **params) -> tuple[dict, dict]:
    with distllm.local(target, workers=workers, stages=workers, draft=draft, **SPEC) as cluster:
        streams = {n: cluster.stream(p, max_new_tokens=NEW, **params) for n, p in prompts.items()}
        got = {n: list(s) for n, s in streams.items()}
        stats = cluster.stats()
        panel = distllm._cluster_html(cluster)
    assert f"speculation: {stats['accepted']}/{stats['drafted']} drafts accepted" in panel
    return got, stats


@pytest.mark.parametrize("which", ["perturbed", "unrelated", "lookup"])
def test_greedy_tokens_identical_to_plain_decoding_with_every_drafter(models, which):
    target, perturbed, unrelated = models
    draft = {"perturbed": perturbed, "unrelated": unrelated, "lookup": "lookup"}[which]
    ref = reference_model(target)
    prompts = {n: prompt_of(n) for n in PROMPTS}
    prompts["repeat"] = prompt_of(10) * 4  # where prompt lookup finds matches
    want = {n: reference_generate(ref, p, NEW) for n, p in prompts.items()}
    assert max(len(v) for v in want.values()) >= 20, "references end early: weak test"
    got, stats = _served(target, draft=draft, prompts=prompts)
    assert got == want
    assert stats["verify_steps"] > 0 and stats["drafted"] >= stats["accepted"]
    rate = stats["accepted"] / stats["drafted"]
    print(f"{which}: {stats['accepted']}/{stats['drafted']} drafts accepted, {stats['tokens_per_trip']:.2f} tokens a trip, "
          f"windows behind another {stats['windows']} (held {stats['windows_kept']})")
    if which == "perturbed":
        assert 0.3 < rate < 1.0, rate  # partial acceptance: some drafts kept, some cropped
        assert stats["tokens_per_trip"] > 1.5, stats
        # windows in flight: some held (drafted behind a window accepted whole), some voided mid-pipe
        assert stats["windows"] > stats["windows_kept"] > 0, stats
    if which == "unrelated":
        assert rate < 0.3, rate


def test_seeded_sampling_identical_to_plain_sampling(models):
    target, perturbed, _ = models
    params = dict(temperature=0.8, top_p=0.95, seed=11)
    prompts = {n: prompt_of(n) for n in PROMPTS}
    got, stats = _served(target, draft=perturbed, prompts=prompts, **params)
    ref = reference_model(target)
    for n, p in prompts.items():
        assert got[n] == reference_sampled(ref, p, distllm.SamplingParams(max_new_tokens=NEW, **params)), n
    assert stats["accepted"] > 0 and stats["windows"] > 0, stats


def test_a_worker_sigkilled_mid_verify_is_replayed_and_the_tokens_stay(models):
    target, perturbed, _ = models
    prompt = prompt_of(12)
    want = reference_generate(reference_model(target), prompt, NEW)
    with distllm.local(target, workers=4, stages=3, draft=perturbed, heartbeat_s=0.2, liveness_s=1.0,
                       calibrate=False, **SPEC) as cluster:
        wait_for(lambda: sum(w["state"] == "standby" for w in cluster.workers()) == 1, what="a standby")
        victim = next(w for w in cluster.workers() if w["layers"] and w["layers"][0] > 0)
        got = []
        for i, tok in enumerate(cluster.stream(prompt, max_new_tokens=NEW)):
            got.append(tok)
            if i == 6:  # mid-stream: its verify steps are in the pipe
                os.kill(victim["pid"], signal.SIGKILL)
        stats = cluster.stats()
    assert got == want
    assert stats["failures"] == 1 and stats["verify_steps"] > 0 and stats["windows"] > 0, stats


def test_verify_steps_of_several_sessions_share_one_padded_step_and_the_tokens_stay(models):
    """Pooled stages (decode_batch 6): each verify step's positions are rows of a padded decode step, beside
    other sessions' steps (decode or verify) queued with it. Every session's tokens are those of the same
    layers decoding it alone in one process, one position at a time."""
    target, perturbed, _ = models
    prompts = [prompt_of(10, seed=k) * 3 for k in range(4)]  # repeats: prompt lookup finds drafts
    reference = distllm._reference_decoder(target, "none", batch=6)
    want = [reference(p, NEW)[0] for p in prompts]
    options = {**SPEC, "decode_batch": 6, "test_step_delay_ms": 3.0}  # slow steps: the others queue behind
    with distllm.local(target, workers=2, stages=2, draft="lookup", **options) as cluster:
        got: dict = {}
        threads = [threading.Thread(target=lambda k=k: got.__setitem__(k, cluster.generate(prompts[k], max_new_tokens=NEW)))
                   for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        stats = cluster.stats()
        rows = [w["verify_rows"] for w in cluster.workers() if w["layers"]]
        eos = cluster.head.eos_ids
    # (the reference decodes NEW tokens whatever they are; a request ends at its first end-of-text token)
    want = [w[:next((i + 1 for i, t in enumerate(w) if t in eos), len(w))] for w in want]
    assert [got.get(k) for k in range(4)] == want
    assert stats["verify_steps"] > 0 and stats["batched_verify"] > 0, stats
    assert rows and all(r >= 2 for r in rows), rows


def test_speculation_drafts_where_a_trip_is_dear_and_stops_where_drafts_keep_missing():
    spec = distllm._Speculation(8, distllm.PromptLookup())
    assert spec.k("s", trip_ms=300.0, position_ms=2.0) >= 4  # across the internet: many drafts pay
    assert spec.k("s", trip_ms=0.5, position_ms=5.0) == 0  # one stage on loopback: compute dominates
    for _ in range(10):
        spec.observe("s", 4, 0)  # drafts that keep missing
    assert spec.k("s", trip_ms=300.0, position_ms=2.0) == 0
    probes = [spec.k("s", trip_ms=300.0, position_ms=2.0) for _ in range(distllm._Speculation._PROBE_EVERY)]
    assert probes.count(1) == 1  # it tries again now and then
    spec.observe("s", 1, 1)
    spec.observe("s", 4, 4)
    assert spec.k("s", trip_ms=300.0, position_ms=2.0) > 0
    # one stage on loopback whose step verifies up to 16 positions at about one step's cost (a GPU's
    # padded step): drafts pay there too; one position at a time, they do not
    fresh = distllm._Speculation(8, distllm.PromptLookup())
    assert fresh.k("t", trip_ms=0.5, stages=[(5.0, 16)]) >= 4
    assert fresh.k("t", trip_ms=0.5, stages=[(5.0, 1)]) == 0
    assert fresh.k("t", trip_ms=0.5, stages=[(5.0, 3)]) == 2  # a CPU's compact rows: k + 1 within one step
    # windows in flight: across the internet with drafts that agree, several; on one stage on loopback
    # (nothing to overlap), or where the host's drafting is what takes the time, or drafts miss, fewer
    for _ in range(5):
        fresh.observe("t", 4, 4)  # drafts that agree
    assert fresh.windows("t", 4, trip_ms=300.0, stages=[(5.0, 16)] * 4, most=4) == 4
    assert fresh.windows("t", 4, trip_ms=0.5, stages=[(5.0, 16)], most=4) == 1
    fresh.interval_ms = 30.0  # two windows' answers a whole trip apart: the stages share cores, nothing overlaps
    assert fresh.windows("t", 4, trip_ms=5.0, stages=[(5.0, 16)] * 4, most=4) == 1
    fresh.interval_ms = 0.0
    for _ in range(3):
        fresh.observe("t", 4, 1)
    assert fresh.windows("t", 4, trip_ms=300.0, stages=[(5.0, 16)] * 4, most=4) == 1
    slow = distllm._Speculation(8, distllm.PromptLookup())
    slow.drafter = type("Drafter", (), {"ms_per_token": 40.0, "draft": None})()
    for _ in range(5):
        slow.observe("u", 4, 4)
    assert slow.windows("u", 4, trip_ms=300.0, stages=[(5.0, 16)] * 4, most=4) < 4


def test_prompt_lookup_drafts_what_followed_the_last_ngram():
    lookup = distllm.PromptLookup()
    assert lookup.draft("s", [1, 2, 3, 4, 5, 9, 2, 3], 3) == [4, 5, 9]
    assert lookup.draft("s", [1, 2, 3, 4, 2, 3, 7, 3], 2) == [7, 3]  # the latest match of the longest n-gram
    assert lookup.draft("s", [1, 2, 3], 3) == []


def test_a_draft_model_with_another_tokenizer_is_refused(models, tmp_path):
    from transformers import AutoTokenizer

    target, _, unrelated = models
    tok = AutoTokenizer.from_pretrained(unrelated)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(unrelated + "-tok")
    import shutil

    other = str(tmp_path / "other")
    shutil.copytree(unrelated, other)
    tok.save_pretrained(other)
    with pytest.raises(distllm.UnsupportedModelError, match="tokenizer"):
        distllm.host(target, workers=1, speculate=4, draft=other)


def test_the_openai_api_answers_a_seeded_request_as_without_speculation(models):
    import openai

    target, perturbed, _ = models
    texts, drafted = [], 0
    for speculate in (0, 4):
        with distllm.local(target, workers=2, stages=2, draft=perturbed, **{**SPEC, "speculate": speculate}) as cluster:
            server = cluster.serve(port=0)
            client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0)
            got = client.completions.create(model=cluster.model, prompt="The sky is", max_tokens=24, temperature=0.7,
                                            seed=5)
            texts.append(got.choices[0].text)
            drafted = cluster.stats()["drafted"]
    assert texts[0] == texts[1] and texts[0]
    assert drafted > 0
