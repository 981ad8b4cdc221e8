"""Workers are SIGKILLed, stopped and added mid-generation; every request completes
token-identical to a fault-free run. Real processes, real sockets."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest

import distllm
from conftest import holder_of, prompt_of, wait_for, write_model

# No calibration: on a busy 2-core box its noise can look like a 1.5x speed gap, which drops requested
# replicas; these tests are about failover, calibration is tested in test_balance.py.
FAST = dict(heartbeat_s=0.2, liveness_s=1.0, quant="none", prefill_chunk=8, calibrate=False)


def _stream_and_kill(cluster, prompt, at: int, kill, **params) -> list[int]:
    out = []
    for i, tok in enumerate(cluster.stream(prompt, **params)):
        out.append(tok)
        if i == at:
            kill()
    return out


def test_killed_stage_moves_to_a_standby_by_replay(model8):
    prompt = prompt_of(30)
    with distllm.local(model8, workers=4, stages=3, **FAST) as cluster:
        assert [w["state"] for w in cluster.workers()].count("standby") == 1
        want = cluster.generate(prompt, max_new_tokens=40)
        victim = holder_of(cluster, 4)
        got = _stream_and_kill(cluster, prompt, 10, lambda: os.kill(victim.pid, signal.SIGKILL), max_new_tokens=40)
        stats = cluster.stats()
        plan = cluster.layer_map()
    assert got == want
    # Only the lost stage was rebuilt, on the standby, from the inputs the host kept.
    assert stats["replays"] + stats["warmups"] >= 1 and stats["restarts"] == 0, stats
    assert len(plan) == 3 and victim.name not in " ".join(n for *_, n in plan)


def test_killed_stage_without_standby_replans_and_replays(model8):
    prompt = prompt_of(30)
    with distllm.local(model8, workers=3, stages=3, **FAST) as cluster:
        want = cluster.generate(prompt, max_new_tokens=40, temperature=0.8, seed=3)
        victim = holder_of(cluster, 0)
        got = _stream_and_kill(cluster, prompt, 5, lambda: os.kill(victim.pid, signal.SIGKILL),
                               max_new_tokens=40, temperature=0.8, seed=3)
        plan = cluster.layer_map()
    assert got == want
    assert len(plan) == 2


def test_hot_replica_failover_needs_no_replay(model8):
    prompt = prompt_of(20)
    with distllm.local(model8, workers=4, stages=2, replicas=2, **FAST) as cluster:
        assert all(len(names.split(", ")) == 2 for *_, names in cluster.layer_map())
        want = cluster.generate(prompt, max_new_tokens=40)
        victim = holder_of(cluster, 0)
        got = _stream_and_kill(cluster, prompt, 8, lambda: os.kill(victim.pid, signal.SIGKILL), max_new_tokens=40)
        wait_for(lambda: cluster.stats()["failures"] == 1, what="the death to be noticed")
        after = cluster.generate(prompt, max_new_tokens=40)
        stats = cluster.stats()
    assert got == want and after == want
    assert stats["replays"] == 0 and stats["restarts"] == 0, stats


def test_stuck_worker_is_caught_by_the_step_deadline_and_rejoins_harmlessly(model8):
    prompt = prompt_of(16)
    # Liveness far away: only the per-step deadline can catch a stopped worker here.
    options = {**FAST, "liveness_s": 60.0, "step_timeout_s": 1.5}
    with distllm.local(model8, workers=3, stages=3, **options) as cluster:
        want = cluster.generate(prompt, max_new_tokens=30)
        victim = holder_of(cluster, 7)
        t0 = time.monotonic()
        got = _stream_and_kill(cluster, prompt, 6, lambda: os.kill(victim.pid, signal.SIGSTOP), max_new_tokens=30)
        stalled = time.monotonic() - t0
        assert got == want
        assert stalled < 20, f"a stopped worker stalled generation for {stalled:.1f} s"
        [state] = [w["state"] for w in cluster.workers() if w["name"] == victim.name]
        assert state == "dead"
        os.kill(victim.pid, signal.SIGCONT)  # it wakes up with stale caches and queued steps
        wait_for(lambda: sum(w["name"] == victim.name and w["state"] in ("standby", "joined")
                          for w in cluster.workers()) == 1, what="the stopped worker to rejoin")
        for _ in range(2):
            assert cluster.generate(prompt, max_new_tokens=30) == want


def test_graceful_leave_hands_over_to_a_warm_standby_without_replay(model8):
    prompt = prompt_of(16)
    with distllm.local(model8, workers=3, stages=2, **FAST) as cluster:
        want = cluster.generate(prompt, max_new_tokens=30)
        leaver = holder_of(cluster, 0)
        got = _stream_and_kill(cluster, prompt, 5, lambda: os.kill(leaver.pid, signal.SIGTERM), max_new_tokens=30)
        leaver.join(10)
        states = {w["name"]: w["state"] for w in cluster.workers()}
        stats = cluster.stats()
        after = cluster.generate(prompt, max_new_tokens=30)
    assert got == want and after == want
    assert leaver.exitcode == 0 and states[leaver.name] == "left"
    assert stats["replays"] == 0 and stats["restarts"] == 0, stats


@pytest.mark.parametrize("batch", [1, 4])
def test_chaos_concurrent_requests_survive_kills_and_joins(model8, batch):
    """16 concurrent requests (greedy and seeded sampling) on 5 workers while workers are
    killed at random moments (one mid-prefill, two at once) and new ones join; one session per
    decode step, and up to 4 sessions sharing one."""
    rng = random.Random(1234)
    requests = []
    for i in range(16):
        params = dict(max_new_tokens=rng.randint(20, 40))
        if i % 2:
            params.update(temperature=0.9, top_p=0.95, seed=100 + i)
        requests.append((prompt_of(rng.randint(1, 64), seed=i), params))

    with distllm.local(model8, workers=2, stages=2, **FAST, decode_batch=batch) as reference:
        want = [list(reference.stream(p, **kw)) for p, kw in requests]  # one request at a time

    with distllm.local(model8, workers=5, stages=5, **FAST, decode_batch=batch) as cluster:
        results: list = [None] * len(requests)

        def run(i):
            p, kw = requests[i]
            try:
                results[i] = cluster.generate(p, **kw)
            except Exception as exc:  # recorded and asserted on below
                results[i] = exc

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()

        def live():
            return [p for p in cluster.local_processes if p.is_alive()]

        def tokens_at_least(n):
            wait_for(lambda: cluster.stats()["tokens"] >= n, what=f"{n} tokens")

        wait_for(lambda: cluster.stats()["steps"] >= 3, what="the first prefill steps")
        os.kill(rng.choice(live()).pid, signal.SIGKILL)  # during prefill
        cluster.spawn_local(1)
        tokens_at_least(120)
        for p in rng.sample(live(), 2):  # two at once
            os.kill(p.pid, signal.SIGKILL)
        cluster.spawn_local(2)
        tokens_at_least(300)
        os.kill(rng.choice(live()).pid, signal.SIGKILL)
        for t in threads:
            t.join(60)
        stats = cluster.stats()

    failed = [(i, r) for i, r in enumerate(results) if not isinstance(r, list)]
    assert not failed, failed
    for i, (got, exp) in enumerate(zip(results, want)):
        assert got == exp, f"request {i} {requests[i][1]}"
    assert stats["failures"] >= 4, stats
    assert (stats["batched"] > 0) == (batch > 1), stats


def test_requests_wait_for_a_worker_then_finish_or_time_out_with_the_reason(model8):
    prompt = prompt_of(10)
    with distllm.local(model8, workers=1, **FAST) as cluster:
        want = cluster.generate(prompt, max_new_tokens=20)
        only = cluster.local_processes[0]
        os.kill(only.pid, signal.SIGKILL)
        wait_for(lambda: cluster.stats()["failures"] == 1, what="the death to be noticed")
        stream = cluster.stream(prompt, max_new_tokens=20)  # submitted now; nobody holds any layer
        wait_for(lambda: "waiting for workers" in cluster.status, what="a visible reason")
        cluster.spawn_local(1)
        assert list(stream) == want

    with distllm.local(model8, workers=1, wait_timeout_s=1.0, **FAST) as cluster:
        os.kill(cluster.local_processes[0].pid, signal.SIGKILL)
        wait_for(lambda: cluster.stats()["failures"] == 1, what="the death to be noticed")
        with pytest.raises(distllm.ClusterNotReadyError, match="waiting for workers: 0 of 1"):
            cluster.generate(prompt, max_new_tokens=5)


def test_a_step_that_keeps_failing_fails_the_request_with_the_reason(tmp_path):
    """A layer that yields NaN: every attempt is refused, the request fails clearly, nothing hangs."""
    from safetensors.torch import load_file, save_file

    path = write_model(str(tmp_path), "llama", layers=4)
    weights = load_file(os.path.join(path, "model.safetensors"))
    weights["model.layers.2.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(weights, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with distllm.local(path, workers=2, stages=2, **FAST) as cluster:
        with pytest.raises(distllm.StepFailedError, match="NaN"):
            cluster.generate(prompt_of(5), max_new_tokens=5, timeout=60)
        assert all(w["state"] == "ready" for w in cluster.workers())


def test_a_replica_with_wrong_weights_is_outvoted_and_removed(tmp_path):
    """Two replicas of one stage that disagree (the second loaded weights that differ: a bad download, another
    build): the host's own recomputation of the step decides, the wrong one is removed (not the one that
    answered second, not the honest one), and with verify="agree" no token comes from a wrong answer."""
    from safetensors.torch import load_file, save_file

    path = write_model(str(tmp_path), "llama", layers=2)
    # Both workers run in this process, sharing its GIL with the host: a generous liveness, so
    # that a worker busy loading never makes the other look dead (nothing is killed here).
    options = {**FAST, "liveness_s": 20.0, "heartbeat_s": 0.5}
    cluster = distllm.host(path, workers=1, replicas=2, bind="127.0.0.1", verify="agree", **options)
    workers = []
    try:
        workers.append(distllm.join(cluster.join_string, name="honest", background=True, **options))
        cluster.wait_ready(30)
        want = cluster.generate(prompt_of(9), max_new_tokens=8)
        # The second replica loads weights that differ (same file size, so the fingerprint holds); the file
        # is put back once it has loaded: the host's check reads the model as published.
        file = os.path.join(path, "model.safetensors")
        original = open(file, "rb").read()
        weights = load_file(file)
        weights["model.layers.1.mlp.down_proj.weight"].mul_(-1.0)
        save_file(weights, file, metadata={"format": "pt"})
        workers.append(distllm.join(cluster.join_string, name="different", background=True, **options))
        wait_for(lambda: len(cluster.layer_map()[0][2].split(", ")) == 2
                 and all(w["state"] == "ready" for w in cluster.workers()), what="the second replica")
        with open(file, "wb") as f:
            f.write(original)
        assert cluster.generate(prompt_of(9), max_new_tokens=8) == want
        wait_for(lambda: any(w["state"] == "failed" for w in cluster.workers()), what="a replica removed")
        [flagged] = [w for w in cluster.workers() if w["state"] == "failed"]
        assert flagged["name"] == "different" and "differed from the other opinions" in flagged["lost_why"]
        assert cluster.layer_map()[0][2] == "honest"
        assert cluster.stats()["removed"] == 1 and cluster.stats()["disagreements"] >= 1
    finally:
        cluster.close()
        for w in workers:
            w.leave(timeout=5)


def test_long_prompt_prefills_in_pipelined_chunks_and_survives_a_kill_midway(model8):
    """A prompt of many chunks: stage 0 takes the next chunk while the last one moves on, so all stages
    work at once; the middle stage's worker is SIGKILLed mid-prefill and the standby replays its part."""
    from conftest import reference_generate, reference_model

    prompt = prompt_of(240)
    want = reference_generate(reference_model(model8), prompt, 12)
    slow = {**FAST, "test_step_delay_ms": 3.0}  # a chunk takes ~10 ms per stage: the kill lands mid-prefill
    with distllm.local(model8, workers=4, stages=3, **slow) as cluster:
        assert cluster.generate(prompt, max_new_tokens=12) == want
        chunks = cluster.stats()["pipelined_chunks"]
        assert chunks >= 240 // 8 - 1, cluster.stats()  # every chunk after the first went in ahead

        victim = holder_of(cluster, 4)
        got: list = []
        run = threading.Thread(target=lambda: got.extend(cluster.generate(prompt, max_new_tokens=12)))
        run.start()
        wait_for(lambda: cluster.stats()["pipelined_chunks"] >= chunks + 10, what="the prefill under way")
        os.kill(victim.pid, signal.SIGKILL)
        run.join(120)
        stats = cluster.stats()
    assert got == want
    assert stats["failures"] == 1 and stats["restarts"] == 0, stats
    assert stats["replays"] + stats["warmups"] >= 1, stats  # the standby got the lost stage's inputs


