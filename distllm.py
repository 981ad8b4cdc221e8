"""distllm: fault-tolerant distributed LLM inference on free, unstable compute.

A *host* (one notebook) holds the tokenizer, the embeddings, the final norm, the
LM head and sampling; *workers* (other notebooks, any machine that can dial the
host) each hold a contiguous range of the model's decoder layers, quantized to
4 bits with bitsandbytes. Every token travels host -> stage 0 -> host -> stage 1
-> ... over ZeroMQ, so only the host needs a reachable address.

Quick start, two cells::

    # host notebook
    import distllm
    cluster = distllm.host("Qwen/Qwen2.5-7B-Instruct", quant="nf4", workers=2)
    cluster                          # shows the join cell for the workers

    # each worker notebook
    import distllm
    distllm.join("dllm1.…")          # serves until stopped

    # back on the host
    print(cluster.generate("Why is the sky blue?", max_new_tokens=200))

One machine, no notebooks::

    with distllm.local("tiny", workers=3) as cluster:
        print(cluster.generate("hello", max_new_tokens=20))

CLI: ``python -m distllm demo | host MODEL | join JOIN_STRING | bench``.

Sections, in order (each uses only what stands above it):
constants · errors · configuration and domain types · utilities · wire protocol ·
transport and join strings · model files and families · the built-in tiny model ·
shard math · worker · coordinator and sessions · cluster handles · shortcuts ·
CLI.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = [
    # entry points
    "host",
    "join",
    "local",
    "main",
    "bench_overhead",
    "bench_failover",
    # handles
    "Cluster",
    "Worker",
    # configuration and domain types
    "Config",
    "SamplingParams",
    "Stage",
    "SUPPORTED_MODEL_TYPES",
    # wire protocol
    "PROTOCOL_VERSION",
    "JOIN_PREFIX",
    "MAX_HEADER_BYTES",
    "Message",
    "JoinInfo",
    # tunnels
    "BoreTunnel",
    "NgrokTunnel",
    "encode",
    "decode",
    # model math (used by workers, the host and the tests' references)
    "StageShard",
    "HostHead",
    "quantize_linears",
    "sample",
    "plan_layers",
    # errors
    "DistllmError",
    "ProtocolError",
    "JoinStringError",
    "JoinRefusedError",
    "UnsupportedModelError",
    "PromptTooLongError",
    "ClusterNotReadyError",
    "RequestError",
    "StepFailedError",
    "StepOrderError",
]

import base64 as _base64
import binascii as _binascii
import collections as _collections
import dataclasses as _dataclasses
import hashlib as _hashlib
import inspect as _inspect
import itertools as _itertools
import json as _json
import logging as _logging
import math as _math
import multiprocessing as _mp
import os as _os
import queue as _queue
import signal as _signal
import socket as _socket
import sys as _sys
import tempfile as _tempfile
import threading as _threading
import time as _time
import uuid as _uuid
from typing import Any, Iterator, Sequence

import torch
import zmq

_log = _logging.getLogger("distllm")

###############################################################################
# Constants ###################################################################
###############################################################################

PROTOCOL_VERSION = 1
JOIN_PREFIX = "dllm1."
MAX_HEADER_BYTES = 64 * 1024

# Tensor dtypes allowed on the wire; anything else is refused before it is read.
_WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
}
_DTYPE_NAMES = {v: k for k, v in _WIRE_DTYPES.items()}

# Message types and the direction they travel in.
_HOST_TO_WORKER = {"welcome", "assign", "forward", "end", "ping", "pong", "shutdown", "error"}
_WORKER_TO_HOST = {"join", "ready", "result", "pong", "ping", "leave", "error", "failed"}

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma")

###############################################################################
# Errors ######################################################################
###############################################################################


class DistllmError(Exception):
    """Base class of every error distllm raises on purpose."""


class ProtocolError(DistllmError):
    """A message broke the wire protocol; it is dropped and the node keeps serving."""


class JoinStringError(DistllmError):
    """A join string is malformed, damaged, or for another protocol version."""


class JoinRefusedError(DistllmError):
    """The host refused this worker (wrong, old or unencrypted join string; kicked), or never answered."""


class UnsupportedModelError(DistllmError):
    """The model's architecture is not one distllm can split into stages."""


class PromptTooLongError(DistllmError):
    """The prompt does not fit the model's context window."""


class ClusterNotReadyError(DistllmError):
    """No complete pipeline of workers was available within the wait limit."""


class StepFailedError(DistllmError):
    """A request's steps kept failing on the workers (for example out of memory), not just vanishing."""


class RequestError(DistllmError):
    """A request's arguments are invalid."""


###############################################################################
# Configuration and domain types ##############################################
###############################################################################

_QUANTS = ("nf4", "int8", "none")
_DTYPES = ("auto", "float32", "float16", "bfloat16")

SessionID = str
WorkerID = bytes  # the ZeroMQ routing id of a worker's DEALER socket


@_dataclasses.dataclass
class Config:
    """Every knob of a cluster; `host()`, `local()` and `join()` take these as keywords."""

    quant: str = "nf4"  # decoder-layer weights on workers: "nf4", "int8" or "none"
    dtype: str = "auto"  # compute dtype: "auto" (the checkpoint's) or float32/float16/bfloat16
    revision: str | None = None  # Hub revision (branch, tag or commit) of the model
    token: str | None = None  # Hugging Face token for private or gated repos
    hub_endpoint: str | None = None  # Hub URL, e.g. a mirror (None: $HF_ENDPOINT or huggingface.co)
    workers: int = 1  # the host places layers once this many workers have joined
    max_stages: int | None = None  # most pipeline stages (None: every worker that joined)
    replicas: int = 1  # workers holding each layer range; a step goes to all, the first answer wins
    step_timeout_s: float = 30.0  # seconds a step may take before its worker counts as stuck (a floor)
    history_mb: int = 1024  # MB of stage inputs the host keeps for replay (oldest sessions' go first)
    replica_tolerance: float = 0.05  # relative difference between replicas' outputs that flags one
    max_step_errors: int = 3  # failed steps (worker errors, not losses) after which a request fails
    join_timeout_s: float = 30.0  # seconds a worker waits for the host's welcome before giving up
    leave_timeout_s: float = 60.0  # seconds a leaving worker serves on while its layers are handed over
    leave_at: float | None = None  # Unix time a worker must be gone by (a Colab/Kaggle session's end)
    prefill_chunk: int = 256  # prompt tokens sent per prefill step
    heartbeat_s: float = 1.0  # seconds between heartbeats, both directions
    liveness_s: float = 5.0  # seconds of silence after which a worker counts as dead
    reconnect_grace_s: float = 0.5  # seconds a worker whose TCP connection closed has to reconnect (a floor)
    wait_timeout_s: float = 600.0  # seconds a request waits for a complete pipeline
    max_message_bytes: int = 1 << 28  # bytes; larger ZeroMQ messages are refused
    max_sessions_per_worker: int = 256  # KV caches a worker keeps (least recently used go first)
    secure: bool = True  # CURVE encryption and client authentication on the wire
    bind: str = "0.0.0.0"  # interface the host listens on
    port: int = 0  # TCP port of the host (0: any free port)
    advertise: str | None = None  # host name or IP put in the join string (None: guessed)
    tunnel: Any = None  # None, "bore", "bore://[secret@]host[:port]", "ngrok", or an object with open/close
    worker_threads: int | None = None  # torch CPU threads per local worker (None: cores / workers)
    memory_fraction: float = 0.85  # share of a worker's free memory its layers may fill

    def __post_init__(self) -> None:
        if self.quant not in _QUANTS:
            raise ValueError(f"quant={self.quant!r}: choose one of {', '.join(_QUANTS)}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: choose one of {', '.join(_DTYPES)}")
        if self.workers < 1:
            raise ValueError(f"workers={self.workers}: a cluster needs at least one worker")
        if self.replicas < 1:
            raise ValueError(f"replicas={self.replicas}: must be at least 1")
        if self.max_stages is not None and self.max_stages < 1:
            raise ValueError(f"max_stages={self.max_stages}: must be at least 1")
        if self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk={self.prefill_chunk}: must be at least 1")
        if not 0 < self.heartbeat_s < self.liveness_s:
            raise ValueError(
                f"heartbeat_s={self.heartbeat_s} must be positive and below liveness_s={self.liveness_s}"
            )

    @classmethod
    def build(cls, config: "Config | None" = None, **overrides: Any) -> "Config":
        """Return `config` (or the defaults) with `overrides` applied, naming any unknown keyword."""
        known = {f.name for f in _dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(unknown)}; Config has {', '.join(sorted(known))}")
        base = {f.name: getattr(config, f.name) for f in _dataclasses.fields(cls)} if config is not None else {}
        return cls(**{**base, **overrides})


@_dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens; temperature 0 is greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise RequestError(f"max_new_tokens={self.max_new_tokens}: must be 0 or more")
        if self.temperature < 0 or not _math.isfinite(self.temperature):
            raise RequestError(f"temperature={self.temperature}: must be a finite number >= 0")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.top_k < 0:
            raise RequestError(f"top_k={self.top_k}: must be 0 (off) or more")


@_dataclasses.dataclass
class Stage:
    """Layers [start, end) of the model and the workers holding them (replicas, in preference order)."""

    start: int
    end: int
    workers: list[WorkerID]

    @property
    def layers(self) -> int:
        return self.end - self.start


###############################################################################
# Utilities ###################################################################
###############################################################################


def _require(module: str, hint: str) -> Any:
    """Import an optional dependency or say how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{module} is needed for this: {hint}") from exc


def _rss_bytes() -> int:
    """Return this process's resident memory in bytes."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _available_memory(device: torch.device) -> int:
    """Return the bytes this process could still allocate on `device`."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(_os.sysconf("SC_PAGE_SIZE") * _os.sysconf("SC_AVPHYS_PAGES"))


def _pid_alive(pid: int) -> bool:
    try:
        _os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _release_freed_memory() -> None:
    """Hand memory freed after loading back to the OS (glibc keeps it otherwise)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _cache_dir() -> str:
    root = _os.environ.get("DISTLLM_CACHE") or _os.path.join(
        _os.environ.get("XDG_CACHE_HOME") or _os.path.expanduser("~/.cache"), "distllm"
    )
    _os.makedirs(root, exist_ok=True)
    return root


def _step_seed(seed: int, position: int) -> int:
    """Derive the sampling seed of one position, so a replayed step draws the same token."""
    digest = _hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


###############################################################################
# Wire protocol ###############################################################
###############################################################################
# A message is a multipart ZeroMQ message: frame 0 is a UTF-8 JSON header, frames
# 1..n are raw tensor bytes described by header["tensors"]. Nothing received is
# ever turned into Python objects or run as code; every field is checked before use.


class Message:
    """A decoded, validated message: its header and its (lazily built) tensors."""

    __slots__ = ("header", "frames", "_specs")

    def __init__(self, header: dict, frames: Sequence[Any], specs: list[tuple[torch.dtype, tuple[int, ...]]]):
        self.header = header
        self.frames = list(frames)  # raw tensor frames, forwardable without a copy
        self._specs = specs

    @property
    def type(self) -> str:
        return self.header["type"]

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        """Return header field `key`, checked to be of `kind`; raise ProtocolError otherwise."""
        if key not in self.header:
            if default is ...:
                raise ProtocolError(f"{self.type} message lacks field {key!r}")
            return default
        value = self.header[key]
        if isinstance(value, bool) and kind in (int, float):
            raise ProtocolError(f"field {key!r} of {self.type} must be {kind.__name__}, got bool")
        if not isinstance(value, kind):
            raise ProtocolError(f"field {key!r} of {self.type} has type {type(value).__name__}")
        return value

    def tensor(self, index: int = 0) -> torch.Tensor:
        """Return tensor `index` as a fresh CPU tensor (one copy out of the frame)."""
        if index >= len(self._specs):
            raise ProtocolError(f"{self.type} message carries {len(self._specs)} tensors, wanted #{index}")
        dtype, shape = self._specs[index]
        data = bytearray(_frame_bytes(self.frames[index]))
        if not data:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).view(shape)


def _frame_bytes(frame: Any) -> memoryview | bytes:
    return frame.buffer if isinstance(frame, zmq.Frame) else frame


def _tensor_frame(t: torch.Tensor) -> memoryview:
    """Return the raw bytes of `t` (made contiguous and moved to the CPU)."""
    t = t.detach().to("cpu").contiguous()
    return memoryview(t.view(torch.uint8).reshape(-1).numpy())


def encode(msg_type: str, header: dict | None = None, tensors: Sequence[torch.Tensor | tuple] = ()) -> list:
    """Encode a message as ZeroMQ frames.

    `tensors` holds tensors, or `(dtype_name, shape, raw_frame)` triples that
    forward an already-encoded tensor without copying it.
    """
    specs, frames = [], []
    for t in tensors:
        if isinstance(t, tuple):
            name, shape, raw = t
        else:
            if t.dtype not in _DTYPE_NAMES:
                raise ProtocolError(f"dtype {t.dtype} cannot travel; allowed: {', '.join(_WIRE_DTYPES)}")
            name, shape, raw = _DTYPE_NAMES[t.dtype], list(t.shape), _tensor_frame(t)
        specs.append({"dtype": name, "shape": list(shape)})
        frames.append(raw)
    full = {"v": PROTOCOL_VERSION, "type": msg_type, **(header or {}), "tensors": specs}
    head = _json.dumps(full, separators=(",", ":")).encode()
    if len(head) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(head)} bytes exceeds {MAX_HEADER_BYTES}")
    return [head, *frames]


def decode(frames: Sequence[Any], *, allowed: set[str], max_elements: int = 1 << 28) -> Message:
    """Validate and decode frames received from the network; raise ProtocolError on anything off."""
    if not frames:
        raise ProtocolError("empty message")
    head = bytes(_frame_bytes(frames[0]))
    if len(head) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(head)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = _json.loads(head.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"header is not UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header is not a JSON object")
    version = header.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version!r}, this node speaks {PROTOCOL_VERSION}")
    msg_type = header.get("type")
    if msg_type not in allowed:
        raise ProtocolError(f"unexpected message type {msg_type!r}")
    specs_raw = header.get("tensors", [])
    if not isinstance(specs_raw, list) or len(specs_raw) != len(frames) - 1:
        raise ProtocolError(f"{msg_type}: header lists {specs_raw!r} tensors but {len(frames) - 1} frames came")
    specs = []
    for spec, frame in zip(specs_raw, frames[1:]):
        if not isinstance(spec, dict) or spec.get("dtype") not in _WIRE_DTYPES:
            raise ProtocolError(f"{msg_type}: tensor spec {spec!r} has no allowed dtype")
        shape = spec.get("shape")
        if not isinstance(shape, list) or len(shape) > 8 or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d for d in shape
        ):
            raise ProtocolError(f"{msg_type}: bad tensor shape {shape!r}")
        dtype = _WIRE_DTYPES[spec["dtype"]]
        elements = _math.prod(shape)
        if elements > max_elements:
            raise ProtocolError(f"{msg_type}: tensor of {elements} elements exceeds the cap {max_elements}")
        expected = elements * dtype.itemsize
        got = len(_frame_bytes(frame))
        if got != expected:
            raise ProtocolError(f"{msg_type}: {spec['dtype']}{shape} needs {expected} bytes, frame has {got}")
        specs.append((dtype, tuple(shape)))
    return Message(header, frames[1:], specs)


