"""Speed on real GPUs: plain transformers nf4 against distllm, in one run on a device machine.

Builds a random-weight Llama-3-8B-shaped checkpoint (bf16 safetensors shards, written
straight from the GPU's random generator) under .bench-cache/, then measures side by side,
all greedy decoding of token-id prompts:

- plain transformers `generate` with bitsandbytes nf4 on GPU 0, batch 1 and batch 32;
- distllm with 1 worker (host and worker on GPU 0), and with one worker per GPU
  (worker processes joined over loopback TCP with the real protocol, CURVE on, direct links sealed; and once
  all in one `distllm join` process); 1 stream and 32 concurrent sessions each, with
  sessions decoded 16 to a step (the CUDA default) and one at a time (`decode_batch=1`);
- per-hop overhead: one stage's compute end to the next stage's compute start, from the workers'
  traces (`--trace`, one clock on one machine; median over the one-stream steps), and in parts for
  the steps over a direct link (sender's compute end to its send; to the receiver's read; to its
  compute start); as the host
  sees it, the arrival of a stage's answer less the arrival of the previous stage's copy less its
  compute; and the first stage's round trip through the host less its compute;
- the stall when a worker is SIGKILLed mid-stream, without and with a replica;
- tokens of every distllm run against a single-process reference (the same layers and
  kernels in one process, each prompt decoded alone): one stream, and every one of the 32
  concurrent sessions (the first 4 for decode batch 1).

Decode time per token is (time for 1 + N new tokens - time for 1) / N, so prefill stays
out: the median of three such measurements. Prints one table and appends it, with the
card's name, to docs/BENCHMARKS.md.

    python bench/gpu_speed.py [--layers 32] [--tokens 64] [--no-write] [--rows plain,one,...]

A run longer than one sitting can be split with --rows: each row is kept in --results as it ends,
and the table is printed (and written) by the run that completes it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

import distllm  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = 32  # prompt tokens
SESSIONS = 32
LONG = 2048  # prompt tokens for the time-to-first-token figures (8 chunks of 256)


def log(*args) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *args, flush=True)


def llama3_8b_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                       rope_theta=500000.0, rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001,
                       tie_word_embeddings=False, torch_dtype="bfloat16")


def build_checkpoint(path: str, layers: int) -> str:
    """Write random bf16 weights (std 0.02, norms 1) in ~4 GB shards with an index, once."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    if os.path.exists(os.path.join(path, "model.safetensors.index.json")):
        return path
    os.makedirs(path, exist_ok=True)
    config = llama3_8b_config(layers)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator("cuda").manual_seed(0)
    shard, size, weight_map, total, n = {}, 0, {}, 0, 0

    def flush() -> None:
        nonlocal shard, size, n
        name = f"model-{n:05d}.safetensors"
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        shard, size, n = {}, 0, n + 1

    for key, t in skeleton.state_dict().items():
        if key.endswith("norm.weight"):
            value = torch.ones(t.shape, dtype=torch.bfloat16)
        else:
            value = (torch.randn(t.shape, generator=gen, device="cuda", dtype=torch.bfloat16) * 0.02).cpu()
        shard[key] = value
        size += value.numel() * 2
        total += value.numel() * 2
        if size > 4e9:
            flush()
    if shard:
        flush()
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    config.save_pretrained(path)
    distllm._tiny_tokenizer().save_pretrained(path)
    return path


def prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(1000, 120000, (n, PROMPT), generator=g).tolist()


def decode_ms(run, tokens: int, repeats: int = 3) -> float:
    """ms per decoded token: (run(1 + tokens) - run(1)) / tokens, after a warm-up; the median of `repeats`
    such pairs (one pair swung 30% between runs, and a stall in run(1) made a row look twice as fast)."""
    run(2)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(1)
        t1 = time.perf_counter()
        run(1 + tokens)
        t2 = time.perf_counter()
        samples.append(((t2 - t1) - (t1 - t0)) * 1e3 / tokens)
    return statistics.median(samples)


