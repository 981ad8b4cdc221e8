"""A TCP proxy that plays a bad network between workers and host, on loopback.

Every byte is delivered in order after half the round trip (plus jitter) in each
direction; `stall(s)` holds all traffic for s seconds (a relay hiccup), `cut()` drops
every connection at once (a NAT timeout, a tunnel restart); new connections are
accepted again right after. `outage(s)` is a relay that stops for s seconds: every
connection is dropped and new ones are refused until it listens again on the same
port. Used by the tests and by bench/network.py.

    proxy = LatencyProxy(target_port, rtt_ms=150, jitter_ms=10)
    worker_join_string = proxy.rewrite(cluster.join_string)  # workers dial the proxy
"""

from __future__ import annotations

import collections
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import distllm


@contextlib.contextmanager
def join_processes(join_string: str, names: list[str], log_dir: str, extra=lambda i: [], env: dict | None = None):
    """Start one `python -m distllm join` worker process per name (its output in log_dir/NAME.log, worker
    i gets the arguments extra(i)); yield them; SIGKILL them all at the end."""
    procs = []
    try:
        for i, name in enumerate(names):
            with open(os.path.join(log_dir, f"{name}.log"), "w") as log:
                procs.append(subprocess.Popen([sys.executable, "-m", "distllm", "join", join_string, "--name", name,
                                               *extra(i)], stdout=log, stderr=subprocess.STDOUT, env=env))
        yield procs
    finally:
        for p in procs:
            p.kill()
            p.wait()


def free_port() -> int:
    """A TCP port nothing listens on right now (for a worker's direct-link socket behind a proxy)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def close_pairs(pairs) -> None:
    """Shut and close both sockets of every pair (a relay's connections, dropped at once)."""
    for pair in pairs:
        for s in pair:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def _stop_listening(listener: socket.socket) -> None:
    """Close a listening socket for good: a bare close() from another thread leaves Linux listening
    (and accepting) until the blocked accept() returns; shutdown() wakes it and stops the listening."""
    try:
        listener.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    listener.close()


class LatencyProxy:
    def __init__(self, target_port: int, *, rtt_ms: float = 0.0, jitter_ms: float = 0.0, seed: int = 0,
                 target_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self.one_way = rtt_ms / 2000.0
        self.jitter = jitter_ms / 1000.0
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._stalled_until = 0.0
        self._links: list[tuple[socket.socket, socket.socket]] = []
        self.cuts = 0
        self._pending = 0  # chunks read and not yet delivered (or dropped by a cut)
        self.bytes = collections.Counter()  # "up" (to the target) and "down"
        self.outages = 0
        self._closed = threading.Event()
        self._listener: socket.socket | None = None
        with socket.create_server(("127.0.0.1", 0)) as probe:  # a free port, kept across outages
            self.port = probe.getsockname()[1]
        self._listen()

    def rewrite(self, join_string: str) -> str:
        """The join string with its address replaced by this proxy's."""
        info = distllm.JoinInfo.parse(join_string)
        return distllm.JoinInfo(f"tcp://127.0.0.1:{self.port}", info.server_key, info.client_public,
                                info.client_secret).encode()

    def stall(self, seconds: float) -> None:
        """Hold every byte in flight and to come for `seconds` (delivered afterwards, in order)."""
        with self._lock:
            self._stalled_until = max(self._stalled_until, time.monotonic() + seconds)

    def wait_delivered(self, timeout: float = 30.0) -> None:
        """Block until every byte read so far has been delivered (a stall's held bytes included)."""
        deadline = time.monotonic() + timeout
        while self._pending or time.monotonic() < self._stalled_until:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self._pending} chunks still held after {timeout} s")
            time.sleep(0.02)

    def cut(self) -> None:
        """Drop every open connection; later connections go through as before."""
        with self._lock:
            links, self._links = self._links, []
            self.cuts += 1
        close_pairs(links)

    def outage(self, seconds: float) -> threading.Thread:
        """Stop the relay: drop every connection and refuse new ones (nothing listens) for `seconds`,
        then listen on the same port again. Returns at once; the returned thread ends when it is back."""
        with self._lock:
            listener, self._listener = self._listener, None
            self.outages += 1
        _stop_listening(listener)
        self.cut()

        def restart() -> None:
            if not self._closed.wait(seconds):
                self._listen()

        thread = threading.Thread(target=restart, name="netem-outage", daemon=True)
        thread.start()
        return thread

    @property
    def up(self) -> bool:
        """Whether the relay listens (not in an outage)."""
        return self._listener is not None

    def _listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        with self._lock:
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), name="netem-accept", daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        if self._listener is not None:
            _stop_listening(self._listener)
        self.cut()

    def __enter__(self) -> "LatencyProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _accept(self, listener: socket.socket) -> None:
        while not self._closed.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return
            if self._listener is not listener:  # accepted as an outage began
                client.close()
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._links.append((client, server))
            self._pump(client, server, "up")
            self._pump(server, client, "down")

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        """Two threads per direction: one reads and stamps each chunk with its due time, one delivers."""
        queue: collections.deque = collections.deque()
        ready = threading.Condition()

        def read() -> None:
            last_due = 0.0
            while True:
                try:
                    data = src.recv(65536)
                except OSError:
                    data = b""
                due = max(last_due, time.monotonic() + self.one_way + self._random.uniform(-self.jitter, self.jitter))
                last_due = due
                with ready:
                    queue.append((due, data))
                    with self._lock:
                        self._pending += 1
                    ready.notify()
                if not data:
                    return

        def deliver() -> None:
            while True:
                with ready:
                    while not queue:
                        ready.wait()
                    due, data = queue.popleft()
                while True:  # wait until it is due and no stall holds it
                    hold = max(due, self._stalled_until) - time.monotonic()
                    if hold <= 0:
                        break
                    time.sleep(min(hold, 0.05))
                try:
                    if not data:  # the other side closed: pass the close on
                        dst.shutdown(socket.SHUT_WR)
                        return
                    dst.sendall(data)
                except OSError:
                    return
                finally:
                    with self._lock:
                        self._pending -= 1
                self.bytes[direction] += len(data)

        threading.Thread(target=read, name=f"netem-{direction}-read", daemon=True).start()
        threading.Thread(target=deliver, name=f"netem-{direction}-deliver", daemon=True).start()


class Throttle:
    """Stop a process `stop_ms` of every `period_ms` while `on()` says so (SIGSTOP/SIGCONT from a thread of
    this one): a notebook VM sharing its cores, a throttled GPU, a busy laptop."""

    def __init__(self, pid: int, stop_ms: float = 30.0, period_ms: float = 40.0) -> None:
        self.pid, self.stop_s, self.run_s = pid, stop_ms / 1e3, (period_ms - stop_ms) / 1e3
        self.on = lambda: False
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.done.is_set():
            if self.on():
                os.kill(self.pid, signal.SIGSTOP)
                time.sleep(self.stop_s)
                os.kill(self.pid, signal.SIGCONT)
                time.sleep(self.run_s)
            else:
                time.sleep(0.01)

    def close(self) -> None:
        self.done.set()
        self.thread.join()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGCONT)

    def __enter__(self) -> "Throttle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def memory_fraction_for(layers: int, layer_bytes: int) -> float:
    """A `memory_fraction` under which a worker on this machine holds about `layers` layers (plus a half, so
    that memory moving a little between now and its join keeps the count)."""
    return (layers + 0.5) * layer_bytes / distllm._available_memory(distllm.torch.device("cpu"))
