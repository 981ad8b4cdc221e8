"""Streams that resume: every event of a streamed completion carries an id ("<request id>/<seed>/<n>"); a
client that reconnects with `Last-Event-ID` gets the events after it, the same ones an uninterrupted stream
has, from this host or from the standby that took over when this one was SIGKILLed (real processes)."""

from __future__ import annotations

import json
import logging
import os
import signal
import time

import httpx
import pytest

import distllm
from borerelay import BoreRelay
from conftest import wait_for
from netem import free_port
from test_standby import _serving, cluster_processes  # noqa: F401 (a fixture)

BODY = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 40, "temperature": 0.9, "top_p": 0.95,
        "seed": 7, "stream": True}


def read(url: str, body: dict, last: str | None = None, stop_after: int | None = None) -> list[tuple[str, str]]:
    """(event id, data) of a stream's events; with stop_after, drop the connection after that many."""
    headers = {"Last-Event-ID": last} if last else {}
    events, current = [], None
    with httpx.stream("POST", f"{url}/completions", json=body, headers=headers, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("id: "):
                current = line[4:]
            elif line.startswith("data: "):
                events.append((current, line[6:]))
                current = None
                if stop_after is not None and len(events) >= stop_after:
                    break
    return events


def text_of(events: list[tuple[str, str]]) -> str:
    return "".join(json.loads(d)["choices"][0]["text"] for _, d in events if d != "[DONE]" and json.loads(d)["choices"])


def same_events(events) -> list[tuple[int, str]]:
    """(number, data) with the request's own id and time left out: what two runs of one request share."""
    out = []
    for i, d in events:
        data = json.loads(d) if d != "[DONE]" else d
        if isinstance(data, dict):
            data.pop("id"), data.pop("created")
        out.append((int(i.rsplit("/", 1)[1]), json.dumps(data)))
    return out


def numbers(events) -> list[int]:
    return [int(i.rsplit("/", 1)[1]) for i, _ in events]


def test_a_dropped_stream_resumes_on_the_same_host_from_its_checkpoint(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="distllm")
    with distllm.local("tiny", workers=1, quant="none", calibrate=False, store=str(tmp_path / "store")) as cluster:
        url = cluster.serve(port=0).url
        whole = read(url, BODY)
        assert whole[-1][1] == "[DONE]" and numbers(whole) == list(range(len(whole)))
        first = read(url, BODY, stop_after=12)  # the client's connection drops here
        assert same_events(first) == same_events(whole[:12])  # (the same seed: the same events)
        rid = first[-1][0].split("/")[0]
        wait_for(lambda: os.path.exists(tmp_path / "store" / "requests" / f"{rid}.json"), 30, "its checkpoint")
        rest = read(url, BODY, last=first[-1][0])
        assert numbers(rest)[0] == 12 and numbers(first + rest) == list(range(len(whole)))
        assert same_events(first + rest) == same_events(whole)
        assert text_of(first + rest) == text_of(whole)
        assert any("resumed after event 11" in r.getMessage() for r in caplog.records)
        wait_for(lambda: not os.path.exists(tmp_path / "store" / "requests" / f"{rid}.json"), 30,
                 "the checkpoint retired once the stream was whole")
        fresh = httpx.post(f"{url}/completions", json=BODY, headers={"Last-Event-ID": ""}, timeout=60)
        assert fresh.status_code == 200 and "/7/0\r\n" in fresh.text  # (an empty id: no event yet) from the start
        bad = httpx.post(f"{url}/completions", json=BODY, headers={"Last-Event-ID": "nonsense"}, timeout=30)
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_last_event_id"
        other_seed = httpx.post(f"{url}/completions", json={**BODY, "seed": 8},
                                headers={"Last-Event-ID": first[-1][0]}, timeout=30)
        assert other_seed.status_code == 400


def _active_and_standby(cluster_processes, tmp_path):
    """An active `serve` host and a standby on the same port over one store, a `join --store` worker; return
    (store, the API's URL, the active host's process) once the API answers."""
    store, port = str(tmp_path / "store"), free_port()
    url = f"http://127.0.0.1:{port}/v1"
    serve = ["serve", "tiny", "--store", store, "--port", str(port), "--quant", "none", "--bind", "127.0.0.1",
             "--lease", "2", "--stages", "1"]
    active = cluster_processes(serve, "active")
    wait_for(lambda: distllm.read_rendezvous(store) is not None, 60, "the active host's record")
    cluster_processes(["join", "--store", store, "--name", "w0", "--bind", "127.0.0.1", "--no-direct"], "w0")
    cluster_processes([*serve, "--standby"], "standby")
    wait_for(lambda: _serving(url), 120, "the active host's API")
    return store, url, active


def _cut_then_kill(url: str, body: dict, store: str, active) -> tuple[list, list, float]:
    """The whole stream once; then the same request's first 15 events (the client's connection drops), its
    checkpoint in the store, and the active host SIGKILLed: (whole, first, when)."""
    whole = read(url, body)
    first = read(url, body, stop_after=15)
    rid = first[-1][0].split("/")[0]
    wait_for(lambda: os.path.exists(os.path.join(store, "requests", f"{rid}.json")), 30, "its checkpoint")
    os.kill(active.pid, signal.SIGKILL)
    return whole, first, time.monotonic()


def test_a_stream_resumes_on_the_standby_at_the_same_address_after_the_host_is_sigkilled(cluster_processes,
                                                                                          tmp_path):
    store, url, active = _active_and_standby(cluster_processes, tmp_path)
    body = {**BODY, "max_tokens": 60}
    whole, first, killed = _cut_then_kill(url, body, store, active)
    wait_for(lambda: _serving(url), 120, "the standby's API at the same address")
    rest = read(url, body, last=first[-1][0])
    print(f"next event {time.monotonic() - killed:.1f} s after the kill")
    assert same_events(first + rest) == same_events(whole)
    assert text_of(first + rest) == text_of(whole) and rest[-1][1] == "[DONE]"


def test_the_client_helper_carries_a_stream_through_a_sigkilled_host(cluster_processes, tmp_path):
    """distllm.stream_completion reconnects on its own (the same URL, Last-Event-ID) when the host it streams
    from is SIGKILLed mid-stream: the text is the uninterrupted run's."""
    _, url, active = _active_and_standby(cluster_processes, tmp_path)
    body = {**BODY, "max_tokens": 60, "stream": False}
    want = text_of(read(url, {**body, "stream": True}))
    pieces = []
    for piece in distllm.stream_completion(url, body):
        pieces.append(piece)
        if len(pieces) == 10:
            os.kill(active.pid, signal.SIGKILL)
    assert "".join(pieces) == want and len(pieces) > 10


def test_the_standby_takes_the_dead_hosts_public_ports_and_streams_resume_at_the_same_url(cluster_processes,
                                                                                          tmp_path):
    """Both hosts reach the world through one bore server (a local relay speaking bore's protocol): the active
    host's join endpoint and API are public ports there. It is SIGKILLed mid-stream; the standby asks the bore
    server for those same ports, the worker and the client keep the addresses they had, and the client's
    reconnect with Last-Event-ID to the same public URL gets the rest of the stream."""
    relay = BoreRelay()
    store = str(tmp_path / "store")
    serve = ["serve", "tiny", "--store", store, "--port", "0", "--quant", "none", "--bind", "127.0.0.1",
             "--lease", "2", "--stages", "1", "--tunnel", f"bore://127.0.0.1:{relay.control_port}"]
    active = cluster_processes(serve, "active")
    wait_for(lambda: (distllm.read_rendezvous(store) or {}).get("api"), 60, "the active host's public API")
    before = distllm.read_rendezvous(store)
    url, endpoint = before["api"], distllm.JoinInfo.parse(before["join_string"]).endpoint
    assert url.startswith("http://127.0.0.1:") and int(url.split(":")[2].split("/")[0]) in relay.hellos
    cluster_processes(["join", "--store", store, "--name", "w0", "--bind", "127.0.0.1", "--no-direct"], "w0")
    cluster_processes([*serve, "--standby"], "standby")
    wait_for(lambda: _serving(url), 120, "the active host's API through the tunnel")
    body = {**BODY, "max_tokens": 60}
    whole, first, killed = _cut_then_kill(url, body, store, active)
    wait_for(lambda: (distllm.read_rendezvous(store) or {}).get("host") not in (None, before["host"])
             and distllm.read_rendezvous(store).get("api"), 120, "the standby's record with its API")
    after = distllm.read_rendezvous(store)
    assert after["api"] == url and after["address_notes"] == []  # the same public URL
    assert distllm.JoinInfo.parse(after["join_string"]).endpoint == endpoint  # the same join address
    assert after["join_string"] != before["join_string"]  # (its own keys: workers read them from the store)
    rest = read(url, body, last=first[-1][0])
    print(f"next event {time.monotonic() - killed:.1f} s after the kill, through the tunnel")
    assert same_events(first + rest) == same_events(whole)
    assert text_of(first + rest) == text_of(whole) and rest[-1][1] == "[DONE]"


def test_a_port_still_held_is_said_and_the_new_address_published(tmp_path, caplog):
    """The dead host's port is held (its machine vanished: the bore server has not seen its connection
    close): the standby waits `takeover_port_s`, takes another port, and says so in its status and the store's
    record, which workers and clients read."""
    relay = BoreRelay()
    spec = f"bore://127.0.0.1:{relay.control_port}"
    store = str(tmp_path / "store")
    holder = distllm.BoreTunnel("127.0.0.1", control_port=relay.control_port)  # the vanished host's tunnel
    _, held = holder.open(free_port())
    old = distllm.JoinInfo(f"tcp://127.0.0.1:{held}", None, None, None).encode()
    distllm.open_store(store).write(distllm.RENDEZVOUS, json.dumps(
        {"host": "gone", "epoch": 1, "join_string": old, "model": "tiny", "started": 0, "renewed": 0,
         "lease_s": 2}).encode())
    t0 = time.monotonic()
    with distllm.host("tiny", quant="none", store=store, standby=True, tunnel=spec, bind="127.0.0.1",
                      takeover_port_s=1.5, lease_s=2) as standby:
        assert standby.active.wait(30)
        took = time.monotonic() - t0
        wait_for(lambda: distllm.read_rendezvous(store)["host"] != "gone", 30, "the standby's record")
        record = distllm.read_rendezvous(store)
        new = distllm.JoinInfo.parse(record["join_string"]).endpoint
        assert new != f"tcp://127.0.0.1:{held}" and new == distllm.JoinInfo.parse(standby.join_string).endpoint
        assert record["address_notes"] == [f"the join endpoint is at {new.removeprefix('tcp://')}: "
                                           f"127.0.0.1:{held} (the previous host's) was still held"]
        assert record["address_notes"][0] in standby.status
        assert 1.5 <= took < 20
    holder.close()


def test_a_retried_whole_answer_with_an_idempotency_key_comes_from_the_store(tmp_path, caplog):
    """A non-streamed request with an `Idempotency-Key` is one request however often it is sent: its id and
    seed come from the key, its answer is kept in the store, and a retry (after a lost response, or on the
    host that took over) gets that answer, not a new one. The key sent with another request is refused."""
    import hashlib

    caplog.set_level(logging.INFO, logger="distllm")
    body = {**BODY, "stream": False, "seed": None}
    del body["seed"]  # (the key's seed: a retry samples the same tokens)
    with distllm.local("tiny", workers=1, quant="none", calibrate=False, store=str(tmp_path / "store")) as cluster:
        url = cluster.serve(port=0).url
        key = {"Idempotency-Key": "order-42"}
        first = httpx.post(f"{url}/completions", json=body, headers=key, timeout=60)
        assert first.status_code == 200
        digest = hashlib.sha256(b"order-42").hexdigest()
        assert first.json()["id"] == f"cmpl-{digest[:24]}"
        cluster.checkpoint(30)
        assert os.path.exists(tmp_path / "store" / "answers" / f"{digest}.json")
        caplog.clear()
        again = httpx.post(f"{url}/completions", json=body, headers=key, timeout=60)
        assert again.json() == first.json()  # the same answer, the same id and time: it was not made again
        assert any("answered from the store" in r.getMessage() for r in caplog.records)
        assert cluster.stats()["requests"] == 1
        seeded = httpx.post(f"{url}/completions", timeout=60, json={**body, "seed": int(digest[24:40], 16) >> 1})
        assert seeded.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]  # the key's seed
        other = httpx.post(f"{url}/completions", json={**body, "max_tokens": 5}, headers=key, timeout=30)
        assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
        bad = httpx.post(f"{url}/completions", json=body, headers={"Idempotency-Key": "a b"}, timeout=30)
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_idempotency_key"


