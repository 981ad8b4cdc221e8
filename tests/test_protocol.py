"""The wire protocol: JSON header + raw tensor frames, checked before anything is used."""

from __future__ import annotations

import json
import re
import types

import pytest
import torch
import zmq

import distllm
from distllm import ProtocolError, decode, encode

ALL = {"forward", "result", "join"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32])
def test_tensors_round_trip_bit_exact(dtype):
    t = (torch.randn(1, 5, 8) * 100).to(dtype)
    msg = decode(encode("forward", {"sid": "a", "step": 3}, [t, t[:, :2]]), allowed=ALL)
    assert msg.type == "forward" and msg.get("step", int) == 3
    assert torch.equal(msg.tensor(0), t) and msg.tensor(0).dtype == dtype
    assert torch.equal(msg.tensor(1), t[:, :2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_hidden_states_with_nan_or_inf_are_refused_whatever_their_dtype(dtype):
    info = torch.finfo(dtype)
    fine = torch.cat([torch.randn(1, 3, 64) * 100, torch.tensor([info.max, info.min, info.tiny, 0.0, -0.0,
                                                                 info.eps]).expand(1, 3, 6)], dim=2).to(dtype)
    distllm._check_hidden(fine, 70, "forward")  # extremes and zeros are finite
    for bad in (float("nan"), float("inf"), float("-inf")):
        t = fine.clone()
        t[0, 2, 41] = bad
        with pytest.raises(ProtocolError, match="NaN or Inf"):
            distllm._check_hidden(t, 70, "forward")
        assert not distllm._all_finite(t[:, 1:, 40:])  # a view that is not contiguous too
    assert distllm._all_finite(fine[:, :, ::2])


def test_empty_tensor_round_trips():
    msg = decode(encode("result", {}, [torch.empty(1, 0, 4)]), allowed=ALL)
    assert msg.tensor(0).shape == (1, 0, 4)


def _frames(header: dict, *payload: bytes) -> list[bytes]:
    return [json.dumps(header).encode(), *payload]


BASE = {"v": distllm.PROTOCOL_VERSION, "type": "forward"}


@pytest.mark.parametrize("frames, reason", [
    ([], "empty"),
    ([b"\xff\xfe"], "UTF-8 JSON"),
    ([b"{not json"], "UTF-8 JSON"),
    ([b"[1, 2]"], "JSON object"),
    (_frames({**BASE, "v": 99}), "protocol version"),
    (_frames({**BASE, "type": "exec"}), "unexpected message type"),
    (_frames({**BASE, "tensors": [{"dtype": "float32", "shape": [2]}]}, b"\0" * 7), "needs 8 bytes"),
    (_frames({**BASE, "tensors": [{"dtype": "object", "shape": [1]}]}, b"\0" * 8), "allowed dtype"),
    (_frames({**BASE, "tensors": [{"dtype": "float32", "shape": [-1]}]}, b""), "bad tensor shape"),
    (_frames({**BASE, "tensors": [{"dtype": "float32", "shape": [True]}]}, b"\0" * 4), "bad tensor shape"),
    (_frames({**BASE, "tensors": []}, b"\0" * 4), "frames came"),
    (_frames({**BASE, "tensors": [{"dtype": "float32", "shape": [1 << 20, 1 << 20]}]}, b""), "exceeds the cap"),
    ([b"{" + b" " * distllm.MAX_HEADER_BYTES + b"}"], "exceeds"),
])
def test_malformed_messages_are_refused_with_a_reason(frames, reason):
    with pytest.raises(ProtocolError, match=reason):
        decode(frames, allowed=ALL)


def test_header_fields_are_type_checked():
    msg = decode(_frames({**BASE, "step": "3", "ok": True}), allowed=ALL)
    with pytest.raises(ProtocolError, match="step"):
        msg.get("step", int)
    with pytest.raises(ProtocolError, match="bool"):
        msg.get("ok", int)
    with pytest.raises(ProtocolError, match="lacks"):
        msg.get("sid", str)


def test_join_string_round_trip_and_errors():
    info = distllm.JoinInfo("tcp://10.0.0.1:5555", *(["A" * 40] * 3))
    text = info.encode()
    assert text.startswith("dllm1.") and "\n" not in text
    assert distllm.JoinInfo.parse(f"  '{text}'\n") == info  # pasted with quotes and whitespace
    with pytest.raises(distllm.JoinStringError, match="starts with"):
        distllm.JoinInfo.parse("hello")
    damaged = text[:20] + ("B" if text[20] != "B" else "C") + text[21:]
    with pytest.raises(distllm.JoinStringError, match="damaged"):
        distllm.JoinInfo.parse(damaged)
    with pytest.raises(distllm.JoinStringError, match="damaged"):
        distllm.JoinInfo.parse(text[:-6])


def test_public_names_are_exactly_all():
    public = {n for n, v in vars(distllm).items()
              if not n.startswith("_") and not isinstance(v, types.ModuleType)
              and getattr(v, "__module__", "distllm") == "distllm"}
    assert public == set(distllm.__all__)


def test_no_unsafe_deserialisation_in_the_module():
    source = open(distllm.__file__).read()
    for pattern in (r"pickle", r"send_pyobj", r"recv_pyobj", r"(?<![.\w])eval\(", r"\bexec\(", r"torch\.load"):
        assert not re.search(pattern, source), pattern


def test_host_survives_garbage_from_an_authenticated_peer(model_dir):
    """A peer with valid keys sends junk: each message is dropped and generation is unaffected."""
    with distllm.local(model_dir("llama"), workers=2, stages=2, quant="none") as cluster:
        want = cluster.generate([5, 6, 7], max_new_tokens=12)
        info = distllm.JoinInfo.parse(cluster.join_string)
        ctx = zmq.Context.instance()
        rogue = ctx.socket(zmq.DEALER)
        rogue.curve_serverkey = info.server_key.encode()
        rogue.curve_publickey, rogue.curve_secretkey = info.client_public.encode(), info.client_secret.encode()
        rogue.connect(info.endpoint)
        junk = [
            [b"\x80\x04pickle"], [b"{}"], _frames({**BASE, "type": "result"}),
            _frames({"v": distllm.PROTOCOL_VERSION, "type": "result", "sid": "x", "step": 1, "stage": 0, "epoch": 1,
                     "tensors": [{"dtype": "float32", "shape": [1, 1, 64]}]}, b"\0" * 256),
            _frames({"v": distllm.PROTOCOL_VERSION, "type": "join", "name": 5}),
        ]
        for frames in junk:
            rogue.send_multipart(frames)
        # The peer did send a join that was refused (bad name), so it is no member and gets no work.
        assert cluster.generate([5, 6, 7], max_new_tokens=12) == want
        assert len(cluster.workers()) == 2
        rogue.close(0)
