"""A mixture-of-experts model on one GPU: distllm's nf4 experts against transformers + bitsandbytes.

Builds (once, under .bench-cache/) a random Qwen3-30B-A3B-shaped checkpoint (hidden 2048, 32 heads,
4 KV heads, head_dim 128, 128 experts of intermediate 768, top 8, vocab 151936) with --layers decoder
layers, saved by transformers in bfloat16 with the Hub's per-expert keys. Then:

- plain transformers with bitsandbytes 4-bit (`BitsAndBytesConfig(load_in_4bit=True)`, nf4, bf16
  compute) on the GPU: its Linears go to 4 bits, its fused experts stay 16-bit; decode tokens/s at
  batch 1 and 16, GPU memory;
- distllm: the host in this process and four `distllm join` workers sharing the GPU, nf4 (experts
  in nf4 per expert): tokens/s for one stream and 16 sessions, GPU memory per worker, and the
  stream's tokens against the same layers decoded in one process (the single-process reference).

    python bench/moe.py [--layers 8] [--tokens 32]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

import distllm  # noqa: E402
from freetier import CACHE, PROMPT, SESSIONS, decode_rate, gpu_memory, log, many_rate, start_workers  # noqa: E402


def build(path: str, layers: int) -> str:
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    if os.path.exists(os.path.join(path, "config.json")):
        return path
    config = Qwen3MoeConfig(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                            num_experts=128, num_experts_per_tok=8, num_hidden_layers=layers, num_attention_heads=32,
                            num_key_value_heads=4, head_dim=128, max_position_embeddings=4096, bos_token_id=1,
                            eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path, max_shard_size="2GB")  # per-expert keys, as Hub checkpoints hold them
    distllm._tiny_tokenizer().save_pretrained(path)
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
    log(f"checkpoint: {layers} layers, {size / 1e9:.1f} GB on disk")
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return path


def plain_transformers(path: str, tokens: int) -> dict:
    """transformers + bitsandbytes 4-bit: tokens/s at batch 1 and SESSIONS, and the GPU memory it holds."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    model = AutoModelForCausalLM.from_pretrained(path, device_map="cuda", quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)).eval()
    row = {"gpu_gb": (torch.cuda.memory_allocated() - before) / 2**30}
    experts = model.model.layers[0].mlp.experts
    row["experts_dtype"] = str(experts.down_proj.dtype)

    def rate(batch: int) -> float:
        ids = torch.tensor([[5 + k] + PROMPT for k in range(batch)], device="cuda")
        kw = dict(do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=4, **kw)  # warm-up
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
            torch.cuda.synchronize()
            prefill = time.perf_counter() - t0
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **kw)
            torch.cuda.synchronize()
        return batch * (tokens - 1) / (time.perf_counter() - t0 - prefill)

    row["tok_s_1"], row[f"tok_s_{SESSIONS}"] = rate(1), rate(SESSIONS)
    del model, experts
    gc.collect()
    torch.cuda.empty_cache()
    return row


def distllm_run(path: str, tokens: int, want: list[int]) -> dict:
    row: dict = {}
    t0 = time.perf_counter()
    with distllm.host(path, quant="nf4", bind="127.0.0.1", workers=4, stages=4, calibrate=False,
                      rebalance_s=0) as cluster:
        procs = start_workers(cluster.join_string, 4, "cuda:0", 30.0, "m")
        try:
            cluster.wait_ready(900)
            row["ready_s"] = time.perf_counter() - t0
            mem = gpu_memory()
            row["workers"] = [{"name": w["name"], "layers": w["layers"], "gpu_gb": mem.get(w["pid"])}
                              for w in cluster.workers() if w["alive"]]
            row["host_gpu_gb"] = mem.get(os.getpid())
            got, row["tok_s_1"] = decode_rate(cluster, tokens)
            row["identical"] = got == want
            row[f"tok_s_{SESSIONS}"] = many_rate(cluster, tokens)
        finally:
            for p in procs:
                p.kill()
                p.wait()
    return row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    import transformers

    print(f"torch {torch.__version__} transformers {transformers.__version__} "
          f"device {torch.cuda.get_device_name(0)}", flush=True)
    os.makedirs(CACHE, exist_ok=True)
    path = build(os.path.join(CACHE, f"moe-{args.layers}"), args.layers)
    config = distllm._load_config(distllm._ModelFiles(path))
    b16 = distllm._layer_bytes(config, "none", torch.bfloat16)
    b4 = distllm._layer_bytes(config, "nf4", torch.bfloat16)
    log(f"planner: a layer {b16 / 2**30:.2f} GiB in bf16, {b4 / 2**30:.2f} GiB in nf4 ({b4 / b16:.2f}x)")
    plain = plain_transformers(path, args.tokens)
    log(json.dumps(plain))
    decode = distllm._reference_decoder(path, "nf4")  # the workers' padded step, in one process
    torch.cuda.reset_peak_memory_stats()
    want, _ = decode(PROMPT, args.tokens)
    del decode
    gc.collect()
    torch.cuda.empty_cache()
    log("reference done")
    ours = distllm_run(path, args.tokens, want)
    log(json.dumps(ours))
    print(f"\n| run | GPU GB | tok/s 1 stream | tok/s {SESSIONS} sessions | tokens = reference |")
    print("|---|---:|---:|---:|---|")
    print(f"| transformers + bitsandbytes 4-bit (experts {plain['experts_dtype']}) | {plain['gpu_gb']:.2f} | "
          f"{plain['tok_s_1']:.1f} | {plain[f'tok_s_{SESSIONS}']:.1f} | — |")
    workers_gb = sum(w["gpu_gb"] or 0 for w in ours["workers"])
    print(f"| distllm, 4 workers, nf4 experts | {workers_gb:.2f} (workers) + {ours['host_gpu_gb'] or 0:.2f} (host) | "
          f"{ours['tok_s_1']:.1f} | {ours[f'tok_s_{SESSIONS}']:.1f} | {ours['identical']} |")
    for w in ours["workers"]:
        print(f"  {w['name']}: layers {w['layers']}, {w['gpu_gb']} GB")
    return 0 if ours["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