def test_a_keyed_request_cut_off_by_a_sigkilled_host_is_finished_by_the_standby(cluster_processes, tmp_path):
    """The host dies while it makes a keyed whole answer; the client's retry (same URL, same key) reaches the
    standby, which goes on from the request's checkpoint: the answer is the uninterrupted run's."""
    import threading

    store, url, active = _active_and_standby(cluster_processes, tmp_path)
    body = {**BODY, "stream": False, "max_tokens": 80}
    want = httpx.post(f"{url}/completions", json=body, timeout=120).json()["choices"][0]["text"]
    key = {"Idempotency-Key": "retry-me"}
    lost: list = []
    threading.Thread(target=lambda: lost.append(_post_or_error(f"{url}/completions", body, key)), daemon=True).start()
    rid = "cmpl-" + __import__("hashlib").sha256(b"retry-me").hexdigest()[:24]
    record = os.path.join(store, "requests", f"{rid}.json")
    wait_for(lambda: os.path.exists(record) and len(json.load(open(record))["generated"]) >= 10, 60,
             "ten of its tokens checkpointed")
    os.kill(active.pid, signal.SIGKILL)
    wait_for(lambda: lost, 60, "the first attempt to fail")
    assert isinstance(lost[0], httpx.HTTPError)
    wait_for(lambda: _serving(url), 120, "the standby's API at the same address")
    retry = httpx.post(f"{url}/completions", json=body, headers=key, timeout=120)
    assert retry.status_code == 200 and retry.json()["id"] == rid
    assert retry.json()["choices"][0]["text"] == want
    metrics = httpx.get(f"{url.removesuffix('/v1')}/metrics", timeout=30).text
    resumed = [line for line in metrics.splitlines() if line.startswith("distllm_resumed_tokens")]
    assert resumed and float(resumed[0].split()[-1]) >= 10  # it went on from the checkpoint: not made again


