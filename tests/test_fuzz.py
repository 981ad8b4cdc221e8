"""Thousands of malformed and random messages against a live host and a live worker.

The fuzzing peers hold valid keys (CURVE already keeps out everyone else): this is
what a buggy or hostile member of the cluster can send. Afterwards both nodes still
serve tokens identical to the reference, and no process or thread died.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import distllm
from conftest import prompt_of

QUICK = dict(heartbeat_s=0.2, liveness_s=1.0, quant="none")
ALL_TYPES = sorted(distllm._HOST_TO_WORKER | distllm._WORKER_TO_HOST) + ["bogus", ""]
SENT = {"host": 0, "worker": 0}

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**63), st.floats(allow_nan=True),
                    st.text(max_size=12), st.lists(st.integers(), max_size=3))
tensor_specs = st.lists(st.fixed_dictionaries({
    "dtype": st.sampled_from(["float32", "float16", "bfloat16", "int64", "int32", "object", "float64"]),
    "shape": st.lists(st.integers(-1, 70), max_size=4)}), max_size=3)


def _payload(spec) -> bytes:
    """Frame bytes for a spec: right-sized where the spec is sane, filled with NaN-ish noise."""
    try:
        n = math.prod(spec["shape"]) * distllm._WIRE_DTYPES[spec["dtype"]].itemsize
    except (KeyError, TypeError):
        return b"\x00"
    return (b"\xff\xff\xc0\x7f" * (n // 4 + 1))[:n] if 0 <= n < 1 << 16 else b""


@st.composite
def messages(draw, types):
    kind = draw(st.integers(0, 3))
    if kind == 0:  # raw garbage frames
        return draw(st.lists(st.binary(max_size=80), min_size=1, max_size=4))
    header = draw(st.dictionaries(
        st.sampled_from(["sid", "step", "stage", "start", "epoch", "name", "memory", "code", "message",
                         "model", "quant", "dtype", "end", "t", "drain", "incarnation", "device"]),
        scalars, max_size=8))
    header["v"] = draw(st.sampled_from([1, 1, 1, 0, 2, "1"]))
    header["type"] = draw(st.sampled_from(types))
    if header["type"] == "assign":  # never a real model: loads must fail fast
        header["model"] = draw(st.sampled_from(["", "/nonexistent", "../../etc"]))
    specs = draw(tensor_specs)
    header["tensors"] = specs
    frames = [_payload(s) for s in specs]
    if kind == 3:  # a byte count that lies
        frames.append(b"\x00" * draw(st.integers(0, 40)))
    head = json.dumps(header).encode() if kind != 2 else json.dumps(header).encode()[:-1]
    return [head, *frames]


def _dealer(join_string: str) -> zmq.Socket:
    info = distllm.JoinInfo.parse(join_string)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.curve_serverkey = info.server_key.encode()
    sock.curve_publickey, sock.curve_secretkey = info.client_public.encode(), info.client_secret.encode()
    sock.connect(info.endpoint)
    return sock


@pytest.fixture(scope="module")
def live_cluster(model_dir):
    with distllm.local(model_dir("llama"), workers=2, stages=2, **QUICK) as cluster:
        want = cluster.generate(prompt_of(7), max_new_tokens=8)
        rogue = _dealer(cluster.join_string)
        yield cluster, want, rogue
        rogue.close(0)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(batch=st.lists(messages(sorted(distllm._WORKER_TO_HOST) + ["bogus", ""]), min_size=60, max_size=100))
def test_host_survives_random_messages(live_cluster, batch):
    cluster, want, rogue = live_cluster
    for frames in batch:
        rogue.send_multipart(frames)
    SENT["host"] += len(batch)
    assert cluster.generate(prompt_of(7), max_new_tokens=8) == want
    assert all(p.is_alive() for p in cluster.local_processes)
    assert cluster._thread.is_alive()


def test_host_fuzz_volume():
    assert SENT["host"] >= 1500, SENT  # runs after the fuzz test above (file order)


@pytest.fixture(scope="module")
def fake_host(model_dir):
    """This test plays the host: a ROUTER with CURVE keys, and a real Worker joining it."""
    ctx = zmq.Context.instance()
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.curve_server = True
    router.curve_publickey, router.curve_secretkey = server_public, server_secret
    port = router.bind_to_random_port("tcp://127.0.0.1")
    join_string = distllm.JoinInfo(f"tcp://127.0.0.1:{port}", server_public.decode(), client_public.decode(),
                                   client_secret.decode()).encode()
    worker = distllm.Worker(join_string, name="fuzzed", config=distllm.Config(**QUICK)).start()
    assert router.poll(10_000), "the worker never said hello"
    wid, *frames = router.recv_multipart()
    assert distllm.decode(frames, allowed={"join"}).type == "join"
    router.send_multipart([wid, *distllm.encode("welcome", {"quant": "none"})])
    yield router, wid, worker, model_dir("llama")
    worker._stopping.set()
    worker.wait(5)
    router.close(0)


def _drain(router: zmq.Socket) -> None:
    while router.poll(0):
        router.recv_multipart()


def _ask(router: zmq.Socket, wid: bytes, msg_type: str, header: dict, tensors=(), want: str = "result"):
    router.send_multipart([wid, *distllm.encode(msg_type, header, tensors)])
    while router.poll(20_000):
        _, *frames = router.recv_multipart()
        msg = distllm.decode(frames, allowed=distllm._WORKER_TO_HOST)
        if msg.type == want:
            return msg
    raise AssertionError(f"no {want} from the worker")


# "shutdown" and a "kicked" error are the authenticated host's right to stop a worker: not fuzzed.
WORKER_TYPES = sorted(distllm._HOST_TO_WORKER - {"shutdown", "error"}) + ["bogus", "result", "join"]


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(batch=st.lists(messages(WORKER_TYPES), min_size=60, max_size=100))
def test_worker_survives_random_messages(fake_host, batch):
    router, wid, worker, _ = fake_host
    for frames in batch:
        router.send_multipart([wid, *frames])
    SENT["worker"] += len(batch)
    _drain(router)
    assert not worker._stopped.is_set() and all(t.is_alive() for t in worker._threads)


def test_worker_still_computes_right_after_fuzzing(fake_host):
    router, wid, worker, path = fake_host
    assert SENT["worker"] >= 1500, SENT
    _drain(router)
    ready = _ask(router, wid, "assign", {"epoch": 10**6, "model": path, "start": 0, "end": 2, "quant": "none",
                                         "dtype": "float32"}, want="ready")
    assert ready.get("start", int) == 0
    files = distllm._ModelFiles(path)
    shard = distllm.StageShard(files, distllm._load_config(files), 0, 2, quant="none", dtype=torch.float32,
                               device=torch.device("cpu"))
    hidden = torch.randn(1, 5, 64)
    result = _ask(router, wid, "forward", {"epoch": 10**6, "sid": "check", "step": 1, "stage": 0, "start": 0},
                  [hidden])
    assert torch.equal(result.tensor(0), shard.forward("check", hidden, 0))


def test_a_step_with_nan_in_it_is_refused_and_leaves_no_trace_in_the_cache(fake_host):
    """The NaN/Inf check runs while the device computes: a refused step's cache entries are undone, so the
    same position sent again with good numbers gives what it gives in a single process."""
    router, wid, worker, path = fake_host
    _drain(router)
    _ask(router, wid, "assign", {"epoch": 7, "model": path, "start": 0, "end": 2, "quant": "none",
                                 "dtype": "float32"}, want="ready")
    files = distllm._ModelFiles(path)
    shard = distllm.StageShard(files, distllm._load_config(files), 0, 2, quant="none", dtype=torch.float32,
                               device=torch.device("cpu"))
    prompt, good = torch.randn(1, 4, 64), torch.randn(1, 1, 64)
    bad = good.clone()
    bad[0, 0, 5] = float("nan")
    head = {"epoch": 7, "sid": "nan", "stage": 0}
    _ask(router, wid, "forward", {**head, "step": 1, "start": 0}, [prompt])
    refused = _ask(router, wid, "forward", {**head, "step": 2, "start": 4}, [bad], want="error")
    assert refused.get("code", str) == "protocol" and "NaN or Inf" in refused.get("message", str)
    assert worker._shard.slots["nan"].length == 4  # the refused position was taken back out
    result = _ask(router, wid, "forward", {**head, "step": 3, "start": 4}, [good])
    shard.forward("nan", prompt, 0)
    assert torch.equal(result.tensor(0), shard.forward("nan", good, 4))
    refused = _ask(router, wid, "forward", {**head, "step": 4, "sid": "new", "start": 0}, [prompt * float("inf")],
                   want="error")
    assert "NaN or Inf" in refused.get("message", str) and "new" not in worker._shard.slots  # begun and undone
