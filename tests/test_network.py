"""distllm over a bad network: workers reach the host through a latency proxy (tests/netem.py)
with a 150 ms round trip, jitter, stalls and cut connections, all on loopback."""

from __future__ import annotations

import contextlib
import logging
import time

import pytest
import torch

import distllm
from conftest import prompt_of, reference_generate, reference_model
from netem import LatencyProxy, free_port, join_processes


@pytest.fixture
def slow_cluster(tmp_path):
    """A host, a 150 ms proxy in front of it, and two worker processes that dial the proxy."""
    with distllm.host("tiny", quant="none", bind="127.0.0.1", workers=2, stages=2, calibrate=False) as cluster:
        port = int(distllm.JoinInfo.parse(cluster.join_string).endpoint.rsplit(":", 1)[1])
        with (LatencyProxy(port, rtt_ms=150, jitter_ms=10) as proxy,
              join_processes(proxy.rewrite(cluster.join_string), ["far-0", "far-1"], str(tmp_path))):
            cluster.wait_ready(120)
            yield cluster, proxy


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


def test_direct_links_carry_the_steps_and_the_host_relays_when_one_stalls(tmp_path):
    """Three stages whose workers reach each other through proxies: outputs go stage to stage (the host
    gets copies); a link that stalls makes the host relay its copy, with the same tokens and nobody lost."""
    prompt = prompt_of(10)
    want = reference_generate(reference_model(distllm._tiny_model_dir()), prompt, 24)
    with distllm.host("tiny", quant="none", bind="127.0.0.1", workers=3, stages=3, calibrate=False,
                      rebalance_s=0) as cluster:
        ports = [free_port() for _ in range(3)]
        with contextlib.ExitStack() as stack:
            proxies = [stack.enter_context(LatencyProxy(port)) for port in ports]  # before each direct-link port
            stack.enter_context(join_processes(
                cluster.join_string, ["w0", "w1", "w2"], str(tmp_path),
                lambda i: ["--bind", "127.0.0.1", "--peer-port", str(ports[i]),
                           "--peer-address", f"127.0.0.1:{proxies[i].port}"]))
            cluster.wait_ready(120)
            assert cluster.generate(prompt, max_new_tokens=24) == want
            stats = cluster.stats()
            assert stats["direct"] >= 2 * 20, stats  # stages 1 and 2 of (nearly) every token came directly
            assert sum(p.bytes["up"] for p in proxies) > 0  # the steps really took the direct links

            for p in proxies:
                p.stall(5.0)  # every direct link holds its steps: the host must relay them
            assert cluster.generate(prompt, max_new_tokens=24) == want
            stats = cluster.stats()
            assert stats["relayed"] >= 1, stats
            assert (stats["failures"], stats["replays"], stats["restarts"]) == (0, 0, 0), stats

            for p in proxies:  # the held steps now arrive, long after their sessions moved on: workers drop them
                p.wait_delivered()
            assert cluster.generate(prompt, max_new_tokens=24) == want
            stats = cluster.stats()
            assert (stats["failures"], stats["replays"], stats["restarts"]) == (0, 0, 0), stats
            assert sorted(w["state"] for w in cluster.workers()) == ["ready"] * 3


def test_unreachable_direct_links_fall_back_to_the_host(model_dir):
    """Workers that advertise an address nobody can dial (a Colab VM's): every step goes through the host."""
    prompt = prompt_of(8)
    path = model_dir("llama")
    want = reference_generate(reference_model(path), prompt, 12)
    with distllm.local(path, workers=2, stages=2, quant="none", calibrate=False,
                       peer_address="127.0.0.1:9") as cluster:
        assert cluster.generate(prompt, max_new_tokens=12) == want
        stats = cluster.stats()
        assert stats["direct"] == 0 and stats["relayed"] == 0 and stats["failures"] == 0, stats


