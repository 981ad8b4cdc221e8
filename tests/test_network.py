"""distllm over a bad network: workers reach the host through a latency proxy (tests/netem.py)
with a 150 ms round trip, jitter, stalls and cut connections, all on loopback."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

import distllm
from conftest import prompt_of, reference_generate, reference_model
from netem import LatencyProxy


@pytest.fixture
def slow_cluster(tmp_path):
    """A host, a 150 ms proxy in front of it, and two worker processes that dial the proxy."""
    with distllm.host("tiny", quant="none", bind="127.0.0.1", workers=2, stages=2, calibrate=False) as cluster:
        port = int(distllm.JoinInfo.parse(cluster.join_string).endpoint.rsplit(":", 1)[1])
        with LatencyProxy(port, rtt_ms=150, jitter_ms=10) as proxy:
            procs = [subprocess.Popen([sys.executable, "-m", "distllm", "join", proxy.rewrite(cluster.join_string),
                                       "--name", f"far-{i}"], stdout=open(tmp_path / f"far-{i}.log", "w"),
                                      stderr=subprocess.STDOUT) for i in range(2)]
            try:
                cluster.wait_ready(120)
                yield cluster, proxy
            finally:
                for p in procs:
                    p.kill()
                    p.wait()


def test_150ms_with_stalls_and_a_cut_keeps_tokens_and_workers(slow_cluster, caplog):
    caplog.set_level(logging.INFO, logger="distllm")
    cluster, proxy = slow_cluster
    prompt = prompt_of(12)
    want = reference_generate(reference_model(distllm._tiny_model_dir()), prompt, 16)
    got = []
    for i, token in enumerate(cluster.stream(prompt, max_new_tokens=16)):
        got.append(token)
        if i in (3, 9):
            proxy.stall(1.0)  # a relay hiccup: every byte waits a second
    assert got == want
    assert cluster.stats()["failures"] == 0, cluster.workers()  # slow is not dead
    got = []
    for i, token in enumerate(cluster.stream(prompt, max_new_tokens=16)):
        got.append(token)
        if i == 5:
            proxy.cut()  # both workers' connections drop at once
    assert got == want and proxy.cuts == 1
    assert "is back after" in caplog.text  # the cut was seen, and the workers came back
    stats = cluster.stats()  # ... with their caches: nothing replayed, nobody replaced
    assert (stats["failures"], stats["replays"], stats["restarts"], stats["warmups"]) == (0, 0, 0, 0), stats
    assert sorted(w["state"] for w in cluster.workers()) == ["ready", "ready"]
