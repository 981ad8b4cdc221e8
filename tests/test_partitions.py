"""Links that drop and come back: a relay in front of the host stops (connections refused)
for seconds, or flaps, or one worker's link alone goes; the bore tunnel's control
connection drops. Real `python -m distllm join` processes dial the host through the
relay (tests/netem.py). Every request completes token for token as a single process
makes it, no worker process exits, and no worker loads its layers again.

The membership state machine (`_Membership`) is driven by events here too, with no
sockets and no sleeps.
"""

from __future__ import annotations

import contextlib
import threading
import time

import pytest

import distllm
from borerelay import BoreRelay
from conftest import prompt_of, reference_generate, reference_model, reference_sampled, wait_for
from netem import LatencyProxy, free_port, join_processes

NAMES = ["p0", "p1", "p2"]
REQUESTS = [  # (prompt, sampling) of the four concurrent requests: two greedy, two seeded
    (prompt_of(9, seed=1), {}),
    (prompt_of(14, seed=2), {}),
    (prompt_of(11, seed=3), {"temperature": 0.9, "top_p": 0.95, "seed": 7}),
    (prompt_of(6, seed=4), {"temperature": 0.8, "top_k": 20, "seed": 11}),
]


def _references(tokens: int) -> list[list[int]]:
    model = reference_model(distllm._tiny_model_dir())
    out = []
    for prompt, params in REQUESTS:
        if params:
            out.append(reference_sampled(model, prompt, distllm.SamplingParams(max_new_tokens=tokens, **params)))
        else:
            out.append(reference_generate(model, prompt, tokens))
    return out


def _loaded(cluster) -> dict[str, int]:
    """Layers each worker process has loaded, by name (its latest record: a rejoin makes a new one)."""
    out: dict[str, int] = {}
    for w in cluster.workers():
        out[w["name"]] = max(out.get(w["name"], 0), w["layers_loaded"])
    return out


@contextlib.contextmanager
def _relayed_cluster(tmp_path, rtt_ms: float, *, per_worker: bool = False, **options):
    """A host, a relay in front of it (one per worker if `per_worker`), three join processes dialling it."""
    with distllm.host("tiny", quant="none", bind="127.0.0.1", workers=3, stages=3, calibrate=False,
                      rebalance_s=0, **options) as cluster:
        port = int(distllm.JoinInfo.parse(cluster.join_string).endpoint.rsplit(":", 1)[1])
        with contextlib.ExitStack() as stack:
            relays = [stack.enter_context(LatencyProxy(port, rtt_ms=rtt_ms, seed=i))
                      for i in range(3 if per_worker else 1)]
            strings = [r.rewrite(cluster.join_string) for r in relays]
            procs = []
            for i, name in enumerate(NAMES):  # direct links between workers stay on loopback, off the relay
                procs += stack.enter_context(join_processes(
                    strings[i % len(strings)], [name], str(tmp_path),
                    lambda _: ["--bind", "127.0.0.1", "--peer-address", "127.0.0.1", "--peer-port", str(free_port())]))
            cluster.wait_ready(120)
            wait_for(lambda: all(w["rtt_ms"] is not None for w in cluster.workers()), 30, "round trips measured")
            yield cluster, relays, procs


def _stream_through(cluster, fault, tokens: int) -> tuple[list[list[int]], float, bool]:
    """Run the four requests at once; call `fault()` once each has 3 tokens. Return their tokens, the
    longest pause between two tokens of a request after the fault (the stall), and whether the fault
    came mid-stream (some request still had tokens to make)."""
    got: list[list[int]] = [[] for _ in REQUESTS]
    stamps: list[list[float]] = [[] for _ in REQUESTS]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        prompt, params = REQUESTS[i]
        try:
            for token in cluster.stream(prompt, max_new_tokens=tokens, timeout=400, **params):
                got[i].append(token)
                stamps[i].append(time.monotonic())
        except BaseException as exc:  # (raised again below, in the test's thread)
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(REQUESTS))]
    for t in threads:
        t.start()
    wait_for(lambda: all(len(g) >= 3 for g in got) or errors, 60, "every request to be mid-stream")
    at = time.monotonic()
    midway = any(len(g) < tokens for g in got)
    fault()
    for t in threads:
        t.join(420)
    if errors:
        raise errors[0]
    stall = max((b - a for s in stamps for a, b in zip(s, s[1:]) if b > at), default=0.0)
    return got, stall, midway