def plain_transformers(path: str, tokens: int) -> dict:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    t0 = time.perf_counter()
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, device_map="cuda:0",
                                                 dtype=torch.bfloat16).eval()
    load = time.perf_counter() - t0
    out = {}
    for batch in (1, SESSIONS):
        ids = torch.tensor(prompts(batch), device="cuda:0")

        def run(n: int) -> None:
            with torch.inference_mode():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=0)
            torch.cuda.synchronize()

        ms = decode_ms(run, tokens)
        out[batch] = batch * 1e3 / ms
        log(f"plain transformers nf4, batch {batch}: {ms:.2f} ms per step, {out[batch]:.1f} tok/s")
    model = None  # frees the GPU memory before distllm loads
    torch.cuda.empty_cache()
    return {"load_s": load, "tok_s_1": out[1], f"tok_s_{SESSIONS}": out[SESSIONS]}


def reference_tokens(path: str, tokens: int, batches: dict[int, int]) -> dict:
    """The same layers and kernels in one process, no network: what every distllm run must give.
    For each decode batch, the first n prompts' tokens, each decoded alone (through the padded step
    of that many rows the workers run); and ms per token of the first."""
    decode = distllm._reference_decoder(path, "nf4")
    want = {}
    for batch, n in batches.items():
        runs = [decode(p, tokens, batch) for p in prompts(SESSIONS)[:n]]
        want[batch] = [ids for ids, _ in runs]
        log(f"reference, decode batch {batch}: {runs[0][1] * 1e3:.2f} ms/token in one process")
    decode = None
    torch.cuda.empty_cache()
    return want