def test_spinning_nodes_serve_the_same_tokens_over_direct_links(model_dir):
    """spin_ms > 0 (a CUDA node's default): the host and the workers poll instead of sleeping between
    messages, the compute thread reading its direct links itself; tokens stay the reference's,
    the steps go direct, and the host's interpreter hands the GIL over within 50 us."""
    import sys

    prompt = prompt_of(8)
    path = model_dir("llama")
    want = reference_generate(reference_model(path), prompt, 16)
    interval = sys.getswitchinterval()
    try:
        with distllm.local(path, workers=2, stages=2, quant="none", calibrate=False, spin_ms=20) as cluster:
            assert sys.getswitchinterval() <= 50e-6
            assert cluster.generate(prompt, max_new_tokens=16) == want
            assert cluster.generate(prompt, max_new_tokens=16) == want  # again, with warm (spinning) nodes
            stats = cluster.stats()
            assert stats["direct"] >= 16 and stats["failures"] == 0, stats
    finally:
        sys.setswitchinterval(interval)
    with pytest.raises(ValueError, match="spin_ms"):
        distllm.Config(spin_ms=-1)


def test_a_spinning_wait_keeps_a_steps_way_warm_and_returns_when_something_comes():
    """While a node spins it runs its warm-up every _WARM_S (a step's way on a copy: code that ran a moment
    ago runs several times faster); what comes ends the wait at once, with no warm-up first."""
    import socket

    import zmq

    bell, ringer = socket.socketpair()
    poller = zmq.Poller()
    poller.register(bell.fileno(), zmq.POLLIN)
    warmed = []
    try:
        assert distllm._poll_spinning(poller, 0.02, 20, lambda: warmed.append(time.perf_counter())) == []
        assert len(warmed) >= 5  # 20 ms of spinning, one every 0.2 ms (fewer on a loaded machine)
        assert min(b - a for a, b in zip(warmed, warmed[1:])) >= distllm._WARM_S
        warmed.clear()
        ringer.send(b"x")
        assert distllm._poll_spinning(poller, 1.0, 1000, lambda: warmed.append(1)) == [(bell.fileno(), zmq.POLLIN)]
        assert warmed == []
    finally:
        bell.close()
        ringer.close()


def test_a_cuda_node_spins_by_default_only_while_alone_in_its_process():
    """Two spinning threads in one process fight over the GIL: CUDA nodes sharing a process (a worker per
    GPU in one join(), a host and a worker in one notebook) sleep between messages unless spin_ms asks
    otherwise; the interpreter's switch interval is short only while something spins."""
    import sys

    first, second, third, base = object(), object(), object(), sys.getswitchinterval()
    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    try:
        assert distllm._claim_spin(first, None, cuda) == distllm._GPU_SPIN_S
        assert distllm._spinning(first) and sys.getswitchinterval() <= 50e-6
        assert distllm._claim_spin(second, None, cuda) == distllm._GPU_SPIN_S
        assert not distllm._spinning(first) and not distllm._spinning(second)
        assert sys.getswitchinterval() == base
        assert distllm._claim_spin(third, 5, cuda) == 0.005  # asked for explicitly: it spins, the others not
        assert distllm._spinning(third) and not distllm._spinning(first) and sys.getswitchinterval() <= 50e-6
        distllm._release_spin(third)
        distllm._release_spin(second)
        assert distllm._spinning(first) and sys.getswitchinterval() <= 50e-6  # alone again
        assert distllm._claim_spin(object(), None, torch.device("cpu")) == 0.0  # a CPU node needs its cores
    finally:
        for node in (first, second, third):
            distllm._release_spin(node)
    assert sys.getswitchinterval() == base


def test_workers_trace_their_steps_and_the_hops_read_off_the_traces(model_dir, tmp_path):
    """Config.trace: each worker writes when each step's compute started and ended (one clock for the
    processes of a machine); trace_hops() gives one stage's compute end to the next one's start."""
    import glob
    import json
    import time

    prompt = prompt_of(8)
    path = model_dir("llama")
    want = reference_generate(reference_model(path), prompt, 12)
    prefix = str(tmp_path / "run")
    with distllm.local(path, workers=2, stages=2, quant="none", calibrate=False, trace=prefix) as cluster:
        cluster.generate(prompt, max_new_tokens=4)  # the direct link is dialled (its first steps are relayed)
        since = time.monotonic()
        assert cluster.generate(prompt, max_new_tokens=12) == want
        until = time.monotonic()
        direct = cluster.stats()["direct"]
    files = glob.glob(prefix + "-*.jsonl")
    assert len(files) == 2, files  # one per worker, written as it stopped
    rows = [json.loads(line) for f in files for line in open(f)]
    starts = {(sid, stage, start): t for t, event, sid, stage, start in rows if event == "compute_start"}
    ends = {(sid, stage, start): t for t, event, sid, stage, start in rows if event == "compute_end"}
    assert starts.keys() == ends.keys() and all(starts[k] <= ends[k] for k in starts)
    assert {stage for _, stage, _ in starts} == {0, 1}
    hops = distllm.trace_hops(prefix, since, until)
    assert len(hops) >= 12  # the prompt's chunk and every decoded token's step crossed from stage 0 to 1
    assert all(0 < h < until - since for h in hops)
    assert distllm.trace_hops(prefix, until + 1) == []  # nothing computed after the run
    # The steps that took the direct link, in parts: sender's compute end to its send, the wire and the
    # receiver's wait for it, the receiver's read to its compute start. The prompt's chunk was relayed.
    parts = distllm.trace_hop_parts(prefix, since, until)
    assert 8 <= len(parts) < len(hops) and len(parts) <= direct
    assert all(len(p) == 3 and min(p) >= 0 for p in parts)
    assert all(any(abs(sum(p) - h) < 1e-9 for h in hops) for p in parts)  # each adds up to its whole hop


