"""One-way latency of a stage hop's transport on this machine, apart from distllm's own work.

Two processes (as two workers are): a sender puts an 8 KB frame (one token's hidden state,
4096 bf16) on a ZeroMQ DEALER to the receiver's ROUTER over loopback TCP, stamped with
CLOCK_MONOTONIC; the receiver stamps its arrival. Variants: CURVE on or off; the receiver
spinning (polls that do not sleep, as a distllm node does while it serves) or sleeping in
poll(); the sender pacing its sends 10 ms apart (as decode steps come) or sending on the
receiver's answer (ping-pong: every core hot). A plain TCP socket pair, paced, is the floor
without ZeroMQ's I/O threads. Prints the median and the 90th percentile, in microseconds.

    python bench/wire.py [--n 300]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import statistics
import struct
import time

import zmq

SIZE = 8192


def _curve(sock: zmq.Socket, keys: dict, server: bool) -> None:
    if not keys:
        return
    if server:
        sock.curve_server = True
        sock.curve_secretkey = keys["server_secret"]
        sock.curve_publickey = keys["server_public"]
    else:
        sock.curve_serverkey = keys["server_public"]
        sock.curve_publickey = keys["client_public"]
        sock.curve_secretkey = keys["client_secret"]


def _receiver(port: int, keys: dict, spin: bool, n: int, out: mp.Queue) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    _curve(sock, keys, True)
    sock.bind(f"tcp://127.0.0.1:{port}")
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    out.put("bound")
    lat = []
    for _ in range(n):
        if spin:
            while not poller.poll(0):
                pass
        else:
            poller.poll()
        ident, frame = sock.recv_multipart()
        now = time.monotonic()
        lat.append(now - struct.unpack("d", frame[:8])[0])
        sock.send_multipart([ident, b"k"])  # the sender's go-ahead in ping-pong mode
    out.put(lat)
    sock.close(0)
    ctx.term()


def _zmq_run(keys: dict, spin: bool, paced: bool, n: int) -> list[float]:
    ctx = zmq.Context()
    port = _free_port()
    out: mp.Queue = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=_receiver, args=(port, keys, spin, n, out))
    proc.start()
    assert out.get(timeout=60) == "bound"
    sock = ctx.socket(zmq.DEALER)
    _curve(sock, keys, False)
    sock.connect(f"tcp://127.0.0.1:{port}")
    body = bytes(SIZE - 8)
    for _ in range(n):
        sock.send(struct.pack("d", time.monotonic()) + body)
        if paced:
            time.sleep(0.01)
        sock.recv()
    lat = out.get(timeout=60)
    proc.join()
    sock.close(0)
    ctx.term()
    return lat[10:]  # the connection's first messages are its warm-up


def _tcp_receiver(port: int, n: int, out: mp.Queue) -> None:
    srv = socket.create_server(("127.0.0.1", port))
    out.put("bound")
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    lat = []
    for _ in range(n):
        buf = bytearray()
        while len(buf) < SIZE:
            buf += conn.recv(SIZE - len(buf))
        lat.append(time.monotonic() - struct.unpack("d", buf[:8])[0])
        conn.sendall(b"k")
    out.put(lat)
    conn.close()
    srv.close()


def _tcp_run(n: int) -> list[float]:
    port = _free_port()
    out: mp.Queue = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=_tcp_receiver, args=(port, n, out))
    proc.start()
    assert out.get(timeout=60) == "bound"
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    body = bytes(SIZE - 8)
    for _ in range(n):
        sock.sendall(struct.pack("d", time.monotonic()) + body)
        time.sleep(0.01)
        sock.recv(1)
    lat = out.get(timeout=60)
    proc.join()
    sock.close()
    return lat[10:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    args = ap.parse_args()
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    keys = {"server_public": server_public, "server_secret": server_secret,
            "client_public": client_public, "client_secret": client_secret}
    print(f"one-way latency of {SIZE} bytes over loopback, microseconds (pyzmq {zmq.__version__}, "
          f"libzmq {zmq.zmq_version()})")
    print("| transport | receiver | sender | median | p90 |")
    print("|---|---|---|---:|---:|")
    rows = [(f"ZeroMQ{', CURVE' if k else ''}", spin, paced, lambda k=k, s=spin, p=paced: _zmq_run(k, s, p, args.n))
            for k in (keys, {}) for spin in (True, False) for paced in (True, False)]
    rows.append(("plain TCP", False, True, lambda: _tcp_run(args.n)))
    for name, spin, paced, run in rows:
        lat = sorted(run())
        print(f"| {name} | {'spinning' if spin else 'sleeping'} | {'every 10 ms' if paced else 'ping-pong'} | "
              f"{statistics.median(lat) * 1e6:.0f} | {lat[int(len(lat) * 0.9)] * 1e6:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