def _check_hidden(t: torch.Tensor, hidden_size: int, what: str) -> None:
    """Refuse a hidden-state tensor of the wrong shape, dtype or with NaN/Inf in it."""
    if t.dim() != 3 or t.shape[0] != 1 or t.shape[2] != hidden_size:
        raise ProtocolError(f"{what}: hidden states of shape {tuple(t.shape)}, want (1, n, {hidden_size})")
    if not t.is_floating_point():
        raise ProtocolError(f"{what}: hidden states of dtype {t.dtype}")
    if not bool(torch.isfinite(t).all()):
        raise ProtocolError(f"{what}: hidden states hold NaN or Inf")


###############################################################################
# Transport and join strings ##################################################
###############################################################################


@_dataclasses.dataclass(frozen=True)
class JoinInfo:
    """What a worker needs to reach and authenticate to a host."""

    endpoint: str  # tcp://host:port
    server_key: str | None  # Z85 CURVE public key of the host (None: plain TCP)
    client_public: str | None
    client_secret: str | None

    def encode(self) -> str:
        body = _json.dumps(
            {"v": PROTOCOL_VERSION, "e": self.endpoint, "s": self.server_key,
             "cp": self.client_public, "cs": self.client_secret},
            separators=(",", ":"),
        ).encode()
        crc = _binascii.crc32(body).to_bytes(4, "big")
        return JOIN_PREFIX + _base64.urlsafe_b64encode(body + crc).decode().rstrip("=")

    @classmethod
    def parse(cls, text: str) -> "JoinInfo":
        text = (text or "").strip().strip("'\"")
        if not text.startswith(JOIN_PREFIX):
            raise JoinStringError(
                f"a join string starts with {JOIN_PREFIX!r}; got {text[:12]!r}… — copy it from the host's panel"
            )
        payload = text[len(JOIN_PREFIX):]
        try:
            raw = _base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        except (ValueError, _binascii.Error):
            raise JoinStringError("join string is damaged (not base64): copy it again from the host") from None
        body, crc = raw[:-4], raw[-4:]
        if len(raw) < 5 or _binascii.crc32(body).to_bytes(4, "big") != crc:
            raise JoinStringError("join string is damaged (checksum mismatch): copy it again from the host")
        try:
            data = _json.loads(body)
        except ValueError:
            raise JoinStringError("join string is damaged (bad JSON)") from None
        if not isinstance(data, dict) or data.get("v") != PROTOCOL_VERSION:
            raise JoinStringError(
                f"join string is for protocol {data.get('v') if isinstance(data, dict) else '?'}, "
                f"this distllm {__version__} speaks {PROTOCOL_VERSION}: install the host's version"
            )
        endpoint = data.get("e")
        if not isinstance(endpoint, str) or not endpoint.startswith("tcp://"):
            raise JoinStringError(f"join string names no tcp:// endpoint ({endpoint!r})")
        keys = [data.get(k) for k in ("s", "cp", "cs")]
        if any(k is not None and (not isinstance(k, str) or len(k) != 40) for k in keys) or (
            None in keys and any(k is not None for k in keys)
        ):
            raise JoinStringError("join string carries malformed keys")
        return cls(endpoint, *keys)


def _set_limits(sock: zmq.Socket, config: Config) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, config.max_message_bytes)
    sock.setsockopt(zmq.SNDHWM, 10_000)
    sock.setsockopt(zmq.RCVHWM, 10_000)


def _advertised_host(config: Config) -> str:
    if config.advertise:
        return config.advertise
    if config.bind not in ("0.0.0.0", "*", "::"):
        return config.bind
    try:
        return _socket.gethostbyname(_socket.gethostname())
    except OSError:
        return "127.0.0.1"


###############################################################################
# Tunnels #####################################################################
###############################################################################
# Colab and Kaggle accept no inbound connections: a host there reaches its workers
# through a relay. A tunnel opens a public address for the host's local port; the
# join string carries that address. CURVE runs end to end, so the relay sees only
# ciphertext.


class BoreTunnel:
    """A pure-Python client for bore (github.com/ekzhang/bore): no account, no binary.

    The protocol: null-delimited JSON on the server's control port (7835). The client
    sends {"Hello": port} and gets {"Hello": public_port}; for each visitor the server
    sends {"Connection": uuid}, and the client opens a new connection to the control
    port, sends {"Accept": uuid}, and then relays bytes between it and the local port.
    With a secret, the server first sends {"Challenge": uuid}, answered with
    {"Authenticate": hex(HMAC-SHA256(key=SHA256(secret), uuid bytes))}.
    """

    CONTROL_PORT = 7835

    def __init__(self, server: str = "bore.pub", *, control_port: int = CONTROL_PORT, secret: str | None = None,
                 remote_port: int = 0):
        self.server, self.control_port, self.secret, self.remote_port = server, control_port, secret, remote_port
        self._control: _socket.socket | None = None
        self._closed = _threading.Event()

    def open(self, local_port: int) -> tuple[str, int]:
        """Ask the server for a public port that forwards to `local_port`; return (host, port)."""
        self._local_port = local_port
        self._control = _socket.create_connection((self.server, self.control_port), timeout=10)
        self._buffer = b""
        self._authenticate(self._control)
        self._send(self._control, {"Hello": self.remote_port})
        first = self._recv()
        if isinstance(first, dict) and "Challenge" in first:
            raise DistllmError(f"bore server {self.server} wants a secret: pass bore://SECRET@{self.server}")
        while first == "Heartbeat":
            first = self._recv()
        if not (isinstance(first, dict) and isinstance(first.get("Hello"), int)):
            raise DistllmError(f"bore server {self.server} refused the tunnel: {first!r}")
        self.remote_port = first["Hello"]
        self._control.settimeout(None)
        _threading.Thread(target=self._serve, name="distllm-bore", daemon=True).start()
        _log.info("bore tunnel: %s:%d -> localhost:%d", self.server, self.remote_port, local_port)
        return self.server, self.remote_port

    def close(self) -> None:
        self._closed.set()
        if self._control is not None:
            self._control.close()

    def _authenticate(self, sock: _socket.socket) -> None:
        """Answer the challenge a server with a secret opens every control connection with."""
        if self.secret is None:
            return
        import hmac

        challenge = self._recv(sock)
        if not (isinstance(challenge, dict) and isinstance(challenge.get("Challenge"), str)):
            raise DistllmError(f"bore server {self.server} asked for no secret, but one was given")
        key = _hashlib.sha256(self.secret.encode()).digest()
        answer = hmac.new(key, _uuid.UUID(challenge["Challenge"]).bytes, _hashlib.sha256).hexdigest()
        self._send(sock, {"Authenticate": answer})

    @staticmethod
    def _send(sock: _socket.socket, message: Any) -> None:
        sock.sendall(_json.dumps(message).encode() + b"\0")

    def _recv(self, sock: _socket.socket | None = None) -> Any:
        """Read one null-delimited JSON message from the control connection (or from `sock`).

        On another socket, it reads byte by byte, so no tunnelled data is consumed.
        """
        if sock is not None:
            frame = b""
            while not frame.endswith(b"\0") and len(frame) < 4096:
                byte = sock.recv(1)
                if not byte:
                    raise DistllmError(f"bore server {self.server} closed a connection mid-handshake")
                frame += byte
            return _json.loads(frame[:-1])
        while b"\0" not in self._buffer:
            try:
                chunk = self._control.recv(4096)
            except _socket.timeout:
                raise DistllmError(f"bore server {self.server} did not answer in time") from None
            if not chunk:
                raise DistllmError(f"bore server {self.server} closed the control connection")
            self._buffer += chunk
            if len(self._buffer) > 4096:
                raise DistllmError("bore server sent an oversized control message")
        frame, self._buffer = self._buffer.split(b"\0", 1)
        try:
            return _json.loads(frame)
        except ValueError:
            raise DistllmError(f"bore server sent a malformed control message: {frame[:80]!r}") from None

    def _serve(self) -> None:
        try:
            while not self._closed.is_set():
                message = self._recv()
                if isinstance(message, dict) and isinstance(message.get("Connection"), str):
                    _threading.Thread(target=self._accept, args=(message["Connection"],), daemon=True).start()
                elif isinstance(message, dict) and "Error" in message:
                    _log.error("bore server: %s", message["Error"])
                    return
        except (OSError, DistllmError) as exc:
            if not self._closed.is_set():
                _log.error("bore tunnel lost its control connection: %s", exc)

    def _accept(self, connection_id: str) -> None:
        try:
            remote = _socket.create_connection((self.server, self.control_port), timeout=10)
            self._authenticate(remote)
            self._send(remote, {"Accept": connection_id})
            local = _socket.create_connection(("127.0.0.1", self._local_port), timeout=10)
        except (OSError, ValueError, DistllmError) as exc:
            _log.warning("bore tunnel: could not accept a connection: %s", exc)
            return
        remote.settimeout(None)
        local.settimeout(None)
        _threading.Thread(target=_pump, args=(remote, local), daemon=True).start()
        _pump(local, remote)


def _pump(source: _socket.socket, sink: _socket.socket) -> None:
    """Copy bytes from `source` to `sink` until either side closes."""
    try:
        while True:
            data = source.recv(65536)
            if not data:
                break
            sink.sendall(data)
    except OSError:
        pass  # the other direction saw the close too; both sockets are shut below
    finally:
        for s in (source, sink):
            try:
                s.shutdown(_socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


class NgrokTunnel:
    """A TCP tunnel through ngrok (needs `pip install pyngrok` and an ngrok auth token)."""

    def open(self, local_port: int) -> tuple[str, int]:
        ngrok = _require("pyngrok.ngrok", "pip install pyngrok, then set your ngrok auth token")
        self._tunnel = ngrok.connect(local_port, "tcp")
        host, port = self._tunnel.public_url.removeprefix("tcp://").rsplit(":", 1)
        return host, int(port)

    def close(self) -> None:
        from pyngrok import ngrok

        ngrok.disconnect(self._tunnel.public_url)


def _make_tunnel(spec: Any) -> Any:
    """Return a tunnel for `spec`: an object with open(port) and close(), "ngrok", or a bore URL.

    "bore" uses the public bore.pub; "bore://[secret@]host[:control_port]" a self-hosted server.
    """
    if spec is None or hasattr(spec, "open"):
        return spec
    if spec == "ngrok":
        return NgrokTunnel()
    if isinstance(spec, str) and (spec == "bore" or spec.startswith("bore://")):
        rest = spec[len("bore://"):] if spec != "bore" else "bore.pub"
        secret, _, address = rest.rpartition("@")
        host, _, port = address.partition(":")
        return BoreTunnel(host or "bore.pub", control_port=int(port) if port else BoreTunnel.CONTROL_PORT,
                          secret=secret or None)
    raise ValueError(f"tunnel={spec!r}: use None, 'bore', 'bore://[secret@]host[:port]', 'ngrok', "
                     "or an object with open(local_port) -> (host, port) and close()")


###############################################################################
# Model files and families ####################################################
###############################################################################


@_dataclasses.dataclass(frozen=True)
class _Family:
    """How one transformers model family names its parts."""

    prefix: str  # class-name prefix in transformers: f"{prefix}DecoderLayer", f"{prefix}RotaryEmbedding"


_FAMILIES = {
    "llama": _Family("Llama"),
    "mistral": _Family("Mistral"),
    "qwen2": _Family("Qwen2"),
    "qwen3": _Family("Qwen3"),
    "phi3": _Family("Phi3"),
    "gemma": _Family("Gemma"),
}


class _ModelFiles:
    """Files of a checkpoint, from a local directory or a Hugging Face Hub repo.

    For a Hub repo only the files asked for are downloaded: the small metadata files,
    then just the weight shards that hold the tensors a node needs.
    """

    # Metadata a node may need; each is fetched if the repo has it.
    META_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
                  "added_tokens.json", "chat_template.jinja", "model.safetensors.index.json")

    def __init__(self, ref: str, *, revision: str | None = None, token: str | None = None,
                 endpoint: str | None = None, cache_dir: str | None = None):
        self.ref = ref
        self.revision = revision
        self.token = token
        self.endpoint = endpoint
        self.cache_dir = cache_dir
        self.local = _os.path.isdir(ref)
        self._meta_dir: str | None = ref if self.local else None

    def path(self, filename: str) -> str:
        """Return a local path of `filename`, downloading just that file from the Hub if needed."""
        if self.local:
            p = _os.path.join(self.ref, filename)
            if not _os.path.exists(p):
                raise FileNotFoundError(f"{filename} not found in {self.ref}")
            return p
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

        try:
            path = hf_hub_download(self.ref, filename, revision=self.revision, token=self.token,
                                   endpoint=self.endpoint, cache_dir=self.cache_dir)
        except EntryNotFoundError:
            raise FileNotFoundError(f"{filename} not found in Hub repo {self.ref}") from None
        except RepositoryNotFoundError:
            raise UnsupportedModelError(
                f"{self.ref!r} is neither a local directory nor a Hub repo this token can read") from None
        if self.revision is None:  # pin the commit, so every node loads the same files
            parts = path.replace("\\", "/").split("/")
            if "snapshots" in parts:
                self.revision = parts[parts.index("snapshots") + 1]
        return path

    def meta_dir(self) -> str:
        """Return a local directory holding the config and tokenizer files."""
        if self._meta_dir is None:
            found = [self.path(n) for n in self.META_FILES if self._try(n)]
            if not found:
                raise UnsupportedModelError(f"Hub repo {self.ref!r} has no config.json")
            self._meta_dir = _os.path.dirname(found[0])
        return self._meta_dir

    def _try(self, filename: str) -> bool:
        try:
            self.path(filename)
            return True
        except FileNotFoundError:
            return False

    def weight_map(self) -> dict[str, str]:
        """Return tensor name -> file name, from the shard index or the single weights file."""
        index = _os.path.join(self.meta_dir(), "model.safetensors.index.json")
        if _os.path.exists(index):
            with open(index) as f:
                return dict(_json.load(f)["weight_map"])
        from safetensors import safe_open

        with safe_open(self.path("model.safetensors"), "pt") as f:
            return {k: "model.safetensors" for k in f.keys()}

    def load(self, names: Sequence[str], weight_map: dict[str, str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Load just the tensors `names`, opening only the shard files that hold them."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = _collections.defaultdict(list)
        for name in names:
            by_file[weight_map[name]].append(name)
        self.opened = sorted(by_file)
        out = {}
        for filename, keys in sorted(by_file.items()):
            with safe_open(self.path(filename), "pt", device="cpu") as f:
                for k in keys:
                    t = f.get_tensor(k)  # may be backed by the file's pages: copy into our memory
                    out[k] = t.to(dtype if t.is_floating_point() else t.dtype, copy=True)
        return out


def _load_config(files: _ModelFiles) -> Any:
    """Load a model's config and check that distllm can split it."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(files.meta_dir())
    except (OSError, ValueError) as exc:
        raise UnsupportedModelError(f"cannot read the config of {files.ref!r}: {exc}") from exc
    if config.model_type not in _FAMILIES:
        raise UnsupportedModelError(
            f"model type {config.model_type!r} of {files.ref!r} is not supported; distllm splits "
            f"decoder-only models with the Llama layout: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    config._attn_implementation = "sdpa"
    return config


def _family_classes(config: Any) -> tuple[type, type]:
    """Return the decoder-layer and rotary-embedding classes of `config`'s family."""
    import importlib

    family = _FAMILIES[config.model_type]
    module = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
    return getattr(module, f"{family.prefix}DecoderLayer"), getattr(module, f"{family.prefix}RotaryEmbedding")


def _compute_dtype(config: Any, choice: str, device: torch.device) -> torch.dtype:
    if choice != "auto":
        return getattr(torch, choice)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16  # e.g. a T4
    return dtype


def _layer_params(config: Any) -> int:
    """Return the number of weights in one decoder layer (attention + MLP)."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    return attention + 3 * hidden * config.intermediate_size


def _layer_bytes(config: Any, quant: str, dtype: torch.dtype) -> int:
    """Return the bytes one decoder layer takes on a worker once loaded."""
    bytes_per_weight = {"nf4": 0.5 + 4 / 64, "int8": 1.0 + 4 / 64}.get(quant, dtype.itemsize)
    return int(_layer_params(config) * bytes_per_weight)


def _window_of_layer(config: Any, i: int) -> int | None:
    """Return the sliding-window size of layer `i`, or None for full attention."""
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if layer_types is not None:
        return window if layer_types[i] == "sliding_attention" else None
    return window  # Mistral and Phi-3 configs: one window for every layer, or None


###############################################################################
# The built-in tiny model #####################################################
###############################################################################
# A small random Llama with a character-level tokenizer, written with
# save_pretrained so that it goes through exactly the loading path of a Hub model.

_TINY_NAME = "tiny"
_TINY_VERSION = "v1"


def _tiny_tokenizer() -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in [chr(i) for i in range(32, 127)] + ["\n"]:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _write_tiny_model(path: str) -> None:
    """Write the built-in tiny model to `path` (deterministic: same bytes on every machine)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=384, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)


def _tiny_model_dir() -> str:
    """Return the directory of the built-in tiny model, writing it once."""
    final = _os.path.join(_cache_dir(), f"tiny-{_TINY_VERSION}")
    if not _os.path.exists(_os.path.join(final, "config.json")):
        tmp = _tempfile.mkdtemp(prefix="tiny-", dir=_cache_dir())
        _write_tiny_model(tmp)
        try:
            _os.replace(tmp, final)
        except OSError:  # another process finished first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _resolve_model(ref: str) -> str:
    return _tiny_model_dir() if ref == _TINY_NAME else ref


def _fingerprint(files: _ModelFiles) -> str:
    """Return a short digest of a local checkpoint's index and config (empty for Hub repos)."""
    if not files.local:
        return ""
    h = _hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json"):
        p = _os.path.join(files.ref, name)
        if _os.path.exists(p):
            with open(p, "rb") as f:
                h.update(f.read())
    p = _os.path.join(files.ref, "model.safetensors")
    if _os.path.exists(p):
        h.update(str(_os.path.getsize(p)).encode())
    return h.hexdigest()[:16]


###############################################################################
# Shard math ##################################################################
###############################################################################
# Tensor code only: no sockets. A worker's StageShard runs layers [start, end) for
# many sessions; the host's HostHead embeds tokens and turns hidden states into
# tokens. Both are also used in-process by the tests' references.


def quantize_linears(module: torch.nn.Module, quant: str, compute_dtype: torch.dtype,
                     device: torch.device) -> torch.nn.Module:
    """Replace every nn.Linear inside `module` by a bitsandbytes nf4/int8 layer on `device`.

    The same function quantizes a worker's stage and the tests' whole-model reference,
    so both round the weights identically.
    """
    if quant == "none":
        return module.to(device)
    bnb = _require("bitsandbytes", "pip install 'bitsandbytes>=0.47'")
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.Linear):
            weight = child.weight.data.to(compute_dtype)
            if quant == "nf4":
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4", device="meta")
                q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", module=q).to(device)
            else:
                q = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                        has_fp16_weights=False, device="meta")
                q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to(device)
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data.to(compute_dtype).to(device), requires_grad=False)
            setattr(module, name, q)
        else:
            quantize_linears(child, quant, compute_dtype, device)
    return module.to(device)


