"""Free-tier emulation on one GPU: a 70B model on four T4-sized workers.

Builds (once, under .bench-cache/) a random Llama-3-70B-shaped checkpoint (hidden 8192, 64 heads,
8 KV heads, intermediate 28672, vocab 128256) with --layers decoder layers, stored pre-quantized
in nf4 exactly as a `*-bnb-4bit` Hub repo stores it (packed uint8 weights, absmax, quant_map and
the packed quant state per Linear; a bitsandbytes `quantization_config` in config.json; float16
embeddings, norms and head). Then four `distllm join` worker processes share the GPU, each held to
--cap-gb of it (a T4 has 16 GB; `torch.cuda.set_per_process_memory_fraction` through a
sitecustomize) and computing in float16 (a T4 has no bfloat16), and it measures:

- per worker: time from start to serving its layers, layers held, GPU memory it holds;
- tokens/s for one stream and for 16 concurrent sessions, with the tokens of the stream
  against a single-process reference (the same stored layers in one process, float16);
- the stall when a worker is SIGKILLed mid-stream: 4 stages, no replica (re-plan, reload), and
  2 stages of 2 replicas each (the other replica answers).

    python bench/freetier.py [--layers 16] [--tokens 32] [--cap-gb 15]
    python bench/freetier.py --device cpu --small     (a smoke test of the script itself)
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
CACHE = os.path.join(ROOT, ".bench-cache")
PROMPT = list(range(10, 42))
SESSIONS = 16
SITE = '''import os
if os.environ.get("DISTLLM_CAP_GB"):
    import torch
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(float(os.environ["DISTLLM_CAP_GB"]) * 2**30 / total, 0)
'''


def log(*args) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *args, flush=True)


def shape(small: bool) -> dict:
    if small:
        return dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_attention_heads=8,
                    num_key_value_heads=2)
    return dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                num_key_value_heads=8)


def build(path: str, layers: int, small: bool, device: str) -> str:
    """Write the nf4 checkpoint as transformers + bitsandbytes would save it, one layer at a time."""
    import bitsandbytes as bnb
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    if os.path.exists(os.path.join(path, "model.safetensors.index.json")):
        return path
    os.makedirs(path, exist_ok=True)
    config = LlamaConfig(**shape(small), num_hidden_layers=layers, max_position_embeddings=8192,
                         rope_theta=500000.0, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=False, torch_dtype="float16")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator(device).manual_seed(0)
    weight_map: dict[str, str] = {}
    total = 0

    def random(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=gen, device=device, dtype=torch.float16) * 0.02

    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in skeleton.state_dict().items():
        group = ".".join(key.split(".")[:3]) if key.startswith("model.layers.") else "head"
        groups.setdefault(group, {})[key] = t
    for n, (group, tensors) in enumerate(groups.items()):
        out: dict[str, torch.Tensor] = {}
        for key, t in tensors.items():
            if key.endswith("norm.weight"):
                out[key] = torch.ones(t.shape, dtype=torch.float16)
            elif group == "head":
                out[key] = random(t).cpu()
            else:  # a Linear of a layer: packed nf4 and its state, as Linear4bit's state dict holds them
                packed, state = bnb.functional.quantize_4bit(random(t), blocksize=64, compress_statistics=False,
                                                             quant_type="nf4", quant_storage=torch.uint8)
                out[key] = packed.cpu()
                out.update({f"{key}.{k}": v.cpu() for k, v in state.as_dict(packed=True).items()})
        name = f"model-{n:05d}.safetensors"
        save_file(out, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in out})
        total += sum(v.numel() * v.element_size() for v in out.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    config.quantization_config = {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": False, "bnb_4bit_compute_dtype": "float16",
        "bnb_4bit_quant_storage": "uint8"}
    config.save_pretrained(path)
    distllm._tiny_tokenizer().save_pretrained(path)
    log(f"checkpoint: {layers} layers, {total / 1e9:.1f} GB on disk")
    return path


def start_workers(join_string: str, n: int, device: str, cap_gb: float, tag: str) -> list[subprocess.Popen]:
    site = tempfile.mkdtemp(prefix="distllm-site-")
    with open(os.path.join(site, "sitecustomize.py"), "w") as f:
        f.write(SITE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([site, ROOT, os.environ.get("PYTHONPATH", "")]),
           "DISTLLM_CAP_GB": str(cap_gb) if device.startswith("cuda") else ""}
    return [subprocess.Popen([sys.executable, "-m", "distllm", "join", join_string, "--name", f"{tag}{i}",
                              "--device", device, "--bind", "127.0.0.1"], env=env, cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=open(os.path.join(CACHE, f"{tag}{i}.log"), "w"))
            for i in range(n)]


def gpu_memory() -> dict[int, float]:
    """GB of GPU memory each process holds (nvidia-smi), by pid."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {int(p): float(m) / 1024 for p, m in (line.split(",") for line in out.strip().splitlines() if line)}