def start_workers(join_string: str, devices: list[str], tag: str, direct: bool = True,
                  one_process: bool = False, trace: str | None = None) -> list[subprocess.Popen]:
    """One `distllm join` process per GPU; or, with one_process, one for them all (a worker per GPU in it)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    links = (["--bind", "127.0.0.1"] if direct else ["--no-direct"]) + (["--trace", trace] if trace else [])
    if one_process:
        return [subprocess.Popen([sys.executable, "-m", "distllm", "join", join_string, "--name", tag, *links],
                                 env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                 stderr=open(os.path.join(ROOT, ".bench-cache", f"{tag}.log"), "w"))]
    return [subprocess.Popen([sys.executable, "-m", "distllm", "join", join_string, "--name", f"{tag}-{i}",
                              "--device", d, *links], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=open(os.path.join(ROOT, ".bench-cache", f"{tag}-{i}.log"), "w"))
            for i, d in enumerate(devices)]


def distllm_run(path: str, devices: list[str], tokens: int, wanted: dict, *, stages: int,
                replicas: int = 1, kill: bool = False, tag: str = "w", direct: bool = True,
                batch: int = distllm._GPU_DECODE_BATCH, long_prompt: bool = True, one_process: bool = False) -> dict:
    t0 = time.perf_counter()
    cluster = distllm.host(path, quant="nf4", bind="127.0.0.1", workers=len(devices), stages=stages,
                           replicas=replicas, liveness_s=2.0, heartbeat_s=0.25, rebalance_s=0, decode_batch=batch)
    trace = os.path.join(tempfile.mkdtemp(), "trace")
    procs = start_workers(cluster.join_string, devices, tag, direct, one_process, trace)
    want_all = wanted[batch]
    want = want_all[0]
    row: dict = {"workers": len(devices), "stages": stages, "replicas": replicas,
                 "route": "direct" if direct else "relayed", "batch": batch, "processes": len(procs)}
    try:
        cluster.wait_ready(600)
        row["ready_s"] = time.perf_counter() - t0
        p = prompts(SESSIONS)
        got = cluster.generate(p[0], max_new_tokens=tokens)
        row["identical"] = got == want[:len(got)] and len(got) == len(want)
        if kill:
            row.update(stall(cluster, procs, p[0], tokens, want))
            return row
        since = time.monotonic()
        ms = decode_ms(lambda n: cluster.generate(p[0], max_new_tokens=n), tokens)
        row["trace_window"] = (since, time.monotonic())
        row["tok_s_1"] = 1e3 / ms
        # A stage fed straight by the previous one: its answer's arrival at the host, less the arrival of
        # the previous stage's copy, less its compute: the time one stage-to-stage hop adds. The first
        # stage's is a round trip through the host (two legs), reported apart.
        first = set(cluster.layer_map()[0][2].split(", "))
        times = {w["name"]: w["overhead_ms"] for w in cluster.workers() if w.get("overhead_ms") is not None}
        hops = [ms for name, ms in times.items() if name not in first]
        row["hop_ms"] = statistics.median(hops) if hops else float("nan")
        row["first_ms"] = statistics.median([times[n] for n in first if n in times] or [float("nan")])

        results: dict = {}

        def many(n: int) -> None:
            def one(k: int) -> None:
                results[k] = cluster.generate(p[k], max_new_tokens=n)

            threads = [threading.Thread(target=one, args=(k,)) for k in range(len(p))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        before = cluster.stats()
        row[f"tok_s_{SESSIONS}"] = SESSIONS * 1e3 / decode_ms(many, tokens)
        # every session's tokens (the last run: 1 + tokens each) against its prompt decoded alone
        row["identical_all"] = all(results[k][:tokens] == w for k, w in enumerate(want_all))
        row["checked"] = len(want_all)
        after = cluster.stats()
        row["batched_share"] = (after["batched"] - before["batched"]) / max(1, after["steps"] - before["steps"])
        row["direct_steps"] = cluster.stats()["direct"]
        row["ttft_serial"] = row["ttft_pipelined"] = float("nan")
        long = torch.randint(1000, 120000, (LONG,), generator=torch.Generator().manual_seed(2)).tolist()
        for pipelined in (False, True) if long_prompt else ():  # chunks one after another through all stages,
            # or overlapped
            cluster.config.pipeline_prefill = pipelined
            cluster.generate(long, max_new_tokens=1)  # warm-up: caches grown, kernels loaded
            times = []
            for _ in range(3):
                t1 = time.perf_counter()
                cluster.generate(long, max_new_tokens=1)
                times.append(time.perf_counter() - t1)
            row["ttft_pipelined" if pipelined else "ttft_serial"] = statistics.median(times)
        log(f"distllm {len(devices)} workers x {stages} stages: {row}")
        return row
    finally:
        cluster.close()
        for proc in procs:  # the shutdown stops them, and they write their traces as they stop
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # Each one-stream step's compute end on one stage to its compute start on the next, from the
        # workers' own clocks (one machine): what a stage-to-stage hop adds, exactly.
        window = row.pop("trace_window", (0.0, -1.0))
        hops = distllm.trace_hops(trace, *window)
        row["traced_ms"] = statistics.median(hops) * 1e3 if hops else float("nan")
        # ... and of those over a direct link, in parts: sender's compute end to its send, to the receiver's
        # read (the wire and the wake-up), to its compute start (open, decode, check)
        parts = distllm.trace_hop_parts(trace, *window)
        row["parts_ms"] = [statistics.median(p) * 1e3 for p in zip(*parts)] if parts else []
        torch.cuda.empty_cache()


def stall(cluster, procs, prompt: list[int], tokens: int, want: list[int]) -> dict:
    """SIGKILL the worker holding the middle range at a third of the stream; the longest gap minus the median."""
    victim_name = cluster.layer_map()[len(cluster.layer_map()) // 2][2].split(", ")[0]
    victim = procs[int(victim_name.rsplit("-", 1)[1])]
    stamps, got = [], []
    for i, tok in enumerate(cluster.stream(prompt, max_new_tokens=tokens)):
        stamps.append(time.perf_counter())
        got.append(tok)
        if i == tokens // 3:
            os.kill(victim.pid, signal.SIGKILL)
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"stall_s": max(gaps) - statistics.median(gaps), "identical_after_kill": got == want}


ROWS = ("plain", "one", "one-b1", "per-gpu", "per-gpu-b1", "one-process", "kill", "kill-rep")
ONE_GPU_ROWS = ("plain", "one", "one-b1")  # what a machine of one GPU runs


def run_row(tag: str, path: str, tokens: int, want: dict, gpus: int) -> dict:
    """One row of the table, by its tag (see ROWS)."""
    if tag == "plain":
        return plain_transformers(path, tokens)
    all_gpus = [f"cuda:{i}" for i in range(gpus)]
    if tag in ("one", "one-b1"):
        return distllm_run(path, ["cuda:0"], tokens, want, stages=1, tag=tag, long_prompt=False,
                           batch=1 if tag == "one-b1" else distllm._GPU_DECODE_BATCH)
    if tag == "per-gpu":
        return distllm_run(path, all_gpus, tokens, want, stages=gpus, tag=tag)
    if tag == "per-gpu-b1":
        return distllm_run(path, all_gpus, tokens, want, stages=gpus, tag=tag, batch=1, long_prompt=False)
    if tag == "one-process":
        return distllm_run(path, all_gpus, tokens, want, stages=gpus, tag=tag, long_prompt=False, one_process=True)
    if tag == "kill":
        return distllm_run(path, all_gpus, tokens, want, stages=gpus, kill=True, tag=tag)
    if tag == "kill-rep":
        return distllm_run(path, all_gpus, tokens, want, stages=max(1, gpus // 2), replicas=2, kill=True, tag=tag)
    raise SystemExit(f"unknown row {tag!r}: one of {', '.join(ROWS)}")


def table(results: dict, layers: int, tokens: int, gpus: int, card: str) -> str:
    plain = results["plain"]
    lines = [f"### GPU speed: Llama-3-8B-shaped, nf4, {layers} layers ({gpus} x {card})", "",
             f"`python bench/gpu_speed.py` ({time.strftime('%Y-%m-%d')}; torch {torch.__version__}, transformers "
             f"{__import__('transformers').__version__}); prompt {PROMPT} tokens, {tokens} decoded, greedy.", "",
             f"| run | decode batch | tok/s, 1 stream | tok/s, {SESSIONS} sessions | {SESSIONS} sessions / 1 stream "
             f"| ms per extra stage | hop ms: traced (send + wire + receive) / host-measured | host round trip ms "
             f"| first token after {LONG} prompt tokens, s: chunks in series / pipelined "
             f"| steps batched | tokens = reference: 1 stream / {SESSIONS} sessions (sessions checked) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
             f"| plain transformers nf4, 1 GPU (generate, batch 1 / {SESSIONS}) | – | {plain['tok_s_1']:.1f} | "
             f"{plain[f'tok_s_{SESSIONS}']:.1f} | {plain[f'tok_s_{SESSIONS}'] / plain['tok_s_1']:.1f}x | – | – | – | – "
             f"| – | – |"]
    rows = [results[t] for t in ROWS if t in results and t != "plain" and not t.startswith("kill")]
    one_ms = {r["batch"]: 1e3 / r["tok_s_1"] for r in rows if r["stages"] == 1}
    for r in rows:
        # The same 32 layers run split S ways: what S stages cost over one, per stage added.
        extra = f"{(1e3 / r['tok_s_1'] - one_ms[r['batch']]) / (r['stages'] - 1):.2f}" if r["stages"] > 1 else "–"
        route = f", {r['route']}" if r["stages"] > 1 else ""
        where = ", all in 1 process" if r["processes"] == 1 and r["workers"] > 1 else ""
        parts = f" ({' + '.join(f'{p:.2f}' for p in r['parts_ms'])})" if r["parts_ms"] else ""
        hop = "–" if r["hop_ms"] != r["hop_ms"] else f"{r['traced_ms']:.2f}{parts} / {r['hop_ms']:.2f}"
        ttft = "–" if r["ttft_serial"] != r["ttft_serial"] else f"{r['ttft_serial']:.3f} / {r['ttft_pipelined']:.3f}"
        lines.append(f"| distllm, {r['workers']} worker(s){where}, {r['stages']} stage(s){route} | {r['batch']} | "
                     f"{r['tok_s_1']:.1f} | {r[f'tok_s_{SESSIONS}']:.1f} | "
                     f"{r[f'tok_s_{SESSIONS}'] / r['tok_s_1']:.1f}x | {extra} | {hop} | {r['first_ms']:.2f} | "
                     f"{ttft} | {r['batched_share']:.0%} | "
                     f"{r['identical']} / {r['identical_all']} ({r['checked']}) |")
    if "kill" in results and "kill-rep" in results:
        no_replica, with_replica = results["kill"], results["kill-rep"]
        lines += ["", "| SIGKILL of a worker mid-stream | stall s | tokens = reference |", "|---|---:|---|",
                  f"| {gpus} stages, no replica (re-plan, reload) | {no_replica['stall_s']:.2f} | "
                  f"{no_replica['identical_after_kill']} |",
                  f"| {max(1, gpus // 2)} stages x 2 replicas | {with_replica['stall_s']:.2f} | "
                  f"{with_replica['identical_after_kill']} |"]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--rows", default=",".join(ROWS),
                    help=f"the rows to run now, of {', '.join(ROWS)}; each is kept in --results, so a run too long "
                         "for one sitting can be split (the table is written once every row is there)")
    ap.add_argument("--results", default=os.path.join(ROOT, ".bench-cache", "gpu_speed.json"),
                    help="rows measured so far on this machine (JSON), added to by each run")
    ap.add_argument("--prefill-only", action="store_true",
                    help="only distllm over every GPU with direct links (its row and time to first token)")
    ap.add_argument("--hop-only", action="store_true",
                    help="only 2+ stages at decode batch 1, direct links (two workers share the GPU if there is one)")
    args = ap.parse_args()
    asked = [t for t in args.rows.split(",") if t]
    unknown = [t for t in asked if t not in ROWS]
    if unknown:
        raise SystemExit(f"unknown row(s) {', '.join(unknown)}: of {', '.join(ROWS)}")
    gpus = torch.cuda.device_count()
    card = torch.cuda.get_device_name(0)
    log(f"{gpus} x {card}, torch {torch.__version__}, transformers {__import__('transformers').__version__}")
    path = build_checkpoint(os.path.join(ROOT, ".bench-cache", f"llama3-8b-shape-{args.layers}l"), args.layers)
    log("checkpoint ready")
    if args.prefill_only:
        want = reference_tokens(path, args.tokens, {distllm._GPU_DECODE_BATCH: SESSIONS})
        distllm_run(path, [f"cuda:{i}" for i in range(gpus)], args.tokens, want, stages=gpus, tag="per-gpu")
        return 0
    if args.hop_only:
        want = reference_tokens(path, args.tokens, {1: 4})
        devices = [f"cuda:{i}" for i in range(gpus)] if gpus > 1 else ["cuda:0", "cuda:0"]
        row = distllm_run(path, devices, args.tokens, want, stages=len(devices), tag="hop", batch=1,
                          long_prompt=False)
        print(f"\nhop ms at decode batch 1, {len(devices)} stages: traced {row['traced_ms']:.3f} "
              f"(send, wire, receive: {', '.join(f'{p:.3f}' for p in row['parts_ms'])}), host-measured "
              f"{row['hop_ms']:.3f}; host round trip {row['first_ms']:.3f}; {row['tok_s_1']:.1f} tok/s; "
              f"tokens = reference {row['identical']} / {row['identical_all']}", flush=True)
        return 0
    wanted = ROWS if gpus > 1 else ONE_GPU_ROWS
    tags = [t for t in asked if t in wanted]
    setting = {"gpus": gpus, "card": card, "layers": args.layers, "tokens": args.tokens}
    results: dict = {}
    if os.path.exists(args.results):
        with open(args.results) as f:
            kept = json.load(f)
        if kept.get("setting") == setting:  # rows of another machine or setting are not mixed in
            results = kept["rows"]
    batches = {}  # the reference runs the rows need: decode batch -> prompts
    for tag in tags:  # (a kill row checks its one stream)
        if tag != "plain":
            batch = 1 if tag.endswith("b1") else distllm._GPU_DECODE_BATCH
            n = 1 if tag.startswith("kill") else 4 if batch == 1 else SESSIONS
            batches[batch] = max(n, batches.get(batch, 0))
    want = reference_tokens(path, args.tokens, batches) if batches else {}
    for tag in tags:
        results[tag] = run_row(tag, path, args.tokens, want, gpus)
        os.makedirs(os.path.dirname(args.results), exist_ok=True)
        with open(args.results, "w") as f:  # after each row: a run cut short keeps what it measured
            json.dump({"setting": setting, "rows": results}, f, indent=1)
    missing = [t for t in wanted if t not in results]
    if missing:
        log(f"rows still to run: {','.join(missing)} (--rows); kept in {args.results}")
        return 0
    text = table(results, args.layers, args.tokens, gpus, card)
    print("\n" + text, flush=True)
    if not args.no_write:
        with open(os.path.join(ROOT, "docs", "BENCHMARKS.md"), "a") as f:
            f.write("\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