STALLS: dict[tuple[float, float], float] = {}  # (rtt ms, outage s) -> stall s, printed at the end of a run


@pytest.mark.parametrize("rtt_ms", [0, 100])
def test_a_relay_outage_in_front_of_the_host_costs_a_stall_never_the_cluster(tmp_path, rtt_ms):
    """1 s and 5 s outages (and 30 s at 100 ms: past every grace, so each worker is written off and
    given its range back): same tokens, no process exits, no layers loaded again, no session
    prefilled again from position 0."""
    tokens = 24 if rtt_ms else 160  # (on loopback a request would be over before the relay stops)
    want = _references(tokens)
    outages = (1.0, 5.0, 30.0) if rtt_ms else (1.0, 5.0)
    with _relayed_cluster(tmp_path, rtt_ms) as (cluster, [relay], procs):
        loaded = _loaded(cluster)
        assert sorted(loaded.values()) == [2, 3, 3]  # 8 layers over 3 workers, each loaded once
        for outage in outages:
            got, stall, midway = _stream_through(cluster, lambda: relay.outage(outage), tokens)
            assert midway, "every request had finished before the relay stopped: weak test"
            assert got == want, f"{outage} s outage at {rtt_ms} ms"
            assert all(p.poll() is None for p in procs), f"a worker process exited in a {outage} s outage"
            assert _loaded(cluster) == loaded, f"a worker loaded its layers again after a {outage} s outage"
            stats = cluster.stats()
            assert stats["restarts"] == 0 and stats["replans"] == 0, stats
            assert stall >= outage * 0.9, f"the requests did not stall ({stall:.1f} s): the relay did not stop them"
            STALLS[(rtt_ms, outage)] = stall
            wait_for(lambda: sum(w["state"] == "ready" and w["alive"] for w in cluster.workers()) == 3, 30,
                     "all three workers serving again")
        if rtt_ms:  # the 30 s outage outlasted every grace: each worker was written off, then reinstated
            assert stats["failures"] >= 3 and stats["reinstated"] >= 3, stats
    print({f"{k[0]} ms, {k[1]:.0f} s outage": f"{v:.1f} s stall" for k, v in STALLS.items()})


def test_a_relay_cut_while_windows_are_in_flight_keeps_every_token(tmp_path):
    """Speculation (prompt lookup, 3 drafts, up to 4 verify steps of a request in flight at once) across a
    100 ms relay that stops for 2 s mid-stream: every request, greedy and seeded, ends with the tokens of
    plain decoding, and windows did go behind one another."""
    tokens = 24
    want = _references(tokens)
    with _relayed_cluster(tmp_path, 100, speculate=3, speculate_adaptive=False, speculate_windows=4,
                          draft="lookup") as (cluster, [relay], procs):
        got, stall, midway = _stream_through(cluster, lambda: relay.outage(2.0), tokens)
        stats = cluster.stats()
    assert midway, "every request had finished before the relay stopped: weak test"
    assert got == want
    assert stats["windows"] > 0 and stats["verify_steps"] > 0, stats
    assert stall >= 1.8, f"the requests did not stall ({stall:.1f} s): the relay did not stop them"


def test_a_flapping_relay_keeps_the_tokens_and_moves_no_layers(tmp_path):
    """Down 0.5 s every 2 s, for 8 s, at 100 ms: each outage costs a redial, none a write-off or a re-plan
    (bench/network.py --partitions flaps for 30 s)."""
    tokens = 48
    want = _references(tokens)
    with _relayed_cluster(tmp_path, 100) as (cluster, [relay], procs):
        loaded = _loaded(cluster)

        def flap() -> None:
            def loop() -> None:
                for _ in range(4):
                    relay.outage(0.5).join()
                    time.sleep(1.5)  # (the fault's own rhythm, not a wait for a condition)
            threading.Thread(target=loop, daemon=True).start()

        got, _, midway = _stream_through(cluster, flap, tokens)
        wait_for(lambda: relay.outages == 4 and relay.up, 30, "the flapping to end")
        assert midway and got == want
        stats = cluster.stats()
        assert (stats["replans"], stats["restarts"], stats["failures"]) == (0, 0, 0), stats
        assert _loaded(cluster) == loaded and all(p.poll() is None for p in procs)
        assert all(w["outages"] >= 2 for w in cluster.workers()), cluster.workers()  # the host saw them flap