def decode_rate(cluster, tokens: int) -> tuple[list[int], float]:
    """One stream's tokens, and tokens/s after the first token (prefill kept out)."""
    stamps, got = [], []
    for tok in cluster.stream(PROMPT, max_new_tokens=tokens):
        stamps.append(time.perf_counter())
        got.append(tok)
    return got, (len(stamps) - 1) / (stamps[-1] - stamps[0])


def many_rate(cluster, tokens: int) -> float:
    def one(k: int) -> None:
        cluster.generate([5 + k] + PROMPT, max_new_tokens=tokens)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(SESSIONS)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return SESSIONS * tokens / (time.perf_counter() - t0)


def kill_stall(cluster, procs, tokens: int, want: list[int]) -> tuple[float, bool]:
    stamps, got = [], []
    victim = next(p for p in procs if p.poll() is None and any(
        w["pid"] == p.pid and w["layers"] and w["layers"][0] > 0 for w in cluster.workers()))
    for i, tok in enumerate(cluster.stream(PROMPT, max_new_tokens=tokens)):
        stamps.append(time.perf_counter())
        got.append(tok)
        if i == tokens // 3:
            os.kill(victim.pid, signal.SIGKILL)
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return max(gaps) - statistics.median(gaps), got == want[:len(got)] and len(got) == len(want)


def cluster_run(path: str, args, *, stages: int, replicas: int, tag: str, measure: bool) -> dict:
    row: dict = {"stages": stages, "replicas": replicas}
    t0 = time.perf_counter()
    with distllm.host(path, dtype="float16", bind="127.0.0.1", workers=4, stages=stages, replicas=replicas,
                      calibrate=False, rebalance_s=0) as cluster:
        procs = start_workers(cluster.join_string, 4, args.device, args.cap_gb, tag)
        try:
            cluster.wait_ready(900)
            while sum(w["alive"] and w["state"] == "ready" for w in cluster.workers()) < 4:  # replicas too
                time.sleep(0.1)
            row["ready_s"] = time.perf_counter() - t0
            mem = gpu_memory()
            row["workers"] = [{"name": w["name"], "layers": w["layers"], "load_s": w["load_s"],
                               "gpu_gb": mem.get(w["pid"])} for w in cluster.workers() if w["alive"]]
            row["host_gpu_gb"] = mem.get(os.getpid())
            got, row["tok_s_1"] = decode_rate(cluster, args.tokens)
            row["tokens"] = got
            if measure:
                row["tok_s_16"] = many_rate(cluster, args.tokens)
            row["stall_s"], row["identical_after_kill"] = kill_stall(cluster, procs, args.tokens, got)
        finally:
            for p in procs:
                p.kill()
                p.wait()
    return row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--cap-gb", type=float, default=15.0)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--small", action="store_true", help="a tiny model of the same layout (smoke test)")
    args = ap.parse_args()
    os.makedirs(CACHE, exist_ok=True)
    path = build(os.path.join(CACHE, f"freetier-{args.layers}{'-small' if args.small else ''}"), args.layers,
                 args.small, args.device)
    # The reference decodes through the same padded step as the workers (decode_batch: 16 on a GPU).
    decode = distllm._reference_decoder(path, "nf4")
    want, _ = decode(PROMPT, args.tokens)
    del decode
    import gc

    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    log("reference done")
    plain = cluster_run(path, args, stages=4, replicas=1, tag="t", measure=True)
    log(json.dumps({k: v for k, v in plain.items() if k != "tokens"}))
    rep = cluster_run(path, args, stages=2, replicas=2, tag="r", measure=False)
    log(json.dumps({k: v for k, v in rep.items() if k != "tokens"}))
    print(f"\n| run | ready s | tok/s 1 stream | tok/s {SESSIONS} sessions | tokens = reference | "
          "SIGKILL stall s | same tokens after kill |")
    print("|---|---:|---:|---:|---|---:|---|")
    for name, r in (("4 stages, no replica", plain), ("2 stages x 2 replicas", rep)):
        many = f"{r['tok_s_16']:.1f}" if "tok_s_16" in r else "—"
        print(f"| {name} | {r['ready_s']:.0f} | {r['tok_s_1']:.1f} | {many} | "
              f"{r['tokens'] == want} | {r['stall_s']:.2f} | {r['identical_after_kill']} |")
    print("\n| worker | layers | load s | GPU GB |")
    print("|---|---|---:|---:|")
    for w in plain["workers"]:
        gb = f"{w['gpu_gb']:.2f}" if w["gpu_gb"] is not None else "-"
        load = f"{w['load_s']:.1f}" if w["load_s"] is not None else "-"
        print(f"| {w['name']} | {w['layers'][0]}..{w['layers'][1] - 1} | {load} | {gb} |")
    print(f"\nhost GPU GB: {plain['host_gpu_gb']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