def _post_or_error(url: str, body: dict, headers: dict) -> object:
    try:
        return httpx.post(url, json=body, headers=headers, timeout=120)
    except httpx.HTTPError as exc:
        return exc


def test_a_python_stream_resumes_from_its_token_here_and_on_the_next_host_of_its_store(tmp_path):
    """`cluster.stream()` gives a `resume_token` after each item; `stream(..., resume=token)` with the same
    prompt and parameters yields the items after it (the same ones as an unbroken stream), from the tokens its
    checkpoint holds: on this host, and on a host that took the store over after this one closed."""
    store = str(tmp_path / "store")
    ask = dict(max_new_tokens=40, temperature=0.9, seed=5)
    with distllm.local("tiny", workers=1, quant="none", calibrate=False, store=store) as cluster:
        want = list(cluster.stream("Once upon a time", **ask))
        s = cluster.stream("Once upon a time", **ask)
        first = [next(s) for _ in range(10)]
        token = s.resume_token
        assert token.endswith("/5/10")
        s.close()  # the client goes away mid-stream
        assert cluster.checkpoint(30)
        record = tmp_path / "store" / "requests" / f"py-{token.split('/')[0]}.json"
        kept = len(json.loads(record.read_text())["generated"])
        rest = cluster.stream("Once upon a time", **ask, resume=token)
        assert first + list(rest) == want
        assert rest.resume_token.endswith(f"/{len(want)}")
        assert cluster.stats()["resumed_tokens"] == kept > 0  # taken from the checkpoint, not made again
        wait_for(lambda: not record.exists(), 30, "its checkpoint retired once the stream was whole")
        s = cluster.stream("Once upon a time", **ask)
        first = [next(s) for _ in range(7)]
        token = s.resume_token
        s.close()
        assert cluster.checkpoint(30)
        with pytest.raises(distllm.RequestError, match="resume_token"):
            cluster.stream("Once upon a time", **ask, resume="nonsense")
        with pytest.raises(distllm.RequestError, match="seed=6"):
            cluster.stream("Once upon a time", **{**ask, "seed": 6}, resume=token)
    with distllm.local("tiny", workers=1, quant="none", calibrate=False, store=store) as cluster:
        rest = cluster.stream("Once upon a time", max_new_tokens=40, temperature=0.9, resume=token)  # (its seed)
        assert first + list(rest) == want
        assert cluster.stats()["resumed_tokens"] > 0