def test_a_trace_that_cannot_be_written_stops_tracing_not_the_worker(model_dir, tmp_path, caplog):
    """A full disk or a missing folder under Config.trace: a warning, tracing off, every step served."""
    tracer = distllm._Tracer(str(tmp_path / "no-such-folder" / "run"))
    with caplog.at_level(logging.WARNING, logger="distllm"):
        tracer.add("compute_start", "s", 0, 0)
        tracer.flush()
    assert tracer.failed and "cannot write the step trace" in caplog.text
    tracer.add("compute_end", "s", 0, 0)  # off now: nothing kept, nothing raised
    tracer.flush()

    prompt = prompt_of(8)
    path = model_dir("llama")
    want = reference_generate(reference_model(path), prompt, 8)
    with distllm.local(path, workers=2, stages=2, quant="none", calibrate=False,
                       trace=str(tmp_path / "no-such-folder" / "run")) as cluster:
        assert cluster.generate(prompt, max_new_tokens=8) == want
        assert cluster.stats()["failures"] == 0
    assert not (tmp_path / "no-such-folder").exists()


def test_timeouts_follow_each_workers_round_trip_with_the_config_as_floors():
    from types import SimpleNamespace

    host = SimpleNamespace(config=distllm.Config(liveness_s=5.0, reconnect_grace_s=0.5, step_timeout_s=30.0))
    near = distllm._WorkerState(wid=b"a", name="a", device="cpu", device_name="", memory=0, pid=1, joined_at=0.0,
                                last_seen=0.0, rtt_ms=1.0, compute_ms=2.0)
    far = distllm._WorkerState(wid=b"b", name="b", device="cpu", device_name="", memory=0, pid=2, joined_at=0.0,
                               last_seen=0.0, rtt_ms=4000.0, compute_ms=2.0)
    cluster, members = distllm._Coordinator, distllm._Membership(host.config)
    assert (members.liveness(near), cluster._step_deadline(host, near, 1)) == (5.0, 30.0)  # the floors
    assert members.grace(near, 0.0, covered=True) == pytest.approx(0.508)  # ZeroMQ's retry, then handshakes
    assert members.liveness(far) == pytest.approx(2 + 40)  # two heartbeats and ten round trips
    assert members.grace(far, 0.0, covered=True) == pytest.approx(0.5 + 32)  # reconnect handshakes take round trips
    assert cluster._step_deadline(host, far, 1) == pytest.approx(0.04 + 40)  # (the grace: test_partitions.py)