def test_one_workers_link_cut_alone_stalls_its_stage_and_the_others_keep_their_caches(tmp_path):
    tokens = 32
    want = _references(tokens)
    with _relayed_cluster(tmp_path, 100, per_worker=True) as (cluster, relays, procs):
        loaded = _loaded(cluster)
        got, stall, midway = _stream_through(cluster, lambda: relays[1].outage(2.0), tokens)
        assert midway and got == want
        assert stall >= 1.8
        stats = cluster.stats()
        assert (stats["replays"], stats["restarts"], stats["failures"]) == (0, 0, 0), stats
        assert _loaded(cluster) == loaded and all(p.poll() is None for p in procs)
        [p1] = [w for w in cluster.workers() if w["name"] == "p1"]
        assert p1["outages"] == 1 and all(w["outages"] == 0 for w in cluster.workers() if w["name"] != "p1")


def test_a_worker_back_before_the_re_plan_loaded_gets_its_range_back_and_the_re_plan_is_abandoned(model8):
    """A worker silent past its grace (SIGSTOP: to the host, a link gone quiet) is written off; with no
    standby, a plan over the two survivors loads beside their layers (slowly here: 0.4 s a layer). The
    worker speaks again before that load is done: it serves its range again with no reload, the sessions
    keep its cache (nothing moved meanwhile), and the re-plan is abandoned: no session starts over."""
    import os
    import signal

    prompt = prompt_of(16)
    options = dict(quant="none", calibrate=False, rebalance_s=0, heartbeat_s=0.2, liveness_s=1.0,
                   replan_grace_s=1.0, prefill_chunk=8, test_load_delay_ms=400.0)
    with distllm.local(model8, workers=3, stages=3, **options) as cluster:
        want = cluster.generate(prompt, max_new_tokens=30)
        assert len(want) > 10  # (it may end early at its end-of-text token)
        victim = cluster.local_processes[1]
        loaded = _loaded(cluster)
        got: list[int] = []
        for i, token in enumerate(cluster.stream(prompt, max_new_tokens=30)):
            got.append(token)
            if i == 5:
                os.kill(victim.pid, signal.SIGSTOP)
                wait_for(lambda: cluster.stats()["replans"] == 1, 30, "a re-plan to start loading")
                assert any(w["next_layers"] for w in cluster.workers() if w["alive"])  # loading beside
                os.kill(victim.pid, signal.SIGCONT)
        assert got == want
        stats = cluster.stats()
        assert (stats["replans"], stats["reinstated"], stats["restarts"]) == (1, 1, 0), stats
        assert _loaded(cluster)[victim.name] == loaded[victim.name]  # its layers were kept
        wait_for(lambda: not any(w["next_layers"] for w in cluster.workers()), 10, "the re-plan given up")
        assert cluster.generate(prompt, max_new_tokens=30) == want


