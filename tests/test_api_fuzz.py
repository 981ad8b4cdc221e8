"""Fuzzing of our own: Hypothesis-made requests against the live OpenAI-compatible API, and the
sampler over any logits and parameters.

The API's promises, checked on every generated request: no 5xx but the documented 503
(the cluster cannot answer now) and 504 (past the deadline); every error in OpenAI's shape;
every stream that starts ends with [DONE] or an error event; and afterwards the same answer
to a fixed request as before. Bounded: about 350 requests, well under a minute here.
"""

from __future__ import annotations

import json
import math

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import distllm

KEY = "sk-fuzz"
AUTH = {"Authorization": f"Bearer {KEY}"}

# Text as a hostile client sends it: any code point, lone surrogates included (JSON can carry them).
texts = st.text(alphabet=st.characters(codec=None, min_codepoint=0, max_codepoint=0x10FFFF), max_size=12)
junk = st.one_of(st.none(), st.booleans(), st.integers(-10 ** 20, 10 ** 20), st.floats(allow_nan=False,
                 allow_infinity=False), texts, st.lists(st.integers(-2, 3), max_size=3),
                 st.dictionaries(texts, st.integers(), max_size=2))
numbers = st.one_of(st.floats(min_value=-3, max_value=3), st.floats(min_value=0, max_value=1e-30),
                    st.sampled_from([0, 1, 2, 1e-40, 5e-324, 1e300, 3.4e38, -0.0]), junk)
small_ints = st.one_of(st.integers(-3, 6), st.sampled_from([0, 10 ** 30, -(10 ** 30)]).filter(lambda v: v <= 0),
                       junk)
token_lists = st.lists(st.one_of(st.integers(0, 300), st.integers(-5, 10 ** 12), junk), min_size=0, max_size=6)


def fields(prompt_field: dict) -> st.SearchStrategy[dict]:
    optional = {"max_tokens": small_ints, "temperature": numbers, "top_p": numbers, "seed": st.one_of(
        st.integers(-(10 ** 30), 10 ** 30), junk), "stop": st.one_of(texts, st.lists(texts, max_size=5), junk),
        "stream": st.one_of(st.booleans(), junk), "stream_options": st.one_of(
            st.fixed_dictionaries({"include_usage": st.booleans()}), junk),
        "timeout": st.one_of(st.sampled_from([1e300, 3.4e38, 0.001, 30]), numbers), "n": st.one_of(
            st.just(1), junk), "logprobs": junk, "user": texts, texts: junk}
    return st.fixed_dictionaries({"model": st.one_of(st.just("tiny"), st.just("tiny"), texts, junk), **prompt_field},
                                 optional={k: v for k, v in optional.items() if isinstance(k, str)})


completion_bodies = fields({"prompt": st.one_of(texts.filter(bool), texts, token_lists, st.lists(texts, max_size=2),
                                                junk)})
messages = st.lists(st.one_of(st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["user", "system",
                                                                                         "assistant"]), texts, junk),
                                                     "content": st.one_of(texts, junk, st.lists(st.fixed_dictionaries(
                                                         {"type": st.just("text"), "text": texts}), max_size=2))}),
                              junk), max_size=3)
chat_bodies = fields({"messages": messages})


@pytest.fixture(scope="module")
def served():
    with distllm.local("tiny", workers=1, quant="none", calibrate=False, max_queued=64) as cluster:
        server = cluster.serve(port=0, api_key=KEY)
        fixed = {"model": "tiny", "prompt": "The same question", "max_tokens": 6, "temperature": 0}
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as client:
            before = client.post("/completions", json=fixed).json()["choices"][0]["text"]
            yield client
            after = client.post("/completions", json=fixed).json()["choices"][0]["text"]
        assert after == before  # the service answers as it did before the fuzzing


def check(client: httpx.Client, path: str, body: dict) -> None:
    raw = json.dumps(body, ensure_ascii=True)  # (lone surrogates travel as \\ud800 escapes, as JSON allows)
    with client.stream("POST", path, content=raw, headers={"Content-Type": "application/json"}) as r:
        assert r.status_code < 500 or r.status_code in (503, 504), (r.status_code, r.read()[:400], body)
        if r.status_code != 200:
            error = json.loads(r.read())["error"]
            assert isinstance(error["message"], str) and error["type"], error
            return
        if r.headers["content-type"].startswith("text/event-stream"):
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
            assert events, body
            assert events[-1] == "[DONE]" or "error" in json.loads(events[-1]), (events[-3:], body)
        else:
            assert json.loads(r.read())["choices"]


@settings(max_examples=180, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=completion_bodies)
def test_completions_never_fail_with_a_5xx_and_streams_end_with_a_word(served, body):
    check(served, "/completions", body)


@settings(max_examples=170, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=chat_bodies)
def test_chat_completions_never_fail_with_a_5xx_and_streams_end_with_a_word(served, body):
    check(served, "/chat/completions", body)


logit_values = st.one_of(st.floats(-1e4, 1e4), st.sampled_from([math.inf, -math.inf, math.nan, 3.4e38, -3.4e38]))


@settings(max_examples=400, deadline=None)
@given(logits=st.lists(logit_values, min_size=1, max_size=40),
       temperature=st.one_of(st.floats(0, 5), st.floats(0, 1e-3), st.sampled_from([1e-40, 5e-324, 1e-4])),
       top_p=st.floats(1e-300, 1.0).filter(lambda p: p > 0), top_k=st.integers(0, 50), seed=st.integers(-2**70, 2**70),
       position=st.integers(0, 10 ** 6))
def test_the_sampler_takes_any_logits_and_parameters(logits, temperature, top_p, top_k, seed, position):
    params = distllm.SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    t = torch.tensor(logits, dtype=torch.float32)
    usable = t.nan_to_num(-math.inf, math.inf, -math.inf)
    if not (usable > -math.inf).any():
        with pytest.raises(distllm.DistllmError, match="usable logit"):
            distllm.sample(t, params, position)
        return
    picked = distllm.sample(t, params, position)
    assert 0 <= picked < len(logits)
    if (usable == math.inf).any():
        assert usable[picked] == math.inf  # +inf beats everything
    else:
        assert usable[picked] > -math.inf
    if params.temperature == 0:
        assert picked == int(torch.argmax(usable))  # greedy: the first of the largest
    assert distllm.sample(t, params, position) == picked  # seeded by (seed, position): the same again
