"""A host that is no longer a single point of failure: a standby host process follows the active host's
lease in the store and takes over when the active one is SIGKILLed; workers follow the store to it with
their layers; API clients retrying (the official openai client) with their seeds get the answers they
would have got; a host that comes back to a store another host holds stays a standby.

Real processes: `python -m distllm serve --store` (active and standby) and `distllm join --store` workers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

import distllm
from conftest import wait_for
from netem import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEASE = 2.0
REQUESTS = [("Once upon a time", 5), ("The sky is", 6), ("In a village", 7), ("Rain fell", 8)]


def _start(args: list[str], log_path: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "distllm", *args], cwd=ROOT, stdout=open(log_path, "w"),
                            stderr=subprocess.STDOUT)


def ask_greedy(client, prompt: str) -> str:
    return client.completions.create(model="tiny", prompt=prompt, max_tokens=32, temperature=0).choices[0].text


def _serving(url: str) -> bool:
    try:
        return httpx.get(f"{url}/models", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def cluster_processes(tmp_path):
    procs: list[subprocess.Popen] = []

    def start(args: list[str], name: str) -> subprocess.Popen:
        procs.append(_start(args, str(tmp_path / f"{name}.log")))
        return procs[-1]

    yield start
    for p in procs:
        p.kill()
        p.wait()


def test_the_standby_takes_over_a_sigkilled_host_and_retried_requests_get_the_same_answers(cluster_processes,
                                                                                           tmp_path):
    """The active host runs a batch job and four API streams when it is SIGKILLed."""
    import json

    store, port = str(tmp_path / "store"), free_port()
    url = f"http://127.0.0.1:{port}/v1"
    prompts = [f"job prompt {i}: " + "xy" * (i % 5) for i in range(300)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    serve = ["serve", "tiny", "--store", store, "--port", str(port), "--quant", "none", "--bind", "127.0.0.1",
             "--lease", str(LEASE), "--map", str(tmp_path / "prompts.jsonl"), "--map-name", "j", "--map-tokens", "32",
             "--stages", "1"]  # (two stages under this job on two cores ran several times slower: see the notes)
    active = cluster_processes(serve, "active")
    wait_for(lambda: distllm.read_rendezvous(store) is not None, timeout=60, what="the active host's record")
    first = distllm.read_rendezvous(store)["host"]
    for i in range(2):  # (no direct links: with a 300-prompt job beside the streams, two stages linked directly
        #               on this 2-core machine ran 6x slower than relayed, and the test timed out; see the notes)
        cluster_processes(["join", "--store", store, "--name", f"w{i}", "--bind", "127.0.0.1", "--no-direct"],
                          f"w{i}")
    standby = cluster_processes([*serve, "--standby"], "standby")
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=10, timeout=60)
    wait_for(lambda: _serving(url), timeout=60, what="the active host's API")

    def ask(prompt: str, seed: int) -> str:
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=120, temperature=0.8,
                                         seed=seed).choices[0].text

    want = [ask(p, seed) for p, seed in REQUESTS]  # fault-free answers (this waits for the workers too)
    assert len(set(want)) == len(want)

    got: list[str | None] = [None] * len(REQUESTS)
    broken: list[int] = []
    started = threading.Barrier(len(REQUESTS) + 1)

    def stream(i: int) -> None:
        prompt, seed = REQUESTS[i]
        text, first_chunk = "", True
        try:
            for chunk in client.completions.create(model="tiny", prompt=prompt, max_tokens=120, temperature=0.8,
                                                   seed=seed, stream=True):
                text += chunk.choices[0].text
                if first_chunk:
                    first_chunk = False
                    started.wait(30)
        except (openai.APIConnectionError, openai.APIError, httpx.HTTPError):
            if first_chunk:
                started.wait(30)
            broken.append(i)
            text = ask(prompt, seed)  # the stream broke with its host: ask again (the client retries the connection)
        got[i] = text

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(REQUESTS))]
    for t in threads:
        t.start()
    started.wait(60)  # every stream has its first chunk: kill the host mid-stream
    killed = time.monotonic()
    os.kill(active.pid, signal.SIGKILL)
    results = tmp_path / "store" / "jobs" / "j" / "results.jsonl"
    done_at_kill = len(results.read_text().splitlines()) if results.exists() else 0
    wait_for(lambda: (distllm.read_rendezvous(store) or {}).get("host") != first, timeout=30,
             what="the standby to claim the store")
    wait_for(lambda: _serving(url), timeout=30, what="the standby's API")
    takeover = time.monotonic() - killed
    for t in threads:
        t.join(120)
    answered = time.monotonic() - killed
    print(f"standby serving {takeover:.1f} s after the kill; the 4 retried requests answered by {answered:.1f} s; "
          f"{done_at_kill} of {len(prompts)} job prompts done at the kill")
    assert got == want and broken  # (streams the kill broke were asked again)
    assert takeover < LEASE + 8, takeover  # the lease, a poll, the claim and the API's start
    assert standby.poll() is None
    # The batch job: resumed by the standby from the store, every prompt's result there once, each the
    # completion generate() gives (greedy: the same wherever it ran).
    assert done_at_kill < len(prompts), "the job had ended before the kill: weak test"
    wait_for(lambda: results.exists() and len(results.read_text().splitlines()) >= len(prompts), timeout=120,
             what="the batch job to complete on the new host")
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert sorted(line["index"] for line in lines) == list(range(len(prompts)))
    for line in lines[:5]:
        assert line["text"] == ask_greedy(client, prompts[line["index"]])

    # The old host comes back (a restarted process of its own): the store is held, so it waits as a standby.
    again = cluster_processes([*serve, "--standby"], "again")
    new = distllm.read_rendezvous(store)["host"]
    time.sleep(3 * LEASE)  # (a lapse, if the new host stopped renewing, would show within this)
    assert distllm.read_rendezvous(store)["host"] == new and again.poll() is None
    assert ask(*REQUESTS[0]) == want[0]  # still the new host serving, with its workers


def test_a_host_another_one_took_the_store_from_steps_down(tmp_path):
    """Two hosts on one store (the old one paused past its lease, say): the one that claimed it last serves;
    the other stops checkpointing, fails its requests with the reason and lets its workers go."""
    store = str(tmp_path / "store")
    old = distllm.host("tiny", store=store, quant="none", lease_s=1.0, bind="127.0.0.1", workers=1)
    try:
        new = distllm.host("tiny", store=store, quant="none", lease_s=1.0, bind="127.0.0.1", workers=1)
        try:
            wait_for(lambda: old._core._stepped_down is not None, timeout=20, what="the old host to step down")
            assert "took over" in old._core._stepped_down and new._core._stepped_down is None
            with pytest.raises(distllm.DistllmError):
                old.generate("hi", max_new_tokens=2, timeout=5)
            assert distllm.read_rendezvous(store)["host"] == new._host_id
        finally:
            new.close()
    finally:
        old.close()