def test_the_host_serves_a_range_whose_every_holder_died_and_hands_it_back(model8):
    """Two workers of four layers each (their memory holds no more), no spare: the holder of layers 4-7 is
    SIGKILLed mid-stream. The survivor cannot load them beside its own, so after `last_resort_after_s` the host
    starts a worker process of its own for them: the stream finishes with the uninterrupted run's tokens. A
    worker that joins later takes the range back, and the host's worker stops."""
    prompt = prompt_of(30)
    cluster = distllm.host(model8, workers=2, stages=2, bind="127.0.0.1", last_resort_after_s=1.0, **FAST)
    try:
        cap = int(4.5 * (cluster._layer_bytes + cluster._kv_bytes) / cluster.config.memory_fraction)
        cluster.spawn_local(2, memory_cap=cap)
        wait_for(cluster._ready.is_set, 120, "two workers of four layers each")
        assert [(a, b) for a, b, _ in cluster.layer_map()] == [(0, 3), (4, 7)]
        want = cluster.generate(prompt, max_new_tokens=60)
        victim, times = holder_of(cluster, 6), {}
        got = []
        for i, tok in enumerate(cluster.stream(prompt, max_new_tokens=60)):
            got.append(tok)
            if i == 5:
                os.kill(victim.pid, signal.SIGKILL)
                times["kill"] = time.monotonic()
            elif i == 6:
                times["next"] = time.monotonic()
        assert got == want
        print(f"the next token {times['next'] - times['kill']:.1f} s after the kill (the host's own worker)")
        assert [(a, b, n) for a, b, n in cluster.layer_map() if n == "host-last-resort"] == [(4, 7, "host-last-resort")]
        assert "the host itself serves layers 4..7" in cluster.status
        stand_in = next(p for p in cluster.local_processes if p.name == "host-last-resort")
        cluster.spawn_local(1, memory_cap=cap)  # a worker joins: the range goes back to it
        wait_for(lambda: cluster._ready.is_set() and "host-last-resort" not in str(cluster.layer_map()), 120,
                 "the range handed back")
        wait_for(lambda: stand_in.exitcode is not None, 30, "the host's worker to stop")
        wait_for(lambda: "last resort" not in cluster.status, 10, "the status to say so")
        assert cluster.generate(prompt, max_new_tokens=60) == want
    finally:
        cluster.close()