def test_a_worker_says_the_host_is_unreachable_and_gives_up_only_after_host_timeout_s(tmp_path):
    """Past its join timeout and still dialling (the bug: a worker told to rejoin kept its old join
    clock and quit); with host_timeout_s it stops once the host was unreachable that long."""
    with distllm.host("tiny", quant="none", bind="127.0.0.1", calibrate=False) as cluster:
        port = int(distllm.JoinInfo.parse(cluster.join_string).endpoint.rsplit(":", 1)[1])
        with LatencyProxy(port) as relay:
            patient = distllm.join(relay.rewrite(cluster.join_string), name="patient", background=True,
                                   join_timeout_s=1.0, heartbeat_s=0.2, liveness_s=1.0, direct_links=False)
            cluster.wait_ready(60)
            relay.outage(6.0)
            wait_for(lambda: patient.status.startswith("host unreachable for"), 10, "the worker to say so")
            assert "retrying" in patient.status and "unreachable" in repr(patient)
            assert "host unreachable for" in distllm._worker_html(patient)  # what its notebook cell shows
            wait_for(lambda: patient.state == "ready" and patient.status == "ready", 30, "it to serve again")
            assert cluster.generate(prompt_of(8), max_new_tokens=8) == reference_generate(
                reference_model(distllm._tiny_model_dir()), prompt_of(8), 8)
            assert patient.error is None  # 6 s unreachable, far past its 1 s join timeout: it stayed

            brief = distllm.join(relay.rewrite(cluster.join_string), name="brief", background=True,
                                 host_timeout_s=2.0, heartbeat_s=0.2, liveness_s=1.0, direct_links=False)
            relay.outage(30.0)
            assert brief.wait(20), "host_timeout_s did not stop the worker"
            assert "unreachable for 2 s (host_timeout_s)" in brief.error and brief.state == "refused"
            assert not patient.wait(0)  # the other one keeps dialling
            patient.stop()


def test_a_load_that_makes_no_progress_is_reported_and_sent_again(model_dir, caplog):
    """A worker that finishes no layer within `load_stall_s` (here each layer takes 2.5 s to load):
    the host says so in its status and log and sends the assignment again, which does no harm."""
    import logging

    caplog.set_level(logging.WARNING, logger="distllm")
    path = model_dir("llama")
    with distllm.host(path, quant="none", calibrate=False, heartbeat_s=0.2, load_stall_s=1.0) as cluster:
        cluster.spawn_local(1, test_load_delay_ms=2500.0)
        wait_for(lambda: "made no loading progress" in cluster.status, 30, "the stalled load reported")
        cluster.wait_ready(60)
        assert cluster.generate(prompt_of(8), max_new_tokens=8) == reference_generate(
            reference_model(path), prompt_of(8), 8)
        assert [w["layers_loaded"] for w in cluster.workers()] == [4]  # sent again, loaded once
    assert any("loaded no layer" in r.getMessage() for r in caplog.records)


def test_the_hosts_bore_tunnel_opens_again_when_its_control_connection_drops(model_dir, tmp_path):
    """The relay drops every control connection (and the connections it spliced): the host's tunnel opens
    again on the same public port, workers redial it, and a generation through it completes."""
    path = model_dir("llama")
    want = reference_generate(reference_model(path), prompt_of(12), 16)
    relay = BoreRelay()
    try:
        with distllm.local(path, workers=2, stages=2, quant="none", calibrate=False,
                           tunnel=f"bore://127.0.0.1:{relay.control_port}") as cluster:
            assert cluster.generate(prompt_of(12), max_new_tokens=16) == want
            first = cluster.join_string
            relay.drop_controls()
            wait_for(lambda: cluster._tunnel.reopened == 1, 30, "the tunnel to open again")
            assert relay.hellos[-1] == relay.hellos[0] and cluster.join_string == first  # the same address
            assert cluster.generate(prompt_of(12), max_new_tokens=16) == want
            assert cluster.stats()["restarts"] == 0
    finally:
        relay.close()


def test_a_tunnel_that_reopens_at_a_new_address_is_followed_through_the_store(model_dir, tmp_path):
    """The old public port went to someone else: the tunnel takes a new one, the new join string goes
    to the store, and `distllm join --store` workers dial the host there, keeping their layers."""
    path = model_dir("llama")
    want = reference_generate(reference_model(path), prompt_of(12), 16)
    relay = BoreRelay()
    store = str(tmp_path / "store")
    try:
        with (distllm.host(path, quant="none", workers=2, stages=2, calibrate=False, rebalance_s=0, store=store,
                           tunnel=f"bore://127.0.0.1:{relay.control_port}") as cluster,
              join_processes(cluster.join_string, ["t0", "t1"], str(tmp_path),
                             lambda _: ["--store", store, "--bind", "127.0.0.1", "--peer-address", "127.0.0.1"])
              as procs):
            cluster.wait_ready(120)
            assert cluster.generate(prompt_of(12), max_new_tokens=16) == want
            loaded = _loaded(cluster)
            first = cluster.join_string
            relay.taken.add(relay.hellos[0])
            relay.drop_controls()
            wait_for(lambda: cluster.join_string != first, 30, "a new join string")
            wait_for(lambda: distllm.read_rendezvous(store)["join_string"] == cluster.join_string, 30,
                     "the new join string in the store")
            assert relay.hellos[-1] != relay.hellos[0]
            assert cluster.generate(prompt_of(12), max_new_tokens=16, timeout=120) == want
            assert _loaded(cluster) == loaded  # they kept their layers
            assert all(p.poll() is None for p in procs)
    finally:
        relay.close()