def test_a_float32_model_can_send_its_hidden_states_in_16_bits(tmp_path):
    """wire_dtype="bfloat16": a float32 model's hidden states travel in half the bytes, and the tokens equal
    a single-process run that rounds to bfloat16 at the same places (before each stage and the head)."""
    from conftest import write_model

    path = write_model(str(tmp_path / "wide"), "llama", hidden=512, layers=4)
    prompt = prompt_of(12)
    with distllm.host(path, quant="none", bind="127.0.0.1", workers=2, stages=2, calibrate=False,
                      wire_dtype="bfloat16", rebalance_s=0) as cluster:
        port = int(distllm.JoinInfo.parse(cluster.join_string).endpoint.rsplit(":", 1)[1])
        with (LatencyProxy(port) as proxy,
              join_processes(proxy.rewrite(cluster.join_string), ["w0", "w1"], str(tmp_path),
                             lambda i: ["--no-direct"])):
            cluster.wait_ready(120)
            cluster.generate(prompt, max_new_tokens=2)  # warm: joins and first steps out of the count
            before = sum(proxy.bytes.values())
            got = cluster.generate(prompt, max_new_tokens=16)
            positions = len(prompt) + len(got) - 1  # each went through both stages (the last token did not)
            per_hop = (sum(proxy.bytes.values()) - before) / positions / 2
            split = [first for first, _, _ in cluster.layer_map()]
    assert per_hop < 2 * 512 * 4, per_hop  # both directions: below the float32 payload alone

    files = distllm._ModelFiles(path)
    config = distllm._load_config(files)
    head = distllm.HostHead(files, config, dtype=torch.float32, device=torch.device("cpu"))
    bounds = split + [config.num_hidden_layers]
    shards = [distllm.StageShard(files, config, a, b, quant="none", dtype=torch.float32, device=torch.device("cpu"))
              for a, b in zip(bounds, bounds[1:])]

    def run(ids, start):
        h = head.embed_tokens(ids).to(torch.bfloat16)
        for shard in shards:
            h = shard.forward("ref", h, start).to(torch.bfloat16)
        return distllm.sample(head.logits(h[0, -1]), distllm.SamplingParams(), start + len(ids))

    ids = list(prompt)
    ids.append(run(ids, 0))
    while len(ids) < len(prompt) + 16 and ids[-1] not in head.eos_ids:
        ids.append(run(ids[-1:], len(ids) - 1))
    assert got == ids[len(prompt):]


# -- the direct-link transport --------------------------------------------------


def _link_pair(key: bytes = b"k" * 32, max_bytes: int = 1 << 20):
    """A receiving end on a real TCP listener and a sending end dialled to it (by its background thread)."""
    listener = distllm._listen("127.0.0.1", 0)
    out = distllm._LinkOut(f"tcp://127.0.0.1:{listener.getsockname()[1]}", key)
    assert out.send([b"too early"]) is False  # not dialled yet: says no at once (the host relays)
    listener.setblocking(True)
    listener.settimeout(10)
    sock, _ = listener.accept()
    listener.close()
    incoming = distllm._LinkIn(sock, key, max_bytes)
    deadline = time.monotonic() + 10
    while out.sock is None:  # the dialler reads our salt and answers with its own
        assert time.monotonic() < deadline, "the link was never dialled"
        time.sleep(0.01)
    return out, incoming


def _read_all(incoming, want: int, timeout: float = 10.0) -> tuple[list, bool]:
    import select

    got, is_open, deadline = [], True, time.monotonic() + timeout
    while len(got) < want and is_open and time.monotonic() < deadline:
        select.select([incoming.sock], [], [], 0.1)
        messages, is_open = incoming.read()
        got += messages
    return got, is_open


def _direct_step(i: int, hidden: torch.Tensor) -> list:
    fields = {"sid": f"s{i}", "step": i, "stage": 1, "start": 3 * i, "epoch": 7, "decode_from": i}
    return [distllm._step_head(fields, [], hidden.dtype, hidden.shape), distllm._tensor_frame(hidden)]


def test_a_direct_link_carries_sealed_messages_whole_and_in_order():
    out, incoming = _link_pair()
    try:
        sizes = [1, 1, 5, 1, 10000] + [1] * 45  # one of 320 KB: more than a read takes, kept until whole
        hiddens = [torch.randn(1, n, 8) for n in sizes]
        sent = [_direct_step(i, h) for i, h in enumerate(hiddens)]
        for parts in sent:
            assert out.send(parts)
        got, is_open = _read_all(incoming, len(sent))
        assert is_open and incoming.trusted
        assert [bytes(m) for m in got] == [b"".join(bytes(p) for p in parts) for parts in sent]
        for i, message in enumerate(got):
            msg = distllm._read_step(message, max_elements=1 << 20)
            assert msg.header == {"v": distllm.PROTOCOL_VERSION, "type": "forward", "sid": f"s{i}", "step": i,
                                  "stage": 1, "start": 3 * i, "epoch": 7, "chain": [], "decode_from": i}
            assert torch.equal(msg.tensor(0), hiddens[i])
        hidden = msg.tensor(0)
        assert hidden.data_ptr() == msg.tensor(0).data_ptr()  # the step's own buffer, not a copy
    finally:
        out.close()
        incoming.close()


