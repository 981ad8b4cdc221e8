"""The OpenAI-compatible API, spoken to by the official `openai` client over real HTTP.

Every answer is compared with `cluster.generate` for the same prompt, parameters and
seed (itself token-identical to a single process, test_engine.py).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

import distllm

KEY = "sk-test-key"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]


@pytest.fixture(scope="module")
def served():
    with distllm.local("tiny", workers=2, quant="none", calibrate=False) as cluster:
        server = cluster.serve(port=0, api_key=KEY)
        yield cluster, server, openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0)


def chat_reference(cluster, max_tokens, **params):
    ids = distllm.chat_prompt_ids(cluster.tokenizer, CHAT)
    new = cluster.generate(ids, max_new_tokens=max_tokens, **params)
    return distllm._completion_text(cluster.tokenizer, ids, new), len(ids), len(new)


def test_models_lists_the_served_model(served):
    _, _, client = served
    assert [m.id for m in client.models.list()] == ["tiny"]


@pytest.mark.parametrize("params", [dict(temperature=0.0), dict(temperature=0.9, top_p=0.9, seed=7)])
def test_completions_plain_and_streamed_equal_generate(served, params):
    cluster, _, client = served
    want = cluster.generate("Once upon a time", max_new_tokens=24, **params)
    ids = cluster.tokenizer("Once upon a time")["input_ids"]
    got = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=24, **params)
    assert got.choices[0].text == want
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(ids), 24)
    assert got.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=24, stream=True,
                                            stream_options={"include_usage": True}, **params))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert len([c for c in chunks if c.choices]) > 3  # it came in pieces
    assert chunks[-1].usage.completion_tokens == 24


@pytest.mark.parametrize("params", [dict(temperature=0.0), dict(temperature=0.7, seed=11)])
def test_chat_plain_and_streamed_equal_generate_through_the_chat_template(served, params):
    cluster, _, client = served
    want, prompt_tokens, new_tokens = chat_reference(cluster, 20, **params)
    got = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=20, **params)
    assert got.choices[0].message.content == want and got.choices[0].message.role == "assistant"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (prompt_tokens, new_tokens)
    stream = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=20, stream=True, **params)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == want


def test_stop_strings_cut_the_answer_plain_and_streamed(served):
    cluster, _, client = served
    full = cluster.generate("Stop here", max_new_tokens=40)
    stop = full[12:14]
    want = full[:full.find(stop)]
    got = client.completions.create(model="tiny", prompt="Stop here", max_tokens=40, temperature=0, stop=[stop, "\x7f"])
    assert got.choices[0].text == want and got.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt="Stop here", max_tokens=40, temperature=0, stop=stop,
                                         stream=True)
    pieces = [(c.choices[0].text, c.choices[0].finish_reason) for c in streamed]
    assert "".join(p for p, _ in pieces) == want and pieces[-1][1] == "stop"


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(served):
    cluster, server, client = served
    raw = httpx.post(f"{server.url}/completions", content=b'{"model": "tiny", "prompt": ',
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-4", prompt="hi")
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt="x" * 2100, max_tokens=4)  # the context is 2048
    assert err.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.AuthenticationError) as err:
        openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0).models.list()
    assert err.value.body["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/models").status_code == 401  # no key at all
    for bad in (dict(max_tokens=-1), dict(max_tokens=0), dict(temperature=3), dict(n=2), dict(logprobs=2),
                dict(stop=[1])):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="tiny", prompt="hi", **bad)
        assert err.value.body["param"] == next(iter(bad)), bad
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[])
    assert httpx.get(f"{server.url}/nowhere", headers={"Authorization": f"Bearer {KEY}"}).json()["error"]
    got = client.completions.create(model="tiny", prompt="still here", max_tokens=5, temperature=0)
    assert got.choices[0].text == cluster.generate("still here", max_new_tokens=5)


def test_eight_streams_in_flight_all_complete_while_a_worker_is_sigkilled():
    with distllm.local("tiny", workers=3, stages=2, quant="none", calibrate=False, test_step_delay_ms=2,
                       liveness_s=2.0, heartbeat_s=0.25) as cluster:
        server = cluster.serve(port=0)
        client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0)
        prompts = [f"Story number {i}:" for i in range(8)]
        got, started = {}, threading.Event()

        def stream(i):
            text = ""
            for chunk in client.completions.create(model="tiny", prompt=prompts[i], max_tokens=48, seed=i,
                                                   temperature=0.8, stream=True):
                text += chunk.choices[0].text
                if len(text) > 8:
                    started.set()
            got[i] = text

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        assert started.wait(60)
        victim = cluster.layer_map()[0][2].split(", ")[0]
        os.kill(next(p for p in cluster.local_processes if p.name == victim).pid, signal.SIGKILL)
        for t in threads:
            t.join(120)
        assert cluster.stats()["failures"] >= 1
        assert sorted(got) == list(range(8))
        for i, p in enumerate(prompts):
            assert got[i] == cluster.generate(p, max_new_tokens=48, seed=i, temperature=0.8), i


def test_serve_command_starts_a_local_cluster_behind_the_api(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "distllm", "serve", "tiny", "--workers", "1", "--quant", "none",
                             "--port", "0", "--bind", "127.0.0.1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "DISTLLM_API_KEY": KEY})
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "serve exited early"
            found = re.search(r"API at (http://\S+)", line)
            url = found and found.group(1)
        client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
        answer = client.completions.create(model="tiny", prompt="hello", max_tokens=6, temperature=0)
        assert answer.choices[0].text and answer.usage.completion_tokens == 6
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