def _cache_keyword(layer_cls: type) -> str:
    """Return the name a decoder layer takes its KV cache by.

    transformers 5.24 calls it `cache=`; 5.17 (on the GPU machines) still `past_key_values=`.
    """
    params = _inspect.signature(layer_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _attention_mask(start: int, n: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """Return the boolean mask (1, 1, n, start + n) for n queries at positions start.. (True = attend).

    None where sdpa's own causal handling is exact: one query, or a prefill from 0,
    and no window that the keys reach past.
    """
    kv = start + n
    if (window is None or kv <= window) and (n == 1 or start == 0):
        return None
    q_pos = torch.arange(start, kv, device=device)[:, None]
    k_pos = torch.arange(kv, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= (q_pos - k_pos) < window
    return mask[None, None]


class _KVSlot:
    """The KV cache of one session on one stage."""

    __slots__ = ("cache", "length")

    def __init__(self) -> None:
        from transformers import DynamicCache

        # No config: every layer keeps all its keys; sliding windows are applied by our masks,
        # so the cache never depends on which global layer indices this stage holds.
        self.cache = DynamicCache()
        self.length = 0

    def crop(self, length: int) -> None:
        """Keep the first `length` positions.

        Done on the layers' tensors: `Cache.crop`'s argument changed meaning across
        transformers 5.x (a kept length before, tokens to remove in 5.24).
        """
        for layer in self.cache.layers:
            if getattr(layer, "keys", None) is not None and layer.keys.dim() == 4:
                layer.keys = layer.keys[:, :, :length]
                layer.values = layer.values[:, :, :length]
        self.length = length


class StepOrderError(DistllmError):
    """A step arrived for a position this stage's cache does not end at."""


class StageShard:
    """Decoder layers [start, end) of a model, with a KV cache per session."""

    def __init__(self, files: _ModelFiles, config: Any, start: int, end: int, *, quant: str,
                 dtype: torch.dtype, device: torch.device, max_sessions: int = 256):
        if not 0 <= start < end <= config.num_hidden_layers:
            raise ValueError(f"layer range [{start}, {end}) outside the model's {config.num_hidden_layers} layers")
        self.config, self.start, self.end = config, start, end
        self.dtype, self.device, self.quant = dtype, device, quant
        self.max_sessions = max_sessions
        layer_cls, rotary_cls = _family_classes(config)
        self._cache_kw = _cache_keyword(layer_cls)
        self.windows = [_window_of_layer(config, i) for i in range(start, end)]

        weight_map = files.weight_map()
        layers, opened = [], set()
        for i in range(start, end):  # one layer at a time: peak memory is one float layer
            layers.append(self._load_layer(files, weight_map, layer_cls, i))
            opened.update(files.opened)
        self.files_opened = sorted(opened)  # shard files read: only those holding this range
        self.layers = torch.nn.ModuleList(layers).eval()
        self.rotary = rotary_cls(config=config).to(device)
        _release_freed_memory()
        self.slots: _collections.OrderedDict[SessionID, _KVSlot] = _collections.OrderedDict()

    def _load_layer(self, files: _ModelFiles, weight_map: dict[str, str], layer_cls: type,
                    i: int) -> torch.nn.Module:
        """Build global layer `i` on the meta device, load its weights, quantize, renumber it."""
        with torch.device("meta"):
            layer = layer_cls(self.config, i)
        prefix = f"model.layers.{i}."
        names = [k for k in weight_map if k.startswith(prefix)]
        state = {k[len(prefix):]: t for k, t in files.load(names, weight_map, self.dtype).items()}
        missing = set(layer.state_dict()) - set(state)
        if missing:
            raise UnsupportedModelError(f"checkpoint lacks {sorted(missing)[:4]} of layer {i}")
        layer.load_state_dict(state, strict=True, assign=True)
        del state
        for sub in layer.modules():  # a stage's cache holds its own layers at 0..n-1
            if hasattr(sub, "layer_idx"):
                sub.layer_idx = i - self.start
        layer = quantize_linears(layer, self.quant, self.dtype, self.device)
        leftover = [n for n, t in _itertools.chain(layer.named_parameters(), layer.named_buffers())
                    if t.device.type == "meta"]
        if leftover:
            raise UnsupportedModelError(f"tensors {leftover[:4]} of layer {i} were not in the checkpoint")
        return layer

    @torch.inference_mode()
    def forward(self, sid: SessionID, hidden: torch.Tensor, start: int) -> torch.Tensor:
        """Run hidden states (1, n, H) at positions start..start+n-1 through this stage."""
        slot = self.slots.get(sid)
        if start == 0 or slot is None:
            if start != 0:
                raise StepOrderError(f"session {sid}: no cache here, step starts at position {start}")
            slot = _KVSlot()
            self.slots[sid] = slot
            while len(self.slots) > self.max_sessions:
                evicted, _ = self.slots.popitem(last=False)
                _log.warning("KV cache of session %s evicted (over %d sessions)", evicted, self.max_sessions)
        elif slot.length < start:
            raise StepOrderError(f"session {sid}: cache ends at {slot.length}, step starts at {start}")
        elif slot.length > start:  # a step sent again after a failure downstream: redo it
            slot.crop(start)
        self.slots.move_to_end(sid)
        n = hidden.shape[1]
        h = hidden.to(self.device, self.dtype)
        pids = torch.arange(start, start + n, device=self.device)[None]
        cos, sin = self.rotary(h, pids)
        masks = {w: _attention_mask(start, n, w, self.device) for w in set(self.windows)}
        for layer, window in zip(self.layers, self.windows):
            out = layer(h, attention_mask=masks[window], position_ids=pids, position_embeddings=(cos, sin),
                        use_cache=True, **{self._cache_kw: slot.cache})
            h = out[0] if isinstance(out, tuple) else out  # transformers < 5 returned tuples
        slot.length = start + n
        return h

    def drop(self, sid: SessionID) -> None:
        self.slots.pop(sid, None)


class HostHead:
    """The host's share of a model: tokenizer, embeddings, final norm and LM head."""

    def __init__(self, files: _ModelFiles, config: Any, *, dtype: torch.dtype, device: torch.device):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config, self.dtype, self.device = config, dtype, device
        self.tokenizer = AutoTokenizer.from_pretrained(files.meta_dir())
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        base = skeleton.model
        self.embed, self.norm = base.embed_tokens, base.norm
        self.lm_head = skeleton.lm_head
        head = torch.nn.ModuleDict({"embed": self.embed, "norm": self.norm, "lm_head": self.lm_head})
        weight_map = files.weight_map()
        wanted = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
                  "lm_head.weight": "lm_head.weight"}
        present = [k for k in wanted if k in weight_map]
        state = {wanted[k]: v for k, v in files.load(present, weight_map, dtype).items()}
        if "lm_head.weight" not in state:
            if not getattr(config, "tie_word_embeddings", False) or "embed.weight" not in state:
                raise UnsupportedModelError("checkpoint has no lm_head.weight and the embeddings are not tied")
            state["lm_head.weight"] = state["embed.weight"]
        head.load_state_dict(state, strict=True, assign=True)
        if hasattr(self.embed, "scalar_embed_scale"):  # Gemma: a non-persistent sqrt(hidden) buffer
            self.embed.embed_scale = torch.tensor(self.embed.scalar_embed_scale)
        head.to(device).eval()
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.context = int(getattr(config, "max_position_embeddings", 0) or 1 << 30)
        eos = getattr(config, "eos_token_id", None)
        eos = eos if isinstance(eos, list) else [eos]
        if self.tokenizer.eos_token_id is not None:
            eos.append(self.tokenizer.eos_token_id)
        self.eos_ids = frozenset(int(e) for e in eos if e is not None)

    @torch.inference_mode()
    def embed_tokens(self, ids: Sequence[int]) -> torch.Tensor:
        """Return hidden states (1, n, H) for token ids."""
        t = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        return self.embed(t).to(self.dtype)

    @torch.inference_mode()
    def logits(self, hidden_last: torch.Tensor) -> torch.Tensor:
        """Return float32 logits (V,) for the last position's hidden state (H,)."""
        h = self.norm(hidden_last.to(self.device, self.dtype)[None, None])
        logits = self.lm_head(h)[0, 0].float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.cpu()


def sample(logits: torch.Tensor, params: SamplingParams, position: int) -> int:
    """Pick the token at `position` from float logits (V,); seeded by (seed, position)."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs > params.top_p  # keeps at least the first token
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    gen = torch.Generator().manual_seed(_step_seed(params.seed, position))
    return int(torch.multinomial(probs, 1, generator=gen))


class _TextStream:
    """Turn token ids into text pieces as they come, without splitting characters."""

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int]):
        self.tok = tokenizer
        self.ids = list(prompt_ids[-4:])
        self.prefix = 0
        self.read = len(self.ids)

    def _text(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self._text(self.ids[self.prefix:self.read])
        after = self._text(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        before = self._text(self.ids[self.prefix:self.read])
        after = self._text(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):]


###############################################################################
# Worker ######################################################################
###############################################################################
# Two threads: the I/O thread owns the DEALER socket (joins, heartbeats, routing);
# the compute thread owns the shard and runs steps. They talk through a queue
# (I/O -> compute) and an inproc PAIR socket (compute -> I/O), so a long step never
# delays a heartbeat.


class Worker:
    """One worker's membership in a cluster: it dials the host, loads its layers and serves steps."""

    def __init__(self, join_string: str, *, name: str | None = None, device: str | None = None,
                 config: Config | None = None, parent_pid: int | None = None):
        self.join_info = JoinInfo.parse(join_string)
        self.name = name or f"{_socket.gethostname()}-{_os.getpid()}"
        self.device = torch.device(device) if device else _default_device()
        self.config = config or Config()
        self.state = "connecting"  # connecting -> joined -> loading -> ready; stopped at the end
        self.layers: tuple[int, int] | None = None
        self.steps_served = 0
        self.error: str | None = None
        self._parent_pid = parent_pid
        self._ident = f"{self.name}/{_uuid.uuid4().hex[:8]}".encode()
        self._incarnation = _uuid.uuid4().hex  # the host tells a restart from a reconnect by it
        self._jobs: _queue.Queue = _queue.Queue()
        self._stopping = _threading.Event()
        self._leaving = _threading.Event()  # set by leave(), SIGTERM or the deadline: hand over, then stop
        self._welcomed = _threading.Event()
        self._stopped = _threading.Event()
        self._ctx = zmq.Context()
        self._inproc = f"inproc://distllm-worker-{_uuid.uuid4().hex}"
        self._shard: StageShard | None = None
        self._shard_key: tuple | None = None  # (model, start, end, quant) of the loaded shard
        self._epoch: int | None = None  # epoch of the current assignment; steps must carry it
        self._threads: list[_threading.Thread] = []

    def __repr__(self) -> str:
        layers = f"layers {self.layers[0]}..{self.layers[1] - 1}" if self.layers else "no layers"
        return f"<distllm.Worker {self.name} {self.state}, {layers}, {self.steps_served} steps>"

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> "Worker":
        """Start serving in background threads and return at once."""
        pair = self._ctx.socket(zmq.PAIR)
        pair.bind(self._inproc)  # bound before the compute thread connects
        self._threads = [  # compute first: the I/O thread may stop (and join it) at once
            _threading.Thread(target=self._compute_loop, name=f"distllm-compute-{self.name}", daemon=True),
            _threading.Thread(target=self._io_loop, args=(pair,), name=f"distllm-io-{self.name}", daemon=True),
        ]
        for t in self._threads:
            t.start()
        return self

    def _refuse(self, why: str) -> None:
        _log.error("worker %s: %s", self.name, why)
        self.error, self.state = why, "refused"
        self._stopping.set()

    def wait_joined(self, timeout: float | None = None) -> "Worker":
        """Block until the host welcomed this worker; raise JoinRefusedError if it refused or never answered."""
        deadline = _time.monotonic() + (self.config.join_timeout_s + 5 if timeout is None else timeout)
        while not self._welcomed.wait(0.05):
            if self.error is not None or _time.monotonic() > deadline:
                raise JoinRefusedError(self.error or "no welcome from the host in time")
        return self

    def serve(self) -> None:
        """Serve until the host shuts the worker down, or Ctrl-C (which leaves gracefully)."""
        self.start()
        try:
            while not self._stopped.wait(0.5):
                pass
        except KeyboardInterrupt:
            self.leave()

    def leave(self, timeout: float | None = None) -> None:
        """Leave gracefully: keep serving until the host has handed this worker's layers over.

        The host answers with a shutdown once a replacement is warm (or at once when it
        has none); after `Config.leave_timeout_s` the worker goes regardless.
        """
        self._leaving.set()
        self._stopped.wait(self.config.leave_timeout_s + 5 if timeout is None else timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the worker stopped; return whether it did."""
        return self._stopped.wait(timeout)

    # -- I/O thread -----------------------------------------------------------

    def _connect(self) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        _set_limits(sock, self.config)
        sock.setsockopt(zmq.ROUTING_ID, self._ident)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)  # ms; doubles per failed try (ZeroMQ's back-off) ...
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)  # ... up to 5 s
        info = self.join_info
        if info.server_key:
            sock.curve_serverkey = info.server_key.encode()
            sock.curve_publickey = info.client_public.encode()
            sock.curve_secretkey = info.client_secret.encode()
        sock.connect(info.endpoint)
        return sock

    def _join_message(self) -> list:
        import transformers

        return encode("join", {
            "name": self.name, "pid": _os.getpid(), "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "memory": _available_memory(self.device), "distllm": __version__, "incarnation": self._incarnation,
            "torch": torch.__version__, "transformers": transformers.__version__,
        })

    def _io_loop(self, pair: zmq.Socket) -> None:
        from zmq.utils.monitor import recv_monitor_message

        sock = self._connect()
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | _HANDSHAKE_FAILURES)
        sock.send_multipart(self._join_message())
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(pair, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        last_heard = last_join = started = _time.monotonic()
        warned_silent = False
        leave_sent: float | None = None
        try:
            while not self._stopping.is_set():
                now = _time.time()
                if self.config.leave_at is not None and now > self.config.leave_at - self.config.leave_timeout_s:
                    self._leaving.set()  # the notebook's session ends soon: hand over in time
                if self._leaving.is_set() and leave_sent is None:
                    _log.info("worker %s: leaving; serving until the host has moved our layers", self.name)
                    sock.send_multipart(encode("leave", {"drain": True}))
                    leave_sent = _time.monotonic()
                if leave_sent is not None and _time.monotonic() - leave_sent > self.config.leave_timeout_s:
                    _log.warning("worker %s: no hand-over after %.0f s; leaving anyway", self.name,
                                 self.config.leave_timeout_s)
                    break
                events = dict(poller.poll(int(self.config.heartbeat_s * 500)))
                if pair in events:
                    while pair.poll(0):
                        sock.send_multipart(pair.recv_multipart(copy=False), copy=False)
                if monitor in events:
                    while monitor.poll(0):
                        event = recv_monitor_message(monitor)["event"]
                        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:  # (re)connected: say so, the host counts
                            sock.send_multipart(encode("ping", {"t": 0}))
                        elif self.state == "connecting":  # CURVE refuses silently: the monitor tells us why
                            self._refuse(_handshake_failure(event, self.join_info))
                if self.state == "connecting" and _time.monotonic() - started > self.config.join_timeout_s:
                    self._refuse(f"no answer from the host at {self.join_info.endpoint} after "
                                 f"{self.config.join_timeout_s:.0f} s: is it running, and is the address reachable "
                                 f"from here (a LAN or tunnel address, not 127.0.0.1 of another machine)? "
                                 f"Or it runs without encryption (secure=False) and this join string has keys.")
                if sock in events:
                    while sock.poll(0):
                        frames = sock.recv_multipart(copy=False)
                        last_heard = _time.monotonic()
                        warned_silent = False
                        self._on_host_message(sock, frames)
                silent = _time.monotonic() - last_heard
                if silent > self.config.liveness_s and _time.monotonic() - last_join > self.config.liveness_s:
                    if not warned_silent:
                        _log.warning("worker %s: no word from the host for %.1f s; knocking again", self.name, silent)
                        warned_silent = True
                    sock.send_multipart(self._join_message())  # same incarnation: the host keeps our state
                    last_join = _time.monotonic()
                if self._parent_pid is not None and not _pid_alive(self._parent_pid):
                    _log.warning("worker %s: parent process is gone, stopping", self.name)
                    break
            if self.state not in ("stopped", "refused"):
                sock.send_multipart(encode("leave", {"reason": "worker stopping"}))
        except Exception:  # the I/O thread must not die silently: log, mark, stop
            _log.exception("worker %s: I/O loop failed", self.name)
            self.error = "I/O loop failed"
        finally:
            self._stopping.set()
            self._jobs.put(None)
            for t in self._threads:
                if t is not _threading.current_thread():
                    t.join(5.0)
            sock.disable_monitor()
            monitor.close(0)
            sock.close(linger=1000)  # lets a final leave message out
            pair.close(0)
            self._ctx.term()
            self.state = "refused" if self.state == "refused" else "stopped"
            self._stopped.set()

    def _on_host_message(self, sock: zmq.Socket, frames: list) -> None:
        try:
            self._handle_host_message(sock, decode(frames, allowed=_HOST_TO_WORKER,
                                                   max_elements=self.config.max_message_bytes // 2))
        except ProtocolError as exc:
            _log.warning("worker %s: dropped a message from the host: %s", self.name, exc)

    def _handle_host_message(self, sock: zmq.Socket, msg: Message) -> None:
        kind = msg.type
        if kind == "ping":
            sock.send_multipart(encode("pong", {"t": msg.get("t", (int, float), 0)}))
        elif kind == "pong":  # the host's answer to our reconnect ping: hearing it is all we need
            pass
        elif kind == "welcome":
            self.state = "joined" if self.state == "connecting" else self.state
            self._welcomed.set()
            _log.info("worker %s joined the cluster", self.name)
            if msg.get("quant", str, "none") != "none":
                self._jobs.put(msg)  # import bitsandbytes now, so a standby takes over without that wait
        elif kind in ("assign", "forward", "end"):
            self._jobs.put(msg)
        elif kind == "shutdown":
            _log.info("worker %s: host asked it to stop", self.name)
            self.state = "stopped"
            self._stopping.set()
        elif kind == "error" and msg.get("code", str, "") == "kicked":
            self._refuse(f"the host removed this worker: {msg.get('message', str, '')}")
        elif kind == "error" and msg.get("code", str, "") == "rejoin":
            # The host declared us dead (we were stopped or cut off): our caches are void.
            _log.warning("worker %s: the host no longer counts us as a member; joining afresh", self.name)
            self._incarnation = _uuid.uuid4().hex
            self._jobs.put(msg)  # the compute thread drops every cache, in order with queued steps
            self.state = "connecting"
            sock.send_multipart(self._join_message())
        elif kind == "error":
            _log.warning("worker %s: host reports: %s", self.name, msg.header.get("message"))

    # -- compute thread -------------------------------------------------------

    def _compute_loop(self) -> None:
        out = self._ctx.socket(zmq.PAIR)
        out.connect(self._inproc)
        try:
            while not self._stopping.is_set():
                msg = self._jobs.get()
                if msg is None:
                    break
                try:
                    reply = self._run_job(msg)
                except ProtocolError as exc:
                    _log.warning("worker %s: refused a %s message: %s", self.name, msg.type, exc)
                    reply = encode("error", {"code": "protocol", "message": str(exc), **_step_fields(msg)})
                except Exception as exc:  # a failed step must not stop the worker: report it, keep serving
                    _log.exception("worker %s: %s step failed", self.name, msg.type)
                    reply = encode("error", {"code": "failed", "message": f"{type(exc).__name__}: {exc}",
                                             **_step_fields(msg)})
                if reply is not None:
                    out.send_multipart(reply, copy=False)
        finally:
            out.close(0)

    def _run_job(self, msg: Message) -> list | None:
        if msg.type == "assign":
            return self._load(msg)
        if msg.type == "welcome":
            _require("bitsandbytes", "pip install 'bitsandbytes>=0.47'")
            return None
        if msg.type == "error":  # "rejoin": forget every session and the assignment's epoch
            if self._shard is not None:
                self._shard.slots.clear()
            self._epoch = None
            return None
        if msg.type == "end":
            if self._shard is not None:
                self._shard.drop(msg.get("sid", str))
            return None
        return self._forward(msg)

    def _load(self, msg: Message) -> list:
        start, end = msg.get("start", int), msg.get("end", int)
        epoch = msg.get("epoch", int)
        quant, dtype_name = msg.get("quant", str), msg.get("dtype", str)
        model = msg.get("model", str)
        if quant not in _QUANTS or dtype_name not in _DTYPES or dtype_name == "auto":
            raise ProtocolError(f"assign with quant={quant!r} dtype={dtype_name!r}")
        shard = self._shard
        key = (model, start, end, quant)
        rss_before = _rss_bytes()
        t0 = _time.perf_counter()
        if shard is None or self._shard_key != key:
            self.state = "loading"
            self._shard = shard = self._shard_key = None
            try:
                files = _ModelFiles(_resolve_model(model), revision=msg.get("revision", (str, type(None)), None),
                                    token=self.config.token, endpoint=msg.get("endpoint", (str, type(None)), None))
                fingerprint = msg.get("fingerprint", str, "")
                if fingerprint and _fingerprint(files) != fingerprint:
                    raise UnsupportedModelError(
                        f"model {model!r} on this machine differs from the host's (fingerprint mismatch)")
                config = _load_config(files)
                dtype = _compute_dtype(config, dtype_name, self.device)
                shard = StageShard(files, config, start, end, quant=quant, dtype=dtype, device=self.device,
                                   max_sessions=self.config.max_sessions_per_worker)
            except Exception as exc:  # report any load failure to the host, which re-plans
                _log.exception("worker %s: loading layers %d..%d failed", self.name, start, end - 1)
                self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"
                return encode("failed", {"epoch": epoch, "message": self.error})
        # Same range as before: the loaded layers and the sessions' caches stay valid.
        self._shard, self._shard_key, self.layers, self.state = shard, key, (start, end), "ready"
        self._epoch = epoch
        return encode("ready", {
            "epoch": epoch, "start": start, "end": end, "load_s": _time.perf_counter() - t0,
            "rss_before": rss_before, "rss_after": _rss_bytes(), "dtype": _DTYPE_NAMES[shard.dtype],
            "files": list(shard.files_opened),
        })

    def _forward(self, msg: Message) -> list:
        fields = _step_fields(msg)
        shard = self._shard
        if shard is None or msg.get("epoch", int) != self._epoch:
            return encode("error", {"code": "stale", "message": "no layers for this epoch", **fields})
        start = msg.get("start", int)
        if start < 0:
            raise ProtocolError(f"negative start position {start}")
        hidden = msg.tensor(0)
        _check_hidden(hidden, shard.config.hidden_size, "forward")
        t0 = _time.perf_counter()
        try:
            out = shard.forward(fields["sid"], hidden, start).cpu()  # synchronizes: compute_ms is honest
        except StepOrderError as exc:
            return encode("error", {"code": "order", "message": str(exc), **fields})
        self.steps_served += 1
        return encode("result", {**fields, "start": start, "compute_ms": (_time.perf_counter() - t0) * 1e3},
                      [out])


_HANDSHAKE_FAILURES = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                       | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


def _handshake_failure(event: int, info: JoinInfo) -> str:
    """Say in words why the host's socket turned this worker away."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return ("the host refused this worker's key: the join string is wrong, or old (the host rotated its "
                "keys); copy the current one from the host")
    if info.server_key is None:
        return "the host expects encryption (CURVE) but this join string has none: copy the host's join string"
    return ("the encrypted handshake with the host failed: the join string does not belong to the host at "
            f"{info.endpoint} (or that host runs with secure=False)")


def _step_fields(msg: Message) -> dict:
    """Return the fields that identify a step, copied from a forward message for its reply.

    Used for error replies too, so a field of the wrong type is replaced, never raised on.
    """
    fields = {}
    for key, kind, default in (("sid", str, ""), ("step", int, -1), ("stage", int, -1), ("start", int, -1),
                               ("epoch", int, -1)):
        try:
            fields[key] = msg.get(key, kind, default)
        except ProtocolError:
            fields[key] = default
    fields["sid"] = fields["sid"][:64]
    return fields


###############################################################################
# Coordinator and sessions ####################################################
###############################################################################
# One I/O thread owns the ROUTER socket and every piece of mutable cluster state:
# membership, the layer plan and the sessions. API calls from other threads reach
# it through a command queue plus an inproc wake-up socket, and read results from
# per-session event queues.


@_dataclasses.dataclass
class _WorkerState:
    """What the host knows about one worker."""

    wid: WorkerID
    name: str
    device: str
    device_name: str
    memory: int  # bytes the worker could allocate when it joined
    pid: int
    joined_at: float
    last_seen: float
    incarnation: str = ""  # changes when the worker process restarts (its caches are then gone)
    lost_at: float | None = None  # time.monotonic() when the host declared it dead, left or failed
    lost_why: str | None = None
    state: str = "joined"  # joined -> loading -> ready (or standby); dead, left or failed at the end
    layers: tuple[int, int] | None = None
    epoch: int = -1
    rtt_ms: float | None = None
    rss_before: int | None = None
    rss_after: int | None = None
    load_s: float | None = None
    steps: int = 0
    compute_ms: float | None = None  # median time of its last steps' compute, as it reports
    overhead_ms: float | None = None  # median step round trip minus compute: network + protocol
    files: list[str] = _dataclasses.field(default_factory=list)  # weight files it read
    error: str | None = None

    _timings: _collections.deque = _dataclasses.field(default_factory=lambda: _collections.deque(maxlen=128))

    @property
    def alive(self) -> bool:
        return self.state not in ("dead", "left", "failed", "kicked")

    @property
    def serving(self) -> bool:
        """Whether steps may be sent to it (a leaving worker serves until its successor is warm)."""
        return self.state in ("ready", "leaving")

    def record_step(self, round_trip_ms: float, compute_ms: float) -> None:
        self._timings.append((round_trip_ms - compute_ms, compute_ms))
        if len(self._timings) % 8 == 1:  # medians are cheap but not free: refresh every 8 steps
            self.overhead_ms = _median(t[0] for t in self._timings)
            self.compute_ms = _median(t[1] for t in self._timings)

    def public(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in _dataclasses.fields(self) if not f.name.startswith("_")}
        d.pop("wid")
        return d


@_dataclasses.dataclass
class _Step:
    """One step in the pipe: positions start..start+n-1 of a session through one stage."""

    number: int  # the session's step counter when it entered stage 0
    stage: int
    start: int
    n: int
    hidden: torch.Tensor  # the input, kept to re-send should every target fail
    targets: set[WorkerID] = _dataclasses.field(default_factory=set)  # replicas that still owe an answer
    sent_at: float = 0.0
    answered: bool = False
    first: torch.Tensor | None = None  # the answer used, kept to compare replicas' answers with

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.number, self.stage, self.start)


def _step_key(msg: Message) -> tuple[int, int, int]:
    return (msg.get("step", int, -1), msg.get("stage", int, -1), msg.get("start", int, -1))


@_dataclasses.dataclass(eq=False)
class _Session:
    """One request: its tokens, sampling parameters, and where its next step stands.

    Recovery state lives here, per session, not per server: which workers hold this
    session's cache on each stage, and the inputs already sent into each stage.
    """

    sid: SessionID
    tokens: list[int]
    prompt_len: int
    params: SamplingParams
    events: _queue.Queue
    created: float
    pos: int = 0  # tokens whose keys and values every stage holds
    step: int = 0  # steps started so far (answers must echo it)
    inflight: _Step | None = None  # the step in the pipe that nobody has answered yet
    steps: dict = _dataclasses.field(default_factory=dict)  # key -> _Step still owed an answer by someone
    holders: dict[int, set[WorkerID]] = _dataclasses.field(default_factory=dict)  # stage -> workers with its cache
    history: dict[int, list[torch.Tensor]] | None = _dataclasses.field(default_factory=dict)  # stage -> inputs
    history_bytes: int = 0
    errors: int = 0  # steps a worker ran and failed (not counting lost workers)
    waiting_since: float = 0.0

    @property
    def new_tokens(self) -> int:
        return len(self.tokens) - self.prompt_len


def plan_layers(n_layers: int, capacities: Sequence[tuple[WorkerID, int]], *,
                max_stages: int | None = None, replicas: int = 1) -> list[Stage] | None:
    """Split layers 0..n_layers-1 into contiguous stages of `replicas` workers each.

    `capacities` lists (worker, most layers it can hold) in preference order. Layers
    are spread evenly; a stage with too little room gets what it can hold and the
    rest moves to the others. Workers left over are standbys. Returns None when the
    workers cannot hold the model.
    """
    chosen = [(w, c) for w, c in capacities if c > 0]
    if not chosen:
        return None
    r = min(replicas, len(chosen))
    n_stages = min(len(chosen) // r, max_stages or n_layers, n_layers)
    groups = [chosen[i * r:(i + 1) * r] for i in range(n_stages)]
    room = [min(c for _, c in g) for g in groups]
    if sum(room) < n_layers:
        return None
    shares = [0] * n_stages
    left = n_layers
    while left:  # water-filling: each round gives every stage with room an equal part
        open_ = [i for i in range(n_stages) if shares[i] < room[i]]
        part = max(1, left // len(open_))
        for i in open_:
            give = min(part, room[i] - shares[i], left)
            shares[i] += give
            left -= give
            if not left:
                break
    stages, start = [], 0
    for group, share in zip(groups, shares):
        if share:
            stages.append(Stage(start, start + share, [w for w, _ in group]))
            start += share
    return stages


class Cluster:
    """The host side of a distllm cluster: membership, layer placement, sessions and the API."""

    def __init__(self, model: str, config: Config | None = None):
        self.config = config or Config()
        self.model = model
        self.files = _ModelFiles(_resolve_model(model), revision=self.config.revision, token=self.config.token,
                                 endpoint=self.config.hub_endpoint)
        self.model_config = _load_config(self.files)
        self.n_layers = int(self.model_config.num_hidden_layers)
        self.device = _default_device()
        self.dtype = _compute_dtype(self.model_config, self.config.dtype, self.device)
        self.head = HostHead(self.files, self.model_config, dtype=self.dtype, device=self.device)
        self.tokenizer = self.head.tokenizer
        self._fingerprint = _fingerprint(self.files)
        self._layer_bytes = _layer_bytes(self.model_config, self.config.quant, self.dtype)

        self._tunnel = _make_tunnel(self.config.tunnel)  # a bad spec fails before anything is bound
        self._ctx = zmq.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        _set_limits(self._router, self.config)
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self._auth = None
        join_keys: tuple[str | None, str | None, str | None] = (None, None, None)
        if self.config.secure:
            join_keys = self._setup_curve()
        else:
            _log.warning("secure=False: traffic is plain TCP and anyone who reaches the port can join")
        address = f"tcp://{self.config.bind}"
        if self.config.port:
            self._router.bind(f"{address}:{self.config.port}")
            port = self.config.port
        else:
            port = self._router.bind_to_random_port(address)
        self.port = port
        if self._tunnel is not None:
            try:
                public_host, public_port = self._tunnel.open(port)
            except BaseException:
                self._router.close(0)
                if self._auth is not None:
                    self._auth.stop()
                self._ctx.term()
                raise
            endpoint = f"tcp://{public_host}:{public_port}"
        else:
            endpoint = f"tcp://{_advertised_host(self.config)}:{port}"
        self.join_string = JoinInfo(endpoint, *join_keys).encode()

        self._commands: _queue.Queue = _queue.Queue()
        self._wake_addr = f"inproc://distllm-wake-{_uuid.uuid4().hex}"
        self._wake_in = self._ctx.socket(zmq.PULL)
        self._wake_in.bind(self._wake_addr)
        self._wake_out = self._ctx.socket(zmq.PUSH)
        self._wake_out.connect(self._wake_addr)
        self._wake_lock = _threading.Lock()

        # State below is owned by the I/O thread; other threads read the snapshots.
        self._workers: dict[WorkerID, _WorkerState] = {}
        self._plan: list[Stage] | None = None
        self._epoch = 0  # counts assignments; a worker's answers must carry the epoch of its own
        self._sessions: dict[SessionID, _Session] = {}
        self._runnable: _collections.deque[_Session] = _collections.deque()
        self._history_bytes = 0  # stage inputs kept for replay, all sessions
        self._handovers: dict[WorkerID, tuple[WorkerID, set[SessionID]]] = {}  # successor -> (leaver, behind)
        self._fds: dict[int, WorkerID] = {}  # TCP connection fd -> the worker last heard on it
        self._banned: set[WorkerID] = set()  # kicked workers' identities
        self._draining: dict[SessionID, _Session] = {}  # finished, with replicas' answers still due
        self._disconnected: dict[WorkerID, float] = {}  # worker -> when its connection closed
        self._status = "waiting for workers"
        self._snapshot: tuple[list[dict], list[tuple[int, int, str]]] = ([], [])
        self._ready = _threading.Event()
        self._closed = _threading.Event()
        self._local_procs: list[Any] = []
        self._stats = {"tokens": 0, "steps": 0, "failures": 0, "replays": 0, "warmups": 0, "restarts": 0}
        self._thread = _threading.Thread(target=self._loop, name="distllm-coordinator", daemon=True)
        self._thread.start()

    # -- setup ----------------------------------------------------------------

    def _setup_curve(self) -> tuple[str, str, str]:
        from zmq.auth.thread import ThreadAuthenticator

        server_public, server_secret = zmq.curve_keypair()
        client_public, client_secret = zmq.curve_keypair()
        self._allowed_keys = {client_public}
        self._auth = ThreadAuthenticator(self._ctx)
        self._auth.start()
        self._auth.configure_curve_callback(domain="*", credentials_provider=self)
        self._router.curve_server = True
        self._router.curve_publickey = server_public
        self._router.curve_secretkey = server_secret
        return server_public.decode(), client_public.decode(), client_secret.decode()

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP credentials check: admit only the client key of this cluster's join string."""
        admitted = key in self._allowed_keys  # pyzmq passes the key Z85-encoded
        if not admitted:
            _log.warning("refused a worker with an unknown key (wrong or old join string)")
        return admitted

    # -- public API -----------------------------------------------------------

    def generate(self, prompt: str | Sequence[int], *, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 timeout: float | None = None) -> str | list[int]:
        """Complete `prompt`; return the completion as text, or as token ids for a token-id prompt."""
        pieces = self.stream(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             top_k=top_k, seed=seed, timeout=timeout)
        if isinstance(prompt, str):
            return "".join(pieces)
        return list(pieces)

    def stream(self, prompt: str | Sequence[int], *, max_new_tokens: int = 64, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
               timeout: float | None = None) -> Iterator:
        """Yield the completion as it is made: text pieces, or token ids for a token-id prompt."""
        session = self._new_session(prompt, SamplingParams(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            seed=_secure_seed() if seed is None else int(seed)))
        text = _TextStream(self.tokenizer, session.tokens) if isinstance(prompt, str) else None
        return self._events(session, text, timeout)

    def workers(self) -> list[dict]:
        """Return a snapshot of every worker the host knows (name, state, layers, memory, ...)."""
        return [dict(w) for w in self._snapshot[0]]

    def layer_map(self) -> list[tuple[int, int, str]]:
        """Return the current plan as (first layer, last layer, worker name) triples."""
        return list(self._snapshot[1])

    @property
    def status(self) -> str:
        """One line saying what the cluster is doing or waiting for."""
        return self._status

    def stats(self) -> dict:
        """Return counters since start.

        tokens and steps served; failures (workers lost); replays (a stage's cache rebuilt
        while its session waited); warmups (a cache rebuilt on a worker joining a stage,
        ahead of need); restarts (sessions prefilled again from position 0).
        """
        return dict(self._stats)

    def _history_bytes_per_token(self) -> float:
        """Host memory kept for replay per token of context: hidden size x dtype x stage boundaries."""
        stages = len(self._plan or ()) or 1
        return self.model_config.hidden_size * self.dtype.itemsize * (stages - 1)

    def rotate_keys(self) -> str:
        """Issue a new join string; the old one is refused from now on. Returns the new string.

        Workers already connected keep serving; one whose connection drops must rejoin
        with the new string.
        """
        if not self.config.secure:
            raise DistllmError("rotate_keys() needs secure=True: a plain cluster has no keys")
        public, secret = zmq.curve_keypair()
        info = JoinInfo.parse(self.join_string)
        self._allowed_keys = {public}  # read by the authenticator thread; one atomic swap
        self.join_string = JoinInfo(info.endpoint, info.server_key, public.decode(), secret.decode()).encode()
        _log.info("join keys rotated: the previous join string is refused from now on")
        return self.join_string

    def kick(self, worker: str) -> None:
        """Remove the worker named `worker`; its layers move on as if it had failed.

        It is told to stop and may not rejoin under the same identity; to keep out a
        machine that still has the join string, also call rotate_keys().
        """
        names = [w["name"] for w in self.workers()]
        if worker not in names:
            raise KeyError(f"no worker named {worker!r}; workers: {', '.join(names)}")
        self._command("kick", worker)

    def spawn_local(self, n: int = 1) -> list:
        """Start `n` more worker processes on this machine that join this cluster; return them.

        They are `multiprocessing` processes (`.pid`, `.kill()`), named local-0, local-1, ...
        """
        return _spawn_local_workers(self, n)

    @property
    def local_processes(self) -> list:
        """The worker processes this cluster started on this machine, dead or alive."""
        return list(self._local_procs)

    def wait_ready(self, timeout: float | None = None) -> "Cluster":
        """Block until every layer is held by a ready worker; raise ClusterNotReadyError on timeout."""
        wait = self.config.wait_timeout_s if timeout is None else timeout
        if not self._ready.wait(wait):
            raise ClusterNotReadyError(f"no complete pipeline after {wait:.0f} s: {self._status}")
        return self

    def close(self) -> None:
        """Stop the cluster: tell workers to stop, end sessions, close sockets."""
        if self._closed.is_set():
            return
        self._command("stop", None)
        self._thread.join(10.0)
        for p in self._local_procs:
            p.join(5.0)
            if p.is_alive():
                p.kill()
                p.join(5.0)
        if self._auth is not None:
            self._auth.stop()
        if self._tunnel is not None:
            self._tunnel.close()
        self._ctx.term()

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        workers, plan = self._snapshot
        return (f"<distllm.Cluster {self.model!r} {self.n_layers} layers, {len(workers)} workers, "
                f"{len(plan)} stages: {self._status}>")

    # -- API-side helpers -----------------------------------------------------

    def _new_session(self, prompt: str | Sequence[int], params: SamplingParams) -> _Session:
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        else:
            ids = [int(t) for t in prompt]
            vocab = self.model_config.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise RequestError(f"token ids {bad[:5]} outside the vocabulary of {vocab}")
        if not ids:
            raise RequestError("empty prompt: give at least one token")
        if len(ids) >= self.head.context:
            raise PromptTooLongError(
                f"prompt of {len(ids)} tokens does not fit the model's context of {self.head.context} "
                f"(leave room for at least one new token)")
        if self._closed.is_set():
            raise DistllmError("cluster is closed")
        session = _Session(_uuid.uuid4().hex[:16], ids, len(ids), params, _queue.Queue(), _time.monotonic())
        self._command("submit", session)
        return session

    def _events(self, session: _Session, text: _TextStream | None, timeout: float | None) -> Iterator:
        finished = False
        try:
            while True:
                try:
                    kind, value = session.events.get(timeout=timeout)
                except _queue.Empty:
                    raise TimeoutError(f"no token for {timeout} s; cluster: {self._status}") from None
                if kind == "token":
                    if text is None:
                        yield value
                    else:
                        piece = text.push(value)
                        if piece:
                            yield piece
                elif kind == "done":
                    finished = True
                    if text is not None:
                        tail = text.flush()
                        if tail:
                            yield tail
                    return
                else:
                    finished = True
                    raise value
        finally:
            if not finished:
                self._command("cancel", session.sid)

    def _command(self, kind: str, arg: Any) -> None:
        self._commands.put((kind, arg))
        with self._wake_lock:
            if not self._closed.is_set():
                self._wake_out.send(b"", zmq.NOBLOCK)

    # -- the I/O thread -------------------------------------------------------

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._wake_in, zmq.POLLIN)
        # TCP disconnects (a killed process's socket closes) are seen at once through a monitor;
        # each message's source fd tells which worker a closed connection belonged to.
        monitor = self._router.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        poller.register(monitor, zmq.POLLIN)
        next_beat = _time.monotonic()
        try:
            while True:
                events = dict(poller.poll(max(0, int((next_beat - _time.monotonic()) * 1000)) + 1))
                if self._router in events:
                    for _ in range(1000):  # bounded, so commands and timers get their turn
                        try:
                            frames = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        wid = frames[0].bytes
                        self._fds[frames[-1].get(zmq.SRCFD)] = wid
                        self._on_worker_message(wid, frames[1:])
                if monitor in events:
                    self._on_disconnects(monitor)
                if self._disconnected:
                    self._check_disconnected()
                if self._wake_in in events:
                    while self._wake_in.poll(0):
                        self._wake_in.recv()
                    if not self._run_commands():
                        break
                now = _time.monotonic()
                if now >= next_beat:
                    self._heartbeat(now)
                    next_beat = now + self.config.heartbeat_s
                self._schedule()
        except Exception:  # never die silently: fail every request with the reason
            _log.exception("coordinator loop failed")
            for s in list(self._sessions.values()):
                self._finish(s, error=DistllmError("coordinator loop failed; see the log"))
        finally:
            self._router.disable_monitor()
            monitor.close(0)
            self._shutdown()

    def _on_disconnects(self, monitor: zmq.Socket) -> None:
        from zmq.utils.monitor import recv_monitor_message

        while monitor.poll(0):
            event = recv_monitor_message(monitor)
            wid = self._fds.pop(int(event["value"]), None)
            w = self._workers.get(wid) if wid is not None else None
            if w is not None and w.alive:
                _log.info("connection of worker %s closed; it has %.1f s to come back", w.name,
                          self.config.reconnect_grace_s)
                self._disconnected[wid] = _time.monotonic()

    def _check_disconnected(self) -> None:
        """Declare dead a worker whose connection closed and that did not reconnect within the grace."""
        now = _time.monotonic()
        for wid, since in list(self._disconnected.items()):
            w = self._workers[wid]
            if not w.alive or w.last_seen > since:  # gone already, or back (a reconnect after a blip)
                del self._disconnected[wid]
            elif now - since > self._grace(w):
                del self._disconnected[wid]
                self._lose_worker(w, f"its connection closed and it did not reconnect within {self._grace(w):.1f} s")

    def _grace(self, w: _WorkerState) -> float:
        """Seconds to wait for a reconnect: the configured floor, or enough for TCP and CURVE handshakes."""
        return max(self.config.reconnect_grace_s, 0.1 + 4e-3 * (w.rtt_ms or 0.0))

    def _shutdown(self) -> None:
        for wid in list(self._workers):
            self._send(wid, "shutdown", {})
        for s in list(self._sessions.values()):
            self._finish(s, error=DistllmError("cluster closed"))
        with self._wake_lock:
            self._closed.set()
            self._wake_out.close(0)
        self._wake_in.close(0)
        self._router.close(linger=500)  # lets the shutdown messages out

    def _run_commands(self) -> bool:
        while True:
            try:
                kind, arg = self._commands.get_nowait()
            except _queue.Empty:
                return True
            if kind == "stop":
                return False
            if kind == "submit":
                self._sessions[arg.sid] = arg
                if arg.params.max_new_tokens == 0:
                    self._finish(arg)
                else:
                    self._park(arg, self._status)
            elif kind == "cancel":
                s = self._sessions.get(arg)
                if s is not None:
                    self._finish(s)
            elif kind == "kick":
                for w in [w for w in self._workers.values() if w.name == arg and w.alive]:
                    self._banned.add(w.wid)
                    self._send(w.wid, "error", {"code": "kicked", "message": "kicked by the host"})
                    self._lose_worker(w, "kicked by the host", state="kicked")

    def _send(self, wid: WorkerID, msg_type: str, header: dict, tensors: Sequence = ()) -> bool:
        try:
            self._router.send_multipart([wid, *encode(msg_type, header, tensors)], copy=False)
            return True
        except zmq.ZMQError as exc:  # EHOSTUNREACH under ROUTER_MANDATORY: the peer is gone
            _log.info("could not send %s to %r: %s", msg_type, wid, exc)
            return False

    def _on_worker_message(self, wid: WorkerID, frames: list) -> None:
        try:
            msg = decode(frames, allowed=_WORKER_TO_HOST, max_elements=self.config.max_message_bytes // 2)
            worker = self._workers.get(wid)
            if worker is not None:
                worker.last_seen = _time.monotonic()
            if msg.type == "join":
                self._on_join(wid, msg)
            elif worker is None or not worker.alive:
                # Unknown, or declared dead and back: its state is void; it must join afresh.
                if msg.type != "leave":
                    self._send(wid, "error", {"code": "rejoin", "message": "not a member: join again"})
            else:
                getattr(self, f"_on_{msg.type}")(worker, msg)
        except ProtocolError as exc:
            _log.warning("dropped a message from %r: %s", wid, exc)
        except Exception:  # a message must never take the host down; this is a bug, said loudly
            _log.exception("failed to handle a message from %r; it was dropped", wid)

    def _on_join(self, wid: WorkerID, msg: Message) -> None:
        if wid in self._banned:
            self._send(wid, "error", {"code": "kicked", "message": "this worker was kicked"})
            return
        now = _time.monotonic()
        incarnation = msg.get("incarnation", str, "")[:64]
        old = self._workers.get(wid)
        if old is not None and old.alive:
            if old.incarnation == incarnation:  # it lost touch for a while but kept its state
                self._send(wid, "welcome", {"heartbeat_s": self.config.heartbeat_s,
                                            "liveness_s": self.config.liveness_s})
                return
            self._lose_worker(old, "it joined again with a new incarnation (restarted, state lost)")
        w = _WorkerState(
            wid=wid, name=msg.get("name", str)[:64], device=msg.get("device", str)[:32],
            device_name=msg.get("device_name", str, "")[:64], memory=msg.get("memory", int),
            pid=msg.get("pid", int, 0), joined_at=now, last_seen=now, incarnation=incarnation)
        self._workers[wid] = w
        self._send(wid, "welcome", {"heartbeat_s": self.config.heartbeat_s, "liveness_s": self.config.liveness_s,
                                    "quant": self.config.quant})
        _log.info("worker %s joined (%s, %.1f GB free)", w.name, w.device_name or w.device, w.memory / 1e9)
        self._place()

    def _on_ready(self, worker: _WorkerState, msg: Message) -> None:
        if msg.get("epoch", int) != worker.epoch or worker.state != "loading":
            return  # an answer to an older assignment
        worker.state = "ready"
        worker.rss_before, worker.rss_after = msg.get("rss_before", int), msg.get("rss_after", int)
        worker.load_s = msg.get("load_s", (int, float))
        worker.files = [f for f in msg.get("files", list, []) if isinstance(f, str)][:1000]
        _log.info("worker %s ready with layers %d..%d", worker.name, worker.layers[0], worker.layers[1] - 1)
        warmed = self._warm(worker) if self._sessions else set()
        if worker.wid in self._handovers:  # it succeeds a leaving worker: wait until it caught up
            self._handovers[worker.wid] = (self._handovers[worker.wid][0], warmed)
            self._check_handover(worker)
        self._update_readiness()

    def _check_handover(self, worker: _WorkerState) -> None:
        """Let the leaving worker go once its successor has caught up with every session."""
        leaver, behind = self._handovers[worker.wid]
        behind &= set(self._sessions)
        if not behind and worker.state == "ready":
            del self._handovers[worker.wid]
            if self._workers[leaver].alive:
                self._release(self._workers[leaver])

    def _on_failed(self, worker: _WorkerState, msg: Message) -> None:
        worker.error = msg.get("message", str, "")[:2000]
        _log.error("worker %s could not load its layers: %s", worker.name, worker.error)
        self._lose_worker(worker, f"loading failed: {worker.error}", state="failed")

    def _on_leave(self, worker: _WorkerState, msg: Message) -> None:
        """Hand a leaving worker's layers to a standby before letting it go (make before break)."""
        stage = next((s for s in self._plan or () if worker.wid in s.workers), None)
        others = [w for w in (stage.workers if stage else ()) if w != worker.wid and self._workers[w].serving]
        standby = next((w for w in self._live() if w.state == "standby"
                        and stage is not None and self._capacity(w) >= stage.layers), None)
        if not msg.get("drain", bool, False) or stage is None or others or standby is None:
            self._release(worker)
            return
        _log.info("worker %s is leaving: handing layers %d..%d to %s", worker.name, stage.start,
                  stage.end - 1, standby.name)
        worker.state = "leaving"  # still serving until the standby is warm
        stage.workers.append(standby.wid)
        self._assign(standby, stage.start, stage.end)
        self._handovers[standby.wid] = (worker.wid, set())

    def _release(self, worker: _WorkerState) -> None:
        self._send(worker.wid, "shutdown", {})
        self._lose_worker(worker, "it left", state="left")

    def _warm(self, worker: _WorkerState) -> set[SessionID]:
        """Rebuild every live session's cache on a worker that joined a stage mid-run.

        It becomes a target of the sessions' next steps at once: it runs its messages in
        order, so it answers them after the rebuild, while its replicas answer first.
        """
        k = next(i for i, s in enumerate(self._plan) if worker.wid in s.workers)
        warmed = set()
        for session in self._sessions.values():
            if not session.pos and session.inflight is None:
                continue  # not started: its first step goes to every ready replica anyway
            if self._rebuild(session, k, None, {worker.wid}):
                session.holders.setdefault(k, set()).add(worker.wid)
                warmed.add(session.sid)
                self._stats["warmups"] += 1
        return warmed

    def _rebuild(self, session: _Session, stage: int, upto: int | None, wids: set[WorkerID]) -> bool:
        """Send `wids` the inputs of `stage` for positions 0..upto-1 (None: all sent so far).

        Stage 0's inputs are re-embedded from the tokens; later stages' are the ones kept
        when they were sent. The messages carry step -1: nobody waits for their answers,
        since each worker runs its messages in order and so finishes the rebuild before
        any step sent after it. Returns False when the inputs are gone (history dropped).
        """
        if stage == 0:
            step = session.inflight
            covered = step.start + step.n if step is not None else session.pos
            inputs = self.head.embed_tokens(session.tokens[:covered if upto is None else upto])
        else:
            chunks = (session.history or {}).get(stage, [])
            if session.history is None or sum(c.shape[1] for c in chunks) < (upto or 0):
                return False
            inputs = torch.cat(chunks, dim=1)[:, :upto] if chunks else None
        if inputs is None or inputs.shape[1] == 0:
            return upto in (None, 0)
        for wid in wids:
            w = self._workers[wid]
            for at in range(0, inputs.shape[1], self.config.prefill_chunk):
                chunk = inputs[:, at:at + self.config.prefill_chunk]
                self._send(wid, "forward", {"epoch": w.epoch, "sid": session.sid, "step": -1, "stage": stage,
                                            "start": at}, [chunk])
        return True

    def _on_pong(self, worker: _WorkerState, msg: Message) -> None:
        sent = msg.get("t", (int, float), None)
        if sent is not None:
            worker.rtt_ms = (_time.monotonic() - sent) * 1e3

    def _on_ping(self, worker: _WorkerState, msg: Message) -> None:
        self._send(worker.wid, "pong", {"t": msg.get("t", (int, float), 0)})

    def _on_error(self, worker: _WorkerState, msg: Message) -> None:
        text = msg.get("message", str, "")[:2000]
        session = self._sessions.get(msg.get("sid", str, ""))
        step = session.steps.get(_step_key(msg)) if session is not None else None
        if step is not None and worker.wid in step.targets:
            self._step_error(session, step, worker, msg.get("code", str, ""), text)
        else:
            _log.warning("worker %s reports: %s", worker.name, text)

    def _step_error(self, session: _Session, step: _Step, worker: _WorkerState, code: str, text: str) -> None:
        """A worker could not give a usable answer: it no longer holds the session; try elsewhere.

        A lost or evicted cache (codes "order", "stale") is repaired by replay; breakage
        ("failed", "protocol": an exception, NaN, a wrong shape) that repeats fails the request.
        """
        _log.warning("worker %s gave no usable answer for a step of %s: %s", worker.name, session.sid, text)
        if code in ("failed", "protocol"):
            session.errors += 1
            if session.errors > self.config.max_step_errors:
                self._finish(session, error=StepFailedError(
                    f"steps failed {session.errors} times; last, on worker {worker.name}: {text}"))
                return
        session.holders.get(step.stage, set()).discard(worker.wid)
        self._drop_target(session, step, worker.wid)

    def _drop_target(self, session: _Session, step: _Step, wid: WorkerID) -> None:
        """Forget that `wid` owes an answer to `step`; re-send the step if nobody else does."""
        step.targets.discard(wid)
        if not step.targets:
            session.steps.pop(step.key, None)
            if not step.answered and session.inflight is step:
                self._retry(session)

    # -- steps ----------------------------------------------------------------

    def _on_result(self, worker: _WorkerState, msg: Message) -> None:
        sid = msg.get("sid", str)
        session = self._sessions.get(sid) or self._draining.get(sid)
        step = session.steps.get(_step_key(msg)) if session is not None else None
        if step is None or msg.get("epoch", int) != worker.epoch or worker.wid not in step.targets:
            return  # a late answer: the session ended or moved on, or the worker was replaced
        n = step.n
        try:
            hidden = msg.tensor(0)
            _check_hidden(hidden, self.model_config.hidden_size, f"result from {worker.name}")
            if hidden.shape[1] != n:
                raise ProtocolError(f"result for {hidden.shape[1]} positions, the step had {n}")
        except ProtocolError as exc:
            self._step_error(session, step, worker, "protocol", str(exc))
            return
        worker.steps += 1
        worker.record_step((_time.perf_counter() - step.sent_at) * 1e3, msg.get("compute_ms", (int, float), 0.0))
        if worker.wid in self._handovers:
            self._handovers[worker.wid][1].discard(session.sid)
            self._check_handover(worker)
        if step.answered:  # a replica's late answer: check it agrees with the one we used
            self._check_agreement(step, worker, hidden)
            self._drop_target(session, step, worker.wid)
            if not session.steps:
                self._draining.pop(session.sid, None)
            return
        step.answered = True
        step.targets.discard(worker.wid)
        self._stats["steps"] += 1
        if step.targets:  # other replicas still working on it: keep the answer to compare
            step.first = hidden
        else:
            session.steps.pop(step.key, None)
        session.inflight = None
        session.holders[step.stage] = {worker.wid} | step.targets
        last = step.stage + 1 == len(self._plan)
        if not last:
            self._remember(session, step.stage + 1, step.start, hidden)
            self._send_step(session, step.stage + 1, step.start, hidden)
            return
        session.pos = step.start + n
        if session.pos < len(session.tokens):  # more of the prompt (or of a full replay) to prefill
            self._runnable.appendleft(session)
            return
        token = sample(self.head.logits(hidden[0, -1]), session.params, session.pos)
        session.tokens.append(token)
        self._stats["tokens"] += 1
        session.events.put(("token", token))
        if (token in self.head.eos_ids or session.new_tokens >= session.params.max_new_tokens
                or len(session.tokens) >= self.head.context):
            self._finish(session)
        else:
            self._runnable.append(session)

    def _check_agreement(self, step: _Step, worker: _WorkerState, hidden: torch.Tensor) -> None:
        other, first = hidden.float(), step.first.float()
        error = float((other - first).norm() / first.norm().clamp_min(1e-12))
        if error > self.config.replica_tolerance:
            # Dropped for good: a node computing wrong numbers must not rejoin under this identity.
            self._banned.add(worker.wid)
            self._send(worker.wid, "error", {"code": "kicked", "message": "its output diverged from a replica's"})
            self._lose_worker(worker, f"its output diverged from its replica's ({error:.2e} relative)",
                              state="failed")

    def _schedule(self) -> None:
        """Start the next step of every runnable session, or time out those waiting too long."""
        if self._ready.is_set():
            for _ in range(len(self._runnable)):
                s = self._runnable.popleft()
                if s.sid in self._sessions and s.inflight is None:
                    self._next_step(s)
            return
        now = _time.monotonic()
        for s in list(self._runnable):
            if now - s.waiting_since > self.config.wait_timeout_s:
                self._runnable.remove(s)
                self._finish(s, error=ClusterNotReadyError(
                    f"waited {self.config.wait_timeout_s:.0f} s for workers to hold every layer: {self._status}"))

    def _next_step(self, session: _Session) -> None:
        if session.pos == 0:
            session.holders.clear()  # a prefill from position 0 rebuilds every cache it passes
        end = min(len(session.tokens), session.pos + self.config.prefill_chunk)
        self._send_step(session, 0, session.pos, self.head.embed_tokens(session.tokens[session.pos:end]))

    def _send_step(self, session: _Session, stage: int, start: int, hidden: torch.Tensor) -> None:
        """Send a step to every replica of `stage` that holds the session (replaying one in first)."""
        if stage == 0:
            session.step += 1
        ready = [w for w in self._plan[stage].workers if self._workers[w].serving]
        if not ready:
            self._park(session, f"no ready worker holds layers {self._plan[stage].start}.."
                                f"{self._plan[stage].end - 1}")
            return
        if start == 0:
            targets = set(ready)
        else:
            targets = session.holders.get(stage, set()) & set(ready)
            if not targets:  # this stage lost the session's cache: rebuild it on the live replicas first
                targets = set(ready)
                if not self._rebuild(session, stage, start, targets):
                    self._restart(session, "its replay history was dropped")
                    return
                self._stats["replays"] += 1
                _log.info("session %s: replaying %d positions into layers %d..%d", session.sid, start,
                          self._plan[stage].start, self._plan[stage].end - 1)
        self._dispatch(session, _Step(session.step, stage, start, hidden.shape[1], hidden), targets)

    def _dispatch(self, session: _Session, step: _Step, targets: set[WorkerID]) -> None:
        session.inflight = step
        session.steps[step.key] = step
        frame = _tensor_frame(step.hidden)
        raw = (_DTYPE_NAMES[step.hidden.dtype], list(step.hidden.shape), frame)
        unreachable = []
        for wid in targets:
            header = {"epoch": self._workers[wid].epoch, "sid": session.sid, "step": session.step,
                      "stage": step.stage, "start": step.start}
            if self._send(wid, "forward", header, [raw]):
                step.targets.add(wid)
            else:
                unreachable.append(wid)
        step.sent_at = _time.perf_counter()
        if not step.targets:
            session.steps.pop(step.key, None)
        for wid in unreachable:  # ZeroMQ knows its connection is gone: no need to wait for silence
            self._lose_worker(self._workers[wid], "its connection closed")
        if not step.targets and session.inflight is step and session.sid in self._sessions:
            self._retry(session)  # unless a re-plan already restarted the session

    def _remember(self, session: _Session, stage: int, start: int, hidden: torch.Tensor) -> None:
        """Keep the input of `stage` for positions start.., for replay should the stage fail."""
        if session.history is None:
            return
        chunks = session.history.setdefault(stage, [])
        covered = sum(c.shape[1] for c in chunks)
        if covered > start:  # a re-sent step: its input is already kept
            return
        if covered < start:  # a gap: these inputs can no longer rebuild the stage
            self._forget(session, keep=False)
            return
        chunks.append(hidden)
        size = hidden.numel() * hidden.element_size()
        session.history_bytes += size
        self._history_bytes += size
        while self._history_bytes > self.config.history_mb * 2**20:
            victim = min((s for s in self._sessions.values() if s.history), key=lambda s: s.created, default=None)
            if victim is None:
                break
            _log.info("dropped the replay history of session %s (over history_mb=%d)", victim.sid,
                      self.config.history_mb)
            self._forget(victim, keep=False)

    def _forget(self, session: _Session, keep: bool = True) -> None:
        self._history_bytes -= session.history_bytes
        session.history_bytes = 0
        session.history = {} if keep else None

    def _retry(self, session: _Session) -> None:
        """Re-send the session's step in the pipe after its targets failed."""
        step = session.inflight
        session.inflight = None
        if self._plan is None:
            self._park(session, "re-planning")
        else:
            if step.stage == 0:
                session.step -= 1  # _send_step counts it again
            self._send_step(session, step.stage, step.start, step.hidden)

    def _restart(self, session: _Session, why: str) -> None:
        """Prefill the session again from position 0: every stage rebuilds its cache."""
        _log.info("session %s: prefilling again from position 0 (%s)", session.sid, why)
        session.inflight = None
        session.steps.clear()  # answers to earlier steps are void now
        session.pos = 0
        session.holders.clear()
        self._stats["restarts"] += 1
        self._forget(session)
        self._park(session, why)

    def _park(self, session: _Session, why: str) -> None:
        """Put a session back in line to run when a complete pipeline is ready."""
        session.inflight = None
        session.waiting_since = _time.monotonic()
        if session not in self._runnable:
            self._runnable.append(session)
        if not self._ready.is_set():
            self._status = why if why.startswith("waiting") else f"waiting: {why}"

    def _finish(self, session: _Session, error: BaseException | None = None) -> None:
        if self._sessions.pop(session.sid, None) is None:
            return
        session.inflight = None
        if any(step.answered for step in session.steps.values()):
            # Replicas still owe answers to steps already used: keep them to check agreement.
            session.steps = {k: st for k, st in session.steps.items() if st.answered}
            self._draining[session.sid] = session
            while len(self._draining) > 1000:
                self._draining.pop(next(iter(self._draining)))
        self._forget(session, keep=False)
        for wid in set().union(*session.holders.values()) if session.holders else ():
            if wid in self._workers and self._workers[wid].alive:
                self._send(wid, "end", {"sid": session.sid})
        session.events.put(("error", error) if error is not None else ("done", None))
        for successor in list(self._handovers):
            self._check_handover(self._workers[successor])

    # -- membership and placement ---------------------------------------------

    def _heartbeat(self, now: float) -> None:
        for w in list(self._workers.values()):
            if not w.alive:
                continue
            if now - w.last_seen > self.config.liveness_s:
                self._lose_worker(w, f"silent for {now - w.last_seen:.1f} s", state="dead")
            else:
                self._send(w.wid, "ping", {"t": now})
        clock = _time.perf_counter()
        for s in list(self._sessions.values()):
            for step in list(s.steps.values()):
                for wid in list(step.targets):
                    w = self._workers[wid]
                    # The floor, or far more than this worker's usual compute for a step this size.
                    deadline = max(self.config.step_timeout_s, 20e-3 * (w.compute_ms or 0) * step.n)
                    if clock - step.sent_at > deadline and w.alive:
                        self._lose_worker(w, f"a step took over {deadline:.1f} s (stuck)", state="dead")
        self._publish()

    def _lose_worker(self, worker: _WorkerState, why: str, state: str = "dead") -> None:
        """Drop a worker; sessions move on to its replicas, a standby, or a new plan."""
        if not worker.alive:
            return
        worker.state, worker.lost_at, worker.lost_why = state, _time.monotonic(), why
        _log.warning("worker %s lost: %s", worker.name, why)
        self._stats["failures"] += 1
        for stage in self._plan or ():
            if worker.wid in stage.workers:
                stage.workers.remove(worker.wid)
        for s in self._sessions.values():
            for holders in s.holders.values():
                holders.discard(worker.wid)
        self._place()
        for s in list(self._sessions.values()):
            for step in list(s.steps.values()):
                if worker.wid in step.targets:
                    self._drop_target(s, step, worker.wid)

    def _live(self) -> list[_WorkerState]:
        return [w for w in self._workers.values() if w.alive]

    def _assign(self, worker: _WorkerState, start: int, end: int) -> None:
        self._epoch += 1
        worker.state, worker.layers, worker.epoch = "loading", (start, end), self._epoch
        self._send(worker.wid, "assign", {
            "epoch": self._epoch, "model": self.model, "revision": self.files.revision,
            "endpoint": self.config.hub_endpoint, "start": start, "end": end, "quant": self.config.quant,
            "dtype": _DTYPE_NAMES[self.dtype], "fingerprint": self._fingerprint})

    def _capacity(self, w: _WorkerState) -> int:
        return int(w.memory * self.config.memory_fraction) // max(1, self._layer_bytes)

    def _place(self) -> None:
        """Keep every layer range served: refill stages from standbys, re-plan only when a range is orphaned."""
        live = self._live()
        if self._plan is not None:
            standbys = [w for w in live if w.layers is None]
            for stage in self._plan:
                want = self.config.replicas - len(stage.workers)
                for w in [w for w in standbys if self._capacity(w) >= stage.layers][:max(0, want)]:
                    standbys.remove(w)
                    stage.workers.append(w.wid)
                    self._assign(w, stage.start, stage.end)
            for w in standbys:
                w.state = "standby"
            if all(stage.workers for stage in self._plan):
                self._update_readiness()
                return
            orphaned = [s for s in self._plan if not s.workers]
            _log.warning("layers %s have no worker left: re-planning over %d workers",
                         ", ".join(f"{s.start}..{s.end - 1}" for s in orphaned), len(live))
        if len(live) < (self.config.workers if self._epoch == 0 else 1):  # `workers` gates the first plan
            self._status = f"waiting for workers: {len(live)} of {self.config.workers} joined"
            self._drop_plan()
            return
        plan = plan_layers(self.n_layers, [(w.wid, self._capacity(w)) for w in live],
                           max_stages=self.config.max_stages, replicas=self.config.replicas)
        if plan is None:
            room = sum(self._capacity(w) for w in live)
            self._drop_plan()
            self._status = (f"waiting for memory: {len(live)} workers hold {room} of {self.n_layers} layers "
                            f"({self._layer_bytes / 1e6:.0f} MB each)")
            return
        old = {(s.start, s.end) for s in self._plan or ()}
        self._plan = plan
        self._ready.clear()
        in_plan = {wid for s in plan for wid in s.workers}
        for w in live:
            if w.wid not in in_plan:
                w.layers, w.state = None, "standby"
        for stage in plan:
            for wid in stage.workers:
                self._assign(self._workers[wid], stage.start, stage.end)
        if {(s.start, s.end) for s in plan} != old:  # stage boundaries moved: kept inputs no longer fit
            self._restart_all("the layers were re-planned")
        self._status = f"loading layers on {sum(len(s.workers) for s in plan)} workers"
        self._publish()

    def _restart_all(self, why: str) -> None:
        for s in list(self._sessions.values()):
            if s.pos or s.inflight is not None:
                self._restart(s, why)

    def _drop_plan(self) -> None:
        if self._plan is not None:
            self._restart_all("too few workers for a complete pipeline")
        self._plan = None
        self._ready.clear()
        self._publish()

    def _update_readiness(self) -> None:
        complete = self._plan is not None and all(any(self._workers[w].serving for w in s.workers)
                                                  for s in self._plan)
        if complete and not self._ready.is_set():
            self._status = f"ready: {len(self._plan)} stages"
            self._ready.set()
        elif not complete:
            self._ready.clear()
        self._publish()

    def _publish(self) -> None:
        """Refresh the snapshots that other threads read (atomic swap, no lock needed)."""
        workers = [w.public() for w in self._workers.values()]
        plan = [(s.start, s.end - 1, ", ".join(self._workers[w].name for w in s.workers))
                for s in (self._plan or [])]
        self._snapshot = (workers, plan)


def _median(values: Any) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else 0.0


def _secure_seed() -> int:
    return int.from_bytes(_os.urandom(8), "little") & ((1 << 63) - 1)


###############################################################################
# Shortcuts ###################################################################
###############################################################################


def host(model: str, *, config: Config | None = None, **options: Any) -> Cluster:
    """Start a cluster host for `model` (a Hub repo id, a local directory, or "tiny") and return at once.

    Workers join with `distllm.join(cluster.join_string)`; options are `Config` fields.
    """
    return Cluster(model, Config.build(config, **options))


def join(join_string: str, *, name: str | None = None, device: str | None = None, background: bool = False,
         config: Config | None = None, **options: Any) -> Worker:
    """Join a cluster as a worker; serve until stopped, or return the running Worker if `background`.

    Raises JoinRefusedError within seconds if the host refuses the join string (wrong,
    old or unencrypted) or does not answer within `join_timeout_s`.
    """
    worker = Worker(join_string, name=name, device=device, config=Config.build(config, **options))
    worker.start().wait_joined()
    if background:
        return worker
    try:
        worker.wait()
    except KeyboardInterrupt:
        worker.leave()
    if worker.state == "refused":
        raise JoinRefusedError(worker.error)
    return worker


def _mp_context() -> Any:
    """Return the process context for local workers: a fork server that has torch imported.

    Workers forked from it start in a fraction of a second instead of re-importing
    torch and transformers; on CUDA builds nothing touches the GPU before the fork.
    """
    if "forkserver" not in _mp.get_all_start_methods():
        return _mp.get_context("spawn")
    ctx = _mp.get_context("forkserver")
    preload = ["distllm", "transformers", "transformers.models.auto.modeling_auto", "safetensors",
               "transformers.models.llama.modeling_llama"]
    if torch.version.cuda is None:  # bitsandbytes may probe the GPU on import: only preload it on CPU builds
        preload.append("bitsandbytes")
    ctx.set_forkserver_preload(preload)
    return ctx


def _local_worker_main(join_string: str, name: str, options: dict, parent_pid: int, threads: int) -> None:
    """Entry point of a worker process started by `local()`."""
    _logging.basicConfig(level=_os.environ.get("DISTLLM_LOG", "WARNING"),
                         format=f"%(asctime)s {name} %(levelname)s %(message)s")
    torch.set_num_threads(threads)
    worker = Worker(join_string, name=name, config=Config(**options), parent_pid=parent_pid)
    _signal.signal(_signal.SIGTERM, lambda *_: worker._leaving.set())  # leave gracefully
    worker.serve()


def local(model: str = "tiny", *, workers: int = 2, config: Config | None = None, **options: Any) -> Cluster:
    """Start a host in this process and `workers` worker processes on this machine.

    Takes the same options as `host()`; returns once every layer is loaded. Use as a
    context manager, or call `close()`, to stop the workers.
    """
    cfg = Config.build(config, **{"bind": "127.0.0.1", "workers": workers, **options})
    cluster = Cluster(model, cfg)
    try:
        cluster.spawn_local(workers)
        deadline = _time.monotonic() + cfg.wait_timeout_s
        while not cluster._ready.wait(0.1):
            dead = [p for p in cluster._local_procs if p.exitcode is not None]
            if dead:
                raise ClusterNotReadyError(f"local worker {dead[0].name} exited with code {dead[0].exitcode} "
                                           f"before the cluster was ready: {cluster.status}")
            if _time.monotonic() > deadline:
                raise ClusterNotReadyError(f"no complete pipeline after {cfg.wait_timeout_s:.0f} s: "
                                           f"{cluster.status}")
    except BaseException:
        cluster.close()
        raise
    return cluster


def _spawn_local_workers(cluster: Cluster, n: int) -> list:
    ctx = _mp_context()
    cfg = cluster.config
    threads = cfg.worker_threads or max(1, (_os.cpu_count() or 1) // max(1, cfg.workers))
    procs = []
    for _ in range(n):
        i = len(cluster._local_procs)
        options = {f.name: getattr(cfg, f.name) for f in _dataclasses.fields(cfg)}
        options["tunnel"] = None  # the host's business; workers dial the join string's address
        p = ctx.Process(target=_local_worker_main, name=f"local-{i}", daemon=True,
                        args=(cluster.join_string, f"local-{i}", options, _os.getpid(), threads))
        p.start()
        cluster._local_procs.append(p)
        procs.append(p)
    return procs


###############################################################################
# Benchmarks ##################################################################
###############################################################################


def _in_process_decode(model: str, quant: str, prompt: list[int], tokens: int) -> tuple[list[int], float]:
    """Greedy-decode with every layer in this process (no network); return tokens and s/token."""
    files = _ModelFiles(_resolve_model(model))
    config = _load_config(files)
    device = _default_device()
    dtype = _compute_dtype(config, "auto", device)
    head = HostHead(files, config, dtype=dtype, device=device)
    shard = StageShard(files, config, 0, config.num_hidden_layers, quant=quant, dtype=dtype, device=device)
    params = SamplingParams(max_new_tokens=tokens)
    ids = list(prompt)
    hidden = shard.forward("bench", head.embed_tokens(ids), 0)
    ids.append(sample(head.logits(hidden[0, -1]), params, len(ids)))
    t0 = _time.perf_counter()
    for _ in range(tokens - 1):
        hidden = shard.forward("bench", head.embed_tokens(ids[-1:]), len(ids) - 1)
        ids.append(sample(head.logits(hidden[0, -1]), params, len(ids)))
    return ids[len(prompt):], (_time.perf_counter() - t0) / max(1, tokens - 1)


def bench_overhead(model: str = "tiny", *, workers: Sequence[int] = (1, 2, 3, 4), quant: str = "none",
                   tokens: int = 64, secure: bool = True, out: Any = None) -> list[dict]:
    """Measure decode ms/token with N local workers against the same layers in one process.

    "hop ms" is the median of (step round trip at the host - compute time the worker
    reports): what the network, the protocol and both event loops add per stage.
    """
    out = out or _sys.stdout
    prompt = list(range(3, 19))
    ref_tokens, ref_s = _in_process_decode(model, quant, prompt, tokens)
    rows = [{"setup": "one process", "stages": 0, "ms_per_token": ref_s * 1e3, "ratio": 1.0,
             "hop_ms": 0.0, "identical": True}]
    for n in workers:
        with local(model, workers=n, quant=quant, secure=secure) as cluster:
            stages = len(cluster.layer_map())
            cluster.generate(prompt, max_new_tokens=4)  # warm-up
            first = None
            got = []
            for tok in cluster.stream(prompt, max_new_tokens=tokens):
                got.append(tok)
                if first is None:
                    first = _time.perf_counter()
            per_token = (_time.perf_counter() - first) / max(1, len(got) - 1)
            _time.sleep(cluster.config.heartbeat_s)  # let the medians refresh
            hops = [w["overhead_ms"] for w in cluster.workers() if w["overhead_ms"] is not None]
        rows.append({"setup": f"{n} local workers", "stages": stages, "ms_per_token": per_token * 1e3,
                     "ratio": per_token / ref_s, "hop_ms": _median(hops),
                     "identical": got == ref_tokens[:len(got)]})
    print(f"model={model} quant={quant} secure={secure} tokens={tokens} device={_default_device()}", file=out)
    print(f"{'setup':<18} {'stages':>6} {'ms/token':>9} {'x 1-proc':>9} {'hop ms':>7} {'same tokens':>11}",
          file=out)
    for r in rows:
        print(f"{r['setup']:<18} {r['stages']:>6} {r['ms_per_token']:>9.2f} {r['ratio']:>9.2f} "
              f"{r['hop_ms']:>7.2f} {str(r['identical']):>11}", file=out)
    return rows


def bench_failover(model: str = "tiny", *, workers: int = 3, quant: str = "none", tokens: int = 96,
                   kill_at: int = 32, liveness_s: float = 1.0, heartbeat_s: float = 0.2, out: Any = None) -> list[dict]:
    """SIGKILL a worker mid-generation and measure detection time and the stall it causes.

    Runs three cases: no spare worker (re-plan, prefill again), a standby (replay of the
    kept inputs into it), and replicas=2 (hot failover). The stall is the longest gap
    between two tokens minus the median gap. Also reports the host memory spent on kept
    stage inputs per 1k tokens of context.
    """
    out = out or _sys.stdout
    prompt = list(range(3, 35))
    cases = [("no spare: re-plan", dict(workers=workers)),
             ("standby: replay", dict(workers=workers + 1, max_stages=workers)),
             ("replicas=2: hot", dict(workers=2 * workers - (workers > 2) * 2, replicas=2))]
    rows = []
    for label, extra in cases:
        n = extra.pop("workers")
        with local(model, workers=n, quant=quant, liveness_s=liveness_s, heartbeat_s=heartbeat_s,
                   **extra) as cluster:
            want = cluster.generate(prompt, max_new_tokens=tokens)
            at = min(kill_at, len(want) // 3)  # a random model may stop early at its end-of-text token
            victim_name = cluster.layer_map()[len(cluster.layer_map()) // 2][2].split(", ")[0]
            victim = next(p for p in cluster.local_processes if p.name == victim_name)
            stamps, got = [], []
            killed_at = 0.0
            for i, tok in enumerate(cluster.stream(prompt, max_new_tokens=tokens)):
                stamps.append(_time.perf_counter())
                got.append(tok)
                if i == at:
                    _os.kill(victim.pid, _signal.SIGKILL)
                    killed_at = _time.monotonic()
            gaps = [b - a for a, b in zip(stamps, stamps[1:])]
            deadline = _time.monotonic() + 5 * liveness_s
            while _time.monotonic() < deadline and not any(
                    w["name"] == victim_name and w["lost_at"] for w in cluster.workers()):
                _time.sleep(0.02)
            detected = next((w for w in cluster.workers() if w["name"] == victim_name), {})
            stats = cluster.stats()
            stages = len(cluster.layer_map())
            kept = cluster._history_bytes_per_token()
        rows.append({"case": label, "stages": stages, "detect_s": (detected.get("lost_at") or killed_at) - killed_at,
                     "stall_s": (max(gaps) - _median(gaps)) if gaps else 0.0, "identical": got == want,
                     "replays": stats["replays"] + stats["warmups"], "restarts": stats["restarts"],
                     "how": detected.get("lost_why"), "kept_kb_per_1k": kept * 1000 / 1024})
    print(f"model={model} quant={quant} liveness_s={liveness_s} heartbeat_s={heartbeat_s} "
          f"device={_default_device()}", file=out)
    print(f"{'case':<20} {'stages':>6} {'detect s':>8} {'stall s':>8} {'replays':>8} {'restarts':>8} "
          f"{'same tokens':>11} {'kept KB/1k tok':>14}  detected by", file=out)
    for r in rows:
        print(f"{r['case']:<20} {r['stages']:>6} {r['detect_s']:>8.2f} {r['stall_s']:>8.2f} {r['replays']:>8} "
              f"{r['restarts']:>8} {str(r['identical']):>11} {r['kept_kb_per_1k']:>14.0f}  {r['how']}", file=out)
    return rows


###############################################################################
# CLI #########################################################################
###############################################################################


def _demo(args: Any) -> int:
    t0 = _time.perf_counter()
    options = dict(liveness_s=1.0, heartbeat_s=0.2) if args.chaos else {}
    with local(args.model, workers=args.workers, quant=args.quant, **options) as cluster:
        print(f"cluster ready in {_time.perf_counter() - t0:.1f} s: {cluster.n_layers} layers of "
              f"{args.model!r} ({args.quant}) on {len(cluster.layer_map())} workers")
        for first, last, name in cluster.layer_map():
            print(f"  layers {first:>3}..{last:<3} {name}")
        if args.chaos:
            reference = cluster.generate(args.prompt, max_new_tokens=args.tokens, temperature=args.temperature,
                                         seed=args.seed)
        print(f"prompt: {args.prompt!r}\ncompletion: ", end="", flush=True)
        t1 = _time.perf_counter()
        before = cluster.stats()["tokens"]
        text = []
        for i, piece in enumerate(cluster.stream(args.prompt, max_new_tokens=args.tokens,
                                                 temperature=args.temperature, seed=args.seed)):
            print(piece, end="", flush=True)
            text.append(piece)
            if args.chaos and i == args.tokens // 3:
                first, last, name = cluster.layer_map()[len(cluster.layer_map()) // 2]
                victim = next(p for p in cluster.local_processes if p.name == name.split(", ")[0])
                _os.kill(victim.pid, _signal.SIGKILL)
                print(f" [SIGKILL {victim.name}, layers {first}..{last}] ", end="", flush=True)
        elapsed = _time.perf_counter() - t1
        n = cluster.stats()["tokens"] - before
        print(f"\n{n} tokens in {elapsed:.2f} s ({n / elapsed:.1f} tokens/s, "
              f"{len(cluster.layer_map())} stages over loopback TCP, CURVE on)")
        if args.chaos:
            stats = cluster.stats()
            same = "".join(text) == reference
            print(f"after the kill: layers {cluster.layer_map()}; workers lost {stats['failures']}, "
                  f"sessions prefilled again {stats['restarts']}, stage replays {stats['replays'] + stats['warmups']}")
            print(f"completion identical to the fault-free run: {same}")
            return 0 if same else 1
    return 0


def _host(args: Any) -> int:
    cluster = host(args.model, workers=args.workers, quant=args.quant, port=args.port,
                   advertise=args.advertise, bind=args.bind)
    print(f"distllm host for {args.model!r}: start each worker with\n\n  python -m distllm join "
          f"{cluster.join_string}\n", flush=True)
    try:
        cluster.wait_ready()
        print(f"ready: {cluster.layer_map()}\nType a prompt and press Enter (Ctrl-D to stop).", flush=True)
        for line in _sys.stdin:
            for piece in cluster.stream(line.rstrip("\n"), max_new_tokens=args.tokens):
                print(piece, end="", flush=True)
            print(flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.close()
    return 0


def _join(args: Any) -> int:
    worker = join(args.join_string, name=args.name, device=args.device, background=True)  # raises if refused
    _signal.signal(_signal.SIGTERM, lambda *_: worker._leaving.set())  # hand over, then exit
    try:
        worker.wait()
    except KeyboardInterrupt:
        worker.leave()
    return 1 if worker.error else 0


def _bench(args: Any) -> int:
    if args.failover:
        bench_failover(args.model, quant=args.quant)
    else:
        bench_overhead(args.model, workers=args.workers, quant=args.quant, tokens=args.tokens)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the distllm command line."""
    import argparse

    parser = argparse.ArgumentParser(prog="distllm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--log", default=_os.environ.get("DISTLLM_LOG", "WARNING"), help="log level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="run the built-in tiny model on local workers")
    p.add_argument("--model", default="tiny")
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--quant", default="nf4", choices=_QUANTS)
    p.add_argument("--prompt", default="Once upon a time")
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chaos", action="store_true", help="SIGKILL a worker mid-generation and carry on")
    p.set_defaults(func=_demo)

    p = sub.add_parser("host", help="host a model and read prompts from stdin")
    p.add_argument("model")
    p.add_argument("--workers", type=int, default=1, help="workers to wait for before placing layers")
    p.add_argument("--quant", default="nf4", choices=_QUANTS)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--bind", default="0.0.0.0")
    p.add_argument("--advertise", default=None, help="address workers dial (default: this host's IP)")
    p.add_argument("--tokens", type=int, default=256)
    p.set_defaults(func=_host)

    p = sub.add_parser("join", help="join a cluster as a worker")
    p.add_argument("join_string")
    p.add_argument("--name", default=None)
    p.add_argument("--device", default=None)
    p.set_defaults(func=_join)

    p = sub.add_parser("bench", help="decode ms/token: N local workers against one process")
    p.add_argument("--model", default="tiny")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--quant", default="none", choices=_QUANTS)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--failover", action="store_true", help="measure the stall when a worker is SIGKILLed")
    p.set_defaults(func=_bench)

    args = parser.parse_args(argv)
    _logging.basicConfig(level=args.log.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return args.func(args)
    except DistllmError as exc:
        print(f"distllm: {type(exc).__name__}: {exc}", file=_sys.stderr)
        return 2


if __name__ == "__main__":
    # Run the module under its own name, so that the classes and worker entry points that
    # multiprocessing refers to are `distllm.*`, not `__main__.*`.
    import distllm as _distllm

    _sys.exit(_distllm.main())
