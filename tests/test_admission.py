"""A service under load: a bounded queue that refuses the excess at once (the API's 429 with
Retry-After), deadlines that cancel a request on every stage, and clients that hang up freeing their
slots at once, before their first token too."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

import distllm
from conftest import prompt_of, wait_for

SLOW = dict(quant="none", calibrate=False, heartbeat_s=0.2, liveness_s=5.0)


def _sessions_held(cluster) -> int:
    return sum(w["sessions"] for w in cluster.workers() if w["alive"])


def test_past_max_active_and_max_queued_requests_are_refused_at_once_and_the_queue_drains():
    with distllm.local("tiny", workers=2, max_active=2, max_queued=1, **SLOW) as cluster:
        running = [cluster.stream(prompt_of(5 + i), max_new_tokens=400) for i in range(2)]
        for stream in running:
            next(stream)  # both run
        queued = cluster.stream(prompt_of(9), max_new_tokens=3)
        t0 = time.monotonic()
        with pytest.raises(distllm.OverloadedError, match="2 requests running and 1 waiting") as err:
            cluster.generate(prompt_of(4), max_new_tokens=3)
        assert time.monotonic() - t0 < 1.0 and err.value.retry_after >= 1
        assert cluster.stats()["tokens"] < 400  # the queued one has not started: no slot for it
        for stream in running:  # the two running ones are dropped: the queued one gets a slot and runs
            stream.close()
        assert len(list(queued)) == 3
        assert cluster.generate(prompt_of(4), max_new_tokens=3)  # room again


def test_the_api_answers_the_excess_with_429_and_retry_after_and_serves_the_admitted():
    with distllm.local("tiny", workers=2, max_active=1, max_queued=0, test_step_delay_ms=20, **SLOW) as cluster:
        server = cluster.serve(port=0)
        client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0)
        first = client.completions.create(model="tiny", prompt="Once", max_tokens=300, stream=True)
        next(iter(first))  # admitted and streaming
        response = httpx.post(f"{server.url}/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 4})
        assert response.status_code == 429 and int(response.headers["Retry-After"]) >= 1
        assert response.json()["error"]["code"] == "overloaded"
        first.close()  # hung up: its slot frees at once
        wait_for(lambda: cluster.stats()["requests"] >= 1, what="the dropped stream to end")
        got = client.completions.create(model="tiny", prompt="Hi", max_tokens=4)
        assert got.choices[0].finish_reason in ("stop", "length")  # served


def test_a_request_past_its_deadline_is_cancelled_on_every_worker():
    with distllm.local("tiny", workers=2, stages=2, test_step_delay_ms=20, **SLOW) as cluster:
        t0 = time.monotonic()
        with pytest.raises(distllm.DeadlineExceeded, match="deadline"):
            cluster.generate(prompt_of(8), max_new_tokens=500, timeout=1.5)
        assert time.monotonic() - t0 < 4.0
        assert isinstance(distllm.DeadlineExceeded("x"), TimeoutError)
        wait_for(lambda: _sessions_held(cluster) == 0, what="the workers to drop the cancelled session")
        assert cluster.stats()["request_errors"] == 1


def test_a_stream_dropped_before_its_first_token_frees_its_slot_at_once():
    """The first token is slow to come (slowed workers); the client sends its request and hangs up
    before it: the request ends at once, on every worker, and its slot is free for the next."""
    import json
    import socket

    with distllm.local("tiny", workers=2, stages=2, max_active=1, max_queued=0, test_step_delay_ms=400,
                       **SLOW) as cluster:
        server = cluster.serve(port=0)
        body = json.dumps({"model": "tiny", "prompt": "Once upon a time", "max_tokens": 50, "stream": True})
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
            wait_for(lambda: cluster._core._admission.active == 1, timeout=10, what="the request to be admitted")
        # hung up: no token yet (its first is seconds away)
        wait_for(lambda: cluster.stats()["requests"] == 1, timeout=5, what="the dropped request to end")
        assert cluster.stats()["tokens"] == 0 and cluster._core._admission.active == 0
        wait_for(lambda: _sessions_held(cluster) == 0, what="the workers to drop its caches")