# -- the membership state machine, driven by events -----------------------------------------------------


def _worker(wid: bytes = b"w", rtt_ms: float | None = 1.0, last_seen: float = 0.0):
    return distllm._WorkerState(wid=wid, name=wid.decode(), device="cpu", device_name="", memory=0, pid=1,
                                joined_at=0.0, last_seen=last_seen, rtt_ms=rtt_ms, state="ready")


def test_the_grace_follows_the_round_trip_the_cost_of_a_loss_and_the_links_flapping():
    members = distllm._Membership(distllm.Config(reconnect_grace_s=0.5, replan_grace_s=5.0))
    near, far = _worker(b"a", 1.0), _worker(b"b", 4000.0)
    assert members.grace(near, 0.0, covered=True) == pytest.approx(0.508)  # ZeroMQ's retry, then handshakes
    assert members.grace(near, 0.0, covered=False) == pytest.approx(5.0)  # a re-plan is dear: the floor
    assert members.grace(far, 0.0, covered=True) == pytest.approx(0.5 + 32)  # handshakes take round trips
    assert members.grace(far, 0.0, covered=False) == pytest.approx(2.5 + 32)  # and a redial at the back-off cap
    for t in (10.0, 20.0, 30.0):  # three outages, each over within a second
        members.closed(near.wid, t)
        assert members.heard(near.wid, t + 0.7) == (pytest.approx(0.7), "its connection closed")
    assert members.grace(near, 40.0, covered=False) == pytest.approx(4 * 5.0)  # it flaps: more grace
    assert members.grace(near, 40.0 + distllm._FLAP_WINDOW_S, covered=False) == pytest.approx(5.0)  # forgotten
    for t in range(100, 120):
        members.closed(near.wid, float(t))
        members.heard(near.wid, t + 0.1)
    assert members.grace(near, 121.0, covered=True) == pytest.approx(0.508 * distllm._FLAP_FACTOR_MAX)  # capped


def test_membership_writes_off_only_past_the_grace_and_hands_the_record_back_once():
    members = distllm._Membership(distllm.Config(reconnect_grace_s=0.5, replan_grace_s=5.0, liveness_s=5.0))
    a, b = _worker(b"a", last_seen=0.0), _worker(b"b", last_seen=3.0)
    uncovered = lambda w: False  # noqa: E731
    members.closed(a.wid, 1.0)
    assert members.down(a.wid) and not members.down(b.wid) and members.anyone_down()
    assert members.due([a, b], 5.9, uncovered) == []  # a: 4.9 s of a 5 s grace; b: heard 2.9 s ago
    assert [w.wid for w, _ in members.due([a, b], 6.1, uncovered)] == [b"a"]
    assert not members.down(b.wid)
    assert members.due([b], 7.9, uncovered) == [] and not members.down(b.wid)  # 4.9 s: within the liveness
    [(w, why)] = members.due([b], 8.5, uncovered)  # silent past the liveness, and past the grace since heard
    assert w is b and "silent" in why and members.down(b.wid)
    members.write_off(a.wid, 6.1, (0, 3, 7), {"s1": (0, 12)})
    assert members.returned(a.wid).exact == {"s1": (0, 12)}
    assert members.returned(a.wid) is None  # once
    assert members.heard(a.wid, 20.0) == (pytest.approx(19.0), "its connection closed")
    assert not members.down(a.wid)
