"""How much slower a direct step's way from the wire to the compute runs when it last ran milliseconds ago.

A worker's compute thread waits between decode steps (spinning on its poller on a GPU node). This
times what its receiving side does with one step (open the sealed frame, read the binary step,
make its input tensor, check it) right after doing it (hot), and as soon as the next step comes
(another process rings every --wait-ms) after waiting for it asleep, spinning, and spinning that
runs that same way on a copy every 200 us (what `Worker._warm` does). Medians in microseconds, one
step of (1, 1, 4096) bf16 states.

    python bench/cold.py [--hidden 4096] [--wait-ms 5] [--samples 300]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
import zmq  # noqa: E402
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305  # noqa: E402

import distllm  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--wait-ms", type=float, default=5.0)
    ap.add_argument("--samples", type=int, default=300)
    args = ap.parse_args()

    hidden = torch.randn(1, 1, args.hidden).to(torch.bfloat16)
    fields = {"sid": "0123456789abcdef", "step": 12, "stage": 1, "start": 40, "epoch": 1, "decode_from": 32}
    plain = distllm._step_head(fields, [], hidden.dtype, hidden.shape) + bytes(distllm._tensor_frame(hidden))
    cipher = ChaCha20Poly1305(os.urandom(32))
    size = (len(plain) + distllm._LINK_TAG).to_bytes(4, "little")
    sealed = cipher.encrypt(distllm._link_nonce(0), plain, size)

    def receive() -> None:
        opened = bytearray(len(plain))
        cipher.decrypt_into(distllm._link_nonce(0), sealed, size, opened)
        msg = distllm._read_step(opened, max_elements=1 << 28)
        distllm._step_fields(msg)
        distllm._check_hidden(msg.tensor(0), args.hidden, "forward", finite=False)

    # The next step's arrival: a byte another process writes every --wait-ms, as a previous stage would.
    bell, ringer = socket.socketpair()
    poller = zmq.Poller()
    poller.register(bell.fileno(), zmq.POLLIN)

    def timed(wait=None) -> float:
        """Median time of receive(), --samples times: back to back (no `wait`), or as soon as each step
        another process rings every --wait-ms comes, waited for by wait()."""
        pid = os.fork() if wait else None
        if pid == 0:  # the previous stage
            for _ in range(args.samples):
                time.sleep(args.wait_ms / 1e3)
                ringer.send(b"x")
            os._exit(0)
        times = []
        for _ in range(args.samples):
            if wait:
                wait()
                bell.recv(1)
            t0 = time.perf_counter()
            receive()
            times.append((time.perf_counter() - t0) * 1e6)
        if pid:
            os.waitpid(pid, 0)
        return statistics.median(times)

    print(f"{os.cpu_count()} CPUs; one direct step's receiving side, median of {args.samples}, microseconds")
    for label, wait in [
        ("hot (right after the last)", None),
        (f"steps {args.wait_ms:g} ms apart, waited for asleep", lambda: poller.poll(10_000)),
        (f"steps {args.wait_ms:g} ms apart, waited for spinning", lambda: distllm._poll_spinning(poller, 10.0, 10_000)),
        (f"... spinning, warmed every {distllm._WARM_S * 1e6:.0f} us (Worker._warm)",
         lambda: distllm._poll_spinning(poller, 10.0, 10_000, receive)),
    ]:
        print(f"  {label:58s} {timed(wait):8.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
