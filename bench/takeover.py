"""The host dies mid-request and the standby takes over behind the same tunnel: what clients see.

Real processes on this machine: a local relay that speaks bore's protocol (tests/borerelay.py; bore.pub
itself is out of reach here), two `serve` hosts on one store (the active one and a standby, both with
`--tunnel bore://...`), `join --store` workers. Five raw SSE clients stream (four seeded, one greedy) at
the API's public URL; once each has some events the active host is SIGKILLed; each reconnects to the same
URL with `Last-Event-ID` until it is answered. Meanwhile the official openai client asks for a whole
answer with an `Idempotency-Key`; its own retries reach the standby. Before the kill, every request ran
once uninterrupted (the reference). Prints, per client: events before and after the kill, the time from
the kill to its next event, whether event numbers ran on without a gap or a repeat, and whether the text
equals the uninterrupted run's.

    python bench/takeover.py [--model tiny] [--tokens 300] [--workers 2] [--lease 2]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import httpx  # noqa: E402

import distllm  # noqa: E402
from borerelay import BoreRelay  # noqa: E402


def start(args: list[str], log: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "distllm", *args], stdout=open(log, "w"), stderr=subprocess.STDOUT)


def wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)


def events(url: str, body: dict, last: str | None, sink: list, timeout: float = 300) -> None:
    """Append (event id, data, arrival time) of a stream's events to `sink` until it ends or the connection
    breaks (then it raises)."""
    headers = {"Last-Event-ID": last} if last else {}
    current = None
    with httpx.stream("POST", f"{url}/completions", json=body, headers=headers, timeout=timeout) as r:
        if r.status_code != 200:
            raise httpx.HTTPStatusError(f"HTTP {r.status_code}", request=r.request, response=r)
        for line in r.iter_lines():
            if line.startswith("id: "):
                current = line[4:]
            elif line.startswith("data: "):
                sink.append((current, line[6:], time.monotonic()))
                current = None


def text_of(evs) -> str:
    out = []
    for _, d, _ in evs:
        if d != "[DONE]":
            data = json.loads(d)
            out += [c["text"] for c in data.get("choices", [])]
    return "".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--tokens", type=int, default=300)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--lease", type=float, default=2.0)
    args = p.parse_args()

    tmp = tempfile.mkdtemp(prefix="distllm-takeover-")
    store, relay = os.path.join(tmp, "store"), BoreRelay()
    serve = ["serve", args.model, "--store", store, "--port", "0", "--quant", "none", "--bind", "127.0.0.1",
             "--lease", str(args.lease), "--tunnel", f"bore://127.0.0.1:{relay.control_port}"]
    procs = [start(serve, os.path.join(tmp, "active.log"))]
    try:
        wait(lambda: (distllm.read_rendezvous(store) or {}).get("api"), 120, "the active host's public API")
        before = distllm.read_rendezvous(store)
        url = before["api"]
        for i in range(args.workers):
            procs.append(start(["join", "--store", store, "--name", f"w{i}", "--bind", "127.0.0.1", "--no-direct"],
                               os.path.join(tmp, f"w{i}.log")))
        procs.append(start([*serve, "--standby"], os.path.join(tmp, "standby.log")))
        bodies = [{"model": args.model, "prompt": f"Story {i}: once upon a time", "max_tokens": args.tokens,
                   "stream": True, **({"temperature": 0.9, "seed": 100 + i} if i < 4 else {"temperature": 0})}
                  for i in range(5)]
        wait(lambda: httpx.get(f"{url}/models", timeout=2).status_code == 200 if _up(url) else False, 300,
             "the API through the tunnel")
        reference = []
        for body in bodies:
            sink: list = []
            events(url, body, None, sink)
            reference.append(sink)
        whole = {"model": args.model, "prompt": "A whole answer:", "max_tokens": args.tokens, "temperature": 0.9,
                 "seed": 7}
        want_whole = httpx.post(f"{url}/completions", json=whole, timeout=300).json()["choices"][0]["text"]
        print(f"public URL {url} (the relay's port); references made: {[len(r) for r in reference]} events")

        got = [[] for _ in bodies]
        killed = threading.Event()
        kill_at: list[float] = []
        answers: list = []

        def client(i: int) -> None:
            try:
                events(url, bodies[i], None, got[i])
            except httpx.HTTPError:
                pass
            killed.wait()
            while True:  # the same URL, the last event id it got, until someone answers
                try:
                    events(url, bodies[i], got[i][-1][0] if got[i] else None, got[i])
                    return
                except httpx.HTTPError:
                    time.sleep(0.2)

        def openai_client() -> None:
            from openai import OpenAI

            oc = OpenAI(base_url=url, api_key="none", max_retries=10, timeout=120)
            raw = oc.completions.with_raw_response.create(**whole, extra_headers={"Idempotency-Key": "takeover-bench"})
            answers.append((raw.parse(), time.monotonic(), raw.retries_taken))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(5)]
        threads.append(threading.Thread(target=openai_client))
        for t in threads:
            t.start()
        wait(lambda: all(len(g) >= 10 for g in got), 120, "ten events on every stream")
        procs[0].send_signal(signal.SIGKILL)
        kill_at.append(time.monotonic())
        had = [len(g) for g in got]
        killed.set()
        for t in threads:
            t.join(600)
        after = distllm.read_rendezvous(store)
        endpoint = distllm.JoinInfo.parse(after["join_string"]).endpoint
        same_join = endpoint == distllm.JoinInfo.parse(before["join_string"]).endpoint
        print(f"the standby's record: api {after['api']} (same: {after['api'] == url}), join endpoint "
              f"{endpoint} (same: {same_join})"
              f", address notes {after.get('address_notes')}")
        ok = True
        for i, (g, ref) in enumerate(zip(got, reference)):
            numbers = [int(e.rsplit("/", 1)[1]) for e, _, _ in g if e]
            later = [t for _, _, t in g[had[i]:]]
            gap = f"{later[0] - kill_at[0]:.1f} s" if later else "none after the kill (it had ended)"
            same = text_of(g) == text_of(ref) and g[-1][1] == "[DONE]"
            run_on = numbers == list(range(len(numbers)))
            ok &= same and run_on
            print(f"stream {i} ({'greedy' if i == 4 else 'seeded'}): {had[i]} events before the kill, "
                  f"{len(g) - had[i]} after; next event {gap} after the kill; ids 0..{numbers[-1]} without gap or "
                  f"repeat: {run_on}; text equals the uninterrupted run: {same}")
        same_whole = bool(answers) and answers[0][0].choices[0].text == want_whole
        ok &= same_whole
        print(f"openai client, a whole answer with an Idempotency-Key: answered {answers[0][1] - kill_at[0]:+.1f} s "
              f"from the kill after {answers[0][2]} retries of its own; equals the uninterrupted run: {same_whole}")
        return 0 if ok else 1
    finally:
        for p in procs:
            p.kill()
            p.wait()
        relay.close()


def _up(url: str) -> bool:
    try:
        httpx.get(f"{url}/models", timeout=2)
        return True
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    sys.exit(main())