def test_a_direct_step_reads_back_as_sent_and_refuses_what_does_not_add_up():
    chain = [{"to": "tcp://10.0.0.2:5555", "key": "ab" * 32, "epoch": 3}]
    hidden = torch.randn(1, 2, 16, dtype=torch.bfloat16)
    fields = {"sid": "séance", "step": 2**40, "stage": 2, "start": 17, "epoch": 9}  # no decode_from
    good = bytearray(distllm._step_head(fields, chain, hidden.dtype, hidden.shape)
                     + bytes(distllm._tensor_frame(hidden)))
    msg = distllm._read_step(bytearray(good), max_elements=1 << 20)
    assert msg.header == {"v": distllm.PROTOCOL_VERSION, "type": "forward", **fields, "chain": chain}
    assert msg.get("decode_from", int, None) is None and torch.equal(msg.tensor(0), hidden)
    size = distllm._LINK_STEP.size

    def broken(at: int, value: bytes) -> bytearray:
        bad = bytearray(good)
        bad[at:at + len(value)] = value
        return bad

    for bad, why in [
        (good[:10], "a direct step of 10 bytes"),
        (good[:-1], "do not add up"),  # a byte short
        (good + b"\0", "do not add up"),
        (broken(size - 1, b"\x07"), "dtype code 7"),
        (broken(36, (10**6).to_bytes(4, "little")), "do not add up"),  # more positions than bytes
        (broken(48, (300).to_bytes(2, "little")), "session id of 300 bytes"),
        (broken(size, b"\xff\xfe"), "session id or chain does not read"),  # not UTF-8
        (broken(size + len("séance".encode()), b"{"), "session id or chain does not read"),
    ]:
        with pytest.raises(distllm.ProtocolError, match=why):
            distllm._read_step(bad, max_elements=1 << 20)
    with pytest.raises(distllm.ProtocolError, match="do not add up"):  # over the element cap
        distllm._read_step(bytearray(good), max_elements=31)
    not_a_list = distllm._step_head(fields, {"to": "x"}, hidden.dtype, hidden.shape)  # what a sender never makes
    with pytest.raises(distllm.ProtocolError, match="not a list"):
        distllm._read_step(bytearray(not_a_list + bytes(distllm._tensor_frame(hidden))), max_elements=1 << 20)
    with pytest.raises(distllm.ProtocolError, match="cannot go over a direct link"):  # a number out of range
        distllm._step_head({**fields, "start": 2**70}, [], hidden.dtype, hidden.shape)


def test_a_direct_link_refuses_another_key_a_replay_tampering_and_oversized_frames():
    """Whatever does not open under this connection's key ends the connection with a ProtocolError."""
    import socket

    # another key
    out, incoming = _link_pair()
    incoming._key = b"x" * 32  # the sender holds another key than the receiver
    try:
        assert out.send([b"hello"])
        with pytest.raises(distllm.ProtocolError, match="failed to open"):
            _read_all(incoming, 1)
    finally:
        out.close()
        incoming.close()

    # a recorded connection played again to a new one: the receiver's fresh salt makes another key
    listener = distllm._listen("127.0.0.1", 0)
    listener.setblocking(True)
    port = listener.getsockname()[1]
    key = b"k" * 32
    first = socket.create_connection(("127.0.0.1", port))
    conn, _ = listener.accept()
    incoming = distllm._LinkIn(conn, key, 1 << 20)
    receiver_salt = first.recv(16)
    sender_salt = b"s" * 16
    cipher = distllm._link_cipher(key, receiver_salt, sender_salt)
    size = (5 + 16).to_bytes(4, "little")
    recorded = sender_salt + size + cipher.encrypt(distllm._link_nonce(0), b"hello", size)
    first.sendall(recorded)
    got, _ = _read_all(incoming, 1)
    assert got == [b"hello"]  # the original opens
    replay = socket.create_connection(("127.0.0.1", port))
    conn2, _ = listener.accept()
    incoming2 = distllm._LinkIn(conn2, key, 1 << 20)
    replay.recv(16)
    replay.sendall(recorded)
    with pytest.raises(distllm.ProtocolError, match="failed to open"):
        _read_all(incoming2, 1)

    # one bit flipped on the way
    third = socket.create_connection(("127.0.0.1", port))
    conn3, _ = listener.accept()
    incoming3 = distllm._LinkIn(conn3, key, 1 << 20)
    cipher = distllm._link_cipher(key, third.recv(16), sender_salt)
    sealed = bytearray(cipher.encrypt(distllm._link_nonce(0), b"hello", size))
    sealed[3] ^= 1
    third.sendall(sender_salt + size + bytes(sealed))
    with pytest.raises(distllm.ProtocolError, match="failed to open"):
        _read_all(incoming3, 1)

    # a length over the cap is refused before anything that large is read
    fourth = socket.create_connection(("127.0.0.1", port))
    conn4, _ = listener.accept()
    incoming4 = distllm._LinkIn(conn4, key, 1024)
    fourth.recv(16)
    fourth.sendall(sender_salt + (1 << 30).to_bytes(4, "little"))
    with pytest.raises(distllm.ProtocolError, match="a frame of"):
        _read_all(incoming4, 1)
    for s in (first, replay, third, fourth, listener):
        s.close()
    for link in (incoming, incoming2, incoming3, incoming4):
        link.close()