class _Loopback:
    """A tunnel (the `tunnel=` interface) that cannot be asked for an address, as ngrok's free tier: each
    open gets what it gets (here the local port itself)."""

    def open(self, local_port: int) -> tuple[str, int]:
        return "127.0.0.1", local_port

    def close(self) -> None:
        pass


def test_a_tunnel_that_cannot_be_asked_for_the_old_address_publishes_the_new_one(tmp_path):
    store = str(tmp_path / "store")
    old = distllm.JoinInfo("tcp://127.0.0.1:1", None, None, None).encode()
    distllm.open_store(store).write(distllm.RENDEZVOUS, json.dumps(
        {"host": "gone", "epoch": 1, "join_string": old, "model": "tiny", "started": 0, "renewed": 0,
         "api": "http://127.0.0.1:2/v1", "lease_s": 2}).encode())
    with distllm.host("tiny", quant="none", store=store, standby=True, tunnel=_Loopback(), bind="127.0.0.1",
                      lease_s=2) as standby:
        assert standby.active.wait(30)
        server = standby.serve(port=0, tunnel=_Loopback())
        wait_for(lambda: distllm.read_rendezvous(store).get("api") == server.url, 30, "the new API in the record")
        notes = distllm.read_rendezvous(store)["address_notes"]
        assert notes == [f"the join endpoint is at 127.0.0.1:{standby.port}: 127.0.0.1:1 (the previous host's) "
                         "cannot be asked of this tunnel",
                         f"the API is at 127.0.0.1:{server.port}: 127.0.0.1:2 (the previous host's) cannot be "
                         "asked of this tunnel"]
        assert all(note in standby.status for note in notes)