def test_a_sending_end_whose_peer_died_says_no_and_dials_again():
    out, incoming = _link_pair()
    try:
        assert out.send([b"one"])
        assert _read_all(incoming, 1)[0]
        incoming.close()  # the next stage is gone
        deadline = time.monotonic() + 10
        while out.send([b"x" * 4096]):  # the first sends may still go into the kernel's buffers
            assert time.monotonic() < deadline, "sends kept succeeding to a closed peer"
            time.sleep(0.01)
        assert out.sock is None  # dropped: the next sends say no until a dial succeeds
        assert out.send([b"two"]) is False
    finally:
        out.close()


def _thread_cpu_s(thread) -> float:
    """CPU seconds a thread of this process has used (Linux: /proc)."""
    import os

    with open(f"/proc/self/task/{thread.native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_an_idle_worker_sleeps_between_steps(model_dir):
    """A CPU worker (no spinning) uses next to no CPU while no step comes, after it served some: its compute
    thread sleeps in poll() until the bell rings or a direct step comes (the bell is emptied each time)."""
    with distllm.host(model_dir("llama"), quant="none", bind="127.0.0.1", workers=2, stages=2,
                      calibrate=False) as cluster:
        workers = [distllm.Worker(cluster.join_string, name=f"idle-{i}", device="cpu",
                                  config=distllm.Config(spin_ms=0)).start() for i in range(2)]
        try:
            cluster.wait_ready(60)
            cluster.generate(prompt_of(6), max_new_tokens=8)
            assert cluster.stats()["direct"] > 0
            threads = [t for w in workers for t in w._threads if t.name.startswith("distllm-compute")]
            assert len(threads) == 2
            before = [_thread_cpu_s(t) for t in threads]
            time.sleep(1.0)  # idle on purpose: the measure is of a second with nothing to do
            used = [_thread_cpu_s(t) - b for t, b in zip(threads, before)]
            assert max(used) < 0.2, used
        finally:
            for w in workers:
                w.stop()


def test_workers_without_the_cryptography_package_serve_through_the_host(model_dir, monkeypatch, caplog):
    """No cipher for direct links (distllm.py copied alone onto a machine): a warning, the host relays
    every step, the tokens are the reference's."""
    import sys

    monkeypatch.setitem(sys.modules, "cryptography.hazmat.primitives.ciphers.aead", None)  # import fails
    caplog.set_level(logging.WARNING, logger="distllm")
    prompt = prompt_of(6)
    path = model_dir("llama")
    want = reference_generate(reference_model(path), prompt, 8)
    with distllm.host(path, quant="none", bind="127.0.0.1", workers=2, stages=2, calibrate=False) as cluster:
        workers = [distllm.Worker(cluster.join_string, name=f"plain-{i}", device="cpu").start() for i in range(2)]
        try:
            cluster.wait_ready(60)
            assert cluster.generate(prompt, max_new_tokens=8) == want
            assert cluster.stats()["direct"] == 0 and all(w["peer"] is None for w in cluster.workers())
        finally:
            for w in workers:
                w.stop()
    assert "no direct links without the cryptography package, 47 or newer" in caplog.text
