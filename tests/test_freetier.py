"""What free-tier users really run: pre-quantized checkpoints, GPUs without bfloat16, real generation
settings.

Pre-quantized bitsandbytes checkpoints (the `*-bnb-4bit` repos most free-tier users download, and
8-bit ones) are served as they are stored: workers read their layers' packed 4-bit weights and quant
states into `Linear4bit` (int8 weights and row scales into `Linear8bitLt`) with no 16-bit copy and
fetch only their share of the files; the tokens equal that model's in one process.

The checkpoints are written by transformers + bitsandbytes on the CPU (`save_pretrained` of a model
loaded with `BitsAndBytesConfig(load_in_4bit=True)` or `load_in_8bit=True`), exactly what such a Hub
repo holds.
"""

from __future__ import annotations

import functools
import json
import os

import bitsandbytes as bnb
import pytest
import torch

import distllm
from conftest import prompt_of, reference_generate, write_model
from fakehub import FakeHub


def _write_bnb(tmp_path_factory, *, quant_type: str, double: bool, layers: int = 6) -> str:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    src = write_model(str(tmp_path_factory.mktemp("float")), "llama", layers=layers)
    bnb_config = BitsAndBytesConfig(load_in_8bit=True) if quant_type == "int8" else BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double,
        bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, quantization_config=bnb_config)
    out = str(tmp_path_factory.mktemp(f"bnb-{quant_type}-{double}"))
    model.save_pretrained(out, max_shard_size="60KB")  # several shards: a worker fetches only its own
    distllm._tiny_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=[("nf4", False), ("nf4", True), ("fp4", False), ("int8", False)],
                ids=["nf4", "nf4-double", "fp4", "int8"])
def bnb_dir(request, tmp_path_factory):
    quant_type, double = request.param
    return _write_bnb(tmp_path_factory, quant_type=quant_type, double=double)


def _reference(path: str, prompt: list[int], tokens: int) -> list[int]:
    """The same 4- or 8-bit checkpoint loaded by transformers in this process."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return reference_generate(model, prompt, tokens)


@pytest.mark.parametrize("workers", [1, 3])
def test_a_bnb_checkpoint_serves_the_tokens_of_that_model_in_one_process(bnb_dir, workers):
    prompt = prompt_of(11)
    want = _reference(bnb_dir, prompt, 20)
    with distllm.local(bnb_dir, workers=workers, stages=workers, calibrate=False) as cluster:
        assert cluster.generate(prompt, max_new_tokens=20) == want


def test_a_workers_layers_are_the_stored_packed_weights_with_no_16_bit_copy(bnb_dir):
    files = distllm._ModelFiles(bnb_dir)
    config = distllm._load_config(files)
    shard = distllm.StageShard(files, config, 2, 4, quant="nf4", dtype=torch.float32, device=torch.device("cpu"))
    from safetensors import safe_open

    with open(os.path.join(bnb_dir, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    name = "model.layers.3.mlp.down_proj.weight"
    with safe_open(os.path.join(bnb_dir, weight_map[name]), "pt") as f:
        stored = f.get_tensor(name)
    q = shard.layers[1].mlp.down_proj
    quantization = json.load(open(os.path.join(bnb_dir, "config.json")))["quantization_config"]
    if quantization["load_in_8bit"]:
        assert isinstance(q, bnb.nn.Linear8bitLt) and not q.training
        assert q.weight.dtype == torch.int8 and torch.equal(q.weight.data, stored)  # as stored, not re-quantized
        with safe_open(os.path.join(bnb_dir, weight_map[name]), "pt") as f:
            assert torch.equal(q.weight.SCB, f.get_tensor(name.replace(".weight", ".SCB")))
        assert q.state.threshold == quantization["llm_int8_threshold"]
    else:
        assert isinstance(q, bnb.nn.Linear4bit) and not q.training
        assert q.weight.dtype == torch.uint8 and torch.equal(q.weight.data, stored)  # as stored, not re-quantized
        assert q.weight.quant_state.quant_type == quantization["bnb_4bit_quant_type"]
    floats = [n for n, p in shard.layers.named_parameters() if p.is_floating_point() and p.dim() == 2]
    assert floats == []  # no 16- or 32-bit matrix anywhere in the stage


def test_workers_fetch_only_their_share_of_a_4bit_repo_and_the_planner_counts_its_real_bytes(bnb_dir, tmp_path):
    with FakeHub({"me/tiny-bnb-4bit": bnb_dir}) as hub:
        files = distllm._ModelFiles("me/tiny-bnb-4bit", endpoint=hub.endpoint, cache_dir=str(tmp_path))
        config = distllm._load_config(files)
        distllm.StageShard(files, config, 3, 6, quant="nf4", dtype=torch.float32, device=torch.device("cpu"))
        fetched = {f for f in hub.downloads("me/tiny-bnb-4bit") if f.endswith(".safetensors")}
    with open(os.path.join(bnb_dir, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    share = {weight_map[k] for k in weight_map if any(k.startswith(f"model.layers.{i}.") for i in range(3, 6))}
    assert fetched == share and len(fetched) < len(set(weight_map.values()))
    # The planner's bytes per layer: what the checkpoint stores for one layer (packed weights and states).
    estimate = distllm._layer_bytes(config, "nf4", torch.float32)
    stored = _stored_bytes(bnb_dir, weight_map, "model.layers.0.")
    assert 0.8 < estimate / stored < 1.25, (estimate, stored)


def _stored_bytes(path: str, weight_map: dict, prefix: str) -> int:
    from safetensors import safe_open

    total = 0
    for file in sorted(set(weight_map.values())):
        with safe_open(os.path.join(path, file), "pt") as f:
            total += sum(f.get_tensor(k).nbytes for k in f.keys() if k.startswith(prefix))
    return total


def test_other_quantized_checkpoints_are_refused_naming_what_works(tmp_path):
    path = write_model(str(tmp_path / "gptq"), "llama")
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(distllm.UnsupportedModelError, match="gptq.*bitsandbytes"):
        distllm._load_config(distllm._ModelFiles(path))


def test_a_checkpoint_no_worker_can_load_fails_within_seconds_with_the_workers_reason(tmp_path):
    """A checkpoint missing one layer's tensors: the host reads it, every worker fails to load it. Requests
    and local() fail at once with the workers' reason instead of waiting out wait_timeout_s (600 s)."""
    import time

    from safetensors.torch import load_file, save_file

    path = write_model(str(tmp_path / "broken"), "llama")
    weights = load_file(os.path.join(path, "model.safetensors"))
    save_file({k: v for k, v in weights.items() if not k.startswith("model.layers.1.")},
              os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    t0 = time.monotonic()
    with pytest.raises(distllm.ClusterNotReadyError, match="no worker could load the model.*lacks"):
        distllm.local(path, workers=2, quant="none", calibrate=False)
    assert time.monotonic() - t0 < 60
    with distllm.host(path, quant="none", calibrate=False, workers=1) as cluster:
        cluster.spawn_local(1)
        with pytest.raises(distllm.ClusterNotReadyError, match="lacks"):
            cluster.generate(prompt_of(5), max_new_tokens=4)
        with pytest.raises(distllm.ClusterNotReadyError, match="lacks"):
            cluster.wait_ready(60)
        assert "no worker could load the model" in cluster.status


# -- precision from each worker's own GPU -------------------------------------------------------------


@pytest.mark.parametrize("capability, want", [((7, 5), torch.float16), ((6, 0), torch.float16),
                                              ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_the_compute_dtype_follows_the_workers_own_gpu(monkeypatch, capability, want):
    """A T4 (7.5) or P100 (6.0) computes a bfloat16 model in float16, an A100 (8.0) in bfloat16; the
    capability asked is the worker's device's, and torch.cuda.is_bf16_supported() (True on a T4) is not."""
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    config = type("Config", (), {"dtype": "bfloat16"})()
    device = torch.device("cuda:3")
    assert distllm._compute_dtype(config, "auto", device) == want
    assert distllm._compute_dtype(config, "bfloat16", device) == want  # the host's bfloat16 too
    assert distllm._compute_dtype(config, "float32", device) == torch.float32
    assert asked and all(d == device for d in asked)
    assert distllm._compute_dtype(config, "auto", torch.device("cpu")) == torch.bfloat16


def _overflowing_model(tmp_path) -> str:
    """A tiny llama whose layer 1 multiplies the residual stream past float16's 65504 (float32 copes)."""
    from safetensors.torch import load_file, save_file

    path = write_model(str(tmp_path / "overflow"), "llama")
    weights = load_file(os.path.join(path, "model.safetensors"))
    weights["model.layers.1.mlp.down_proj.weight"] *= 3e4
    save_file(weights, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return path


def test_a_float16_overflow_fails_the_request_at_once_naming_the_cause_and_the_fix(tmp_path):
    path = _overflowing_model(tmp_path)
    prompt = prompt_of(6)
    with distllm.local(path, workers=2, stages=2, quant="none", dtype="float32", calibrate=False) as cluster:
        assert len(cluster.generate(prompt, max_new_tokens=4)) >= 1  # float32: finite
    with distllm.local(path, workers=2, stages=2, quant="none", dtype="float16", calibrate=False) as cluster:
        with pytest.raises(distllm.StepFailedError, match=r"float16 overflow in layers 0\.\.1.*dtype='float32'"):
            cluster.generate(prompt, max_new_tokens=4)
        assert cluster.stats()["failures"] == 0  # nobody was blamed: the numbers overflow wherever they run
        with pytest.raises(distllm.StepFailedError, match="float16 overflow"):  # and again, at once
            cluster.generate(prompt_of(9), max_new_tokens=4, timeout=30)


# -- generation settings ---------------------------------------------------------------------------------


def test_generation_stops_at_every_eos_id_generation_config_lists(tmp_path):
    """Llama-3.1-Instruct's generation_config.json lists three end tokens, config.json one: a generation
    stops at any of them, as transformers' generate (which reads the same file) does."""
    from conftest import reference_model

    path = write_model(str(tmp_path / "gen"), "llama")
    prompt = prompt_of(9)
    free = reference_generate(reference_model(path), prompt, 24)
    stop = next(t for i, t in enumerate(free) if i >= 4 and t not in free[:i] and t != 2)  # a token it makes
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": [2, 97, stop]}, f)
    want = reference_generate(reference_model(path), prompt, 24)
    assert want == free[:free.index(stop) + 1]  # transformers stops there too
    with distllm.local(path, workers=2, stages=2, quant="none", calibrate=False) as cluster:
        assert cluster.head.eos_ids == {2, 97, stop}
        assert cluster.generate(prompt, max_new_tokens=24) == want


# The public chat templates of four families (as their tokenizer_config.json files carry them).
CHAT_TEMPLATES = {
    "llama3": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
        "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
        "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
        "{{ content }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
        ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    "qwen2.5": (
        "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
        "'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You "
        "are a helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- for message in messages %}{%- if "
        "(message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message.role == "
        "\"assistant\") %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
        "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}",
        ["<|im_start|>", "<|im_end|>"]),
    "gemma": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
        "supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != "
        "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
        "user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set "
        "role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + "
        "'\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}"
        "{{'<start_of_turn>model\\n'}}{% endif %}",
        ["<start_of_turn>", "<end_of_turn>"]),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 "
        "== 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif "
        "message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only "
        "user and assistant roles are supported!') }}{% endif %}{% endfor %}",
        ["[INST]", "[/INST]"]),
}


@pytest.mark.parametrize("style", sorted(CHAT_TEMPLATES))
def test_chat_prompt_ids_equal_transformers_apply_chat_template(style, tmp_path):
    from transformers import AutoTokenizer

    template, specials = CHAT_TEMPLATES[style]
    tokenizer = distllm._tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.chat_template = template
    tokenizer.save_pretrained(str(tmp_path))
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))  # as a host loads it
    chat = [{"role": "user", "content": "Why is the sky blue?"},
            {"role": "assistant", "content": " Rayleigh scattering. "},
            {"role": "user", "content": "And sunsets?"}]
    want = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    want = list(want["input_ids"] if hasattr(want, "keys") else want)
    got = distllm.chat_prompt_ids(tokenizer, chat)
    assert got == want
    assert any(tokenizer.convert_ids_to_tokens(i) in specials for i in got)  # the special tokens are single ids


def test_bitsandbytes_notice_about_a_hub_kernel_is_not_printed(tmp_path):
    """On AVX512-BF16 CPUs importing bitsandbytes logged "Failed to load CPU gemm_4bit_forward from
    kernels-community: No module named 'kernels'" at every worker start; its built-in path serves."""
    import subprocess
    import sys

    code = ("import logging, torch, distllm; logging.basicConfig(); import bitsandbytes; distllm.quantize_linears("
            "torch.nn.Sequential(torch.nn.Linear(64, 64)), 'nf4', torch.float32, torch.device('cpu'))")  # (bitsandbytes
    # imported on its own after distllm, as a local worker's fork server preloads it)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "kernels-community" not in run.stderr + run.stdout


# -- Colab and Kaggle, against small fakes of their modules (tests/fakecolab.py) ------------------------


def test_a_drive_store_mounts_google_drive_in_colab_once_and_lives_in_my_drive(tmp_path, monkeypatch, caplog):
    import logging

    import fakecolab

    monkeypatch.setattr(distllm, "_DRIVE_ROOT", str(tmp_path / "content" / "drive"))
    caplog.set_level(logging.WARNING, logger="distllm")
    with fakecolab.colab() as calls:
        store = distllm.open_store("drive://distllm-state")
        store.write("probe.json", b"{}")
        assert calls["mount"] == [str(tmp_path / "content" / "drive")]
        assert (tmp_path / "content" / "drive" / "MyDrive" / "distllm-state" / "probe.json").exists()
        assert "mounting Google Drive" in caplog.text
        again = distllm.open_store(str(tmp_path / "content" / "drive" / "MyDrive" / "distllm-state"))
        assert again.read("probe.json") == b"{}" and len(calls["mount"]) == 1  # mounted already: not again


def test_a_drive_store_outside_colab_says_what_to_give_instead(monkeypatch, tmp_path):
    monkeypatch.setattr(distllm, "_DRIVE_ROOT", str(tmp_path / "nothing-mounted"))
    with pytest.raises(distllm.StoreError, match="drive:// mounts Google Drive in Colab"):
        distllm.open_store("drive://distllm-state")


def test_a_hub_token_comes_from_colab_or_kaggle_secrets_when_none_is_given(monkeypatch):
    import fakecolab

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    with fakecolab.colab({"HF_TOKEN": "hf_colab"}) as calls:
        assert distllm._platform_defaults(distllm.Config()).token == "hf_colab"
        assert distllm._platform_defaults(distllm.Config(token="hf_mine")).token == "hf_mine"  # given: kept
        assert calls["secret"] == ["HF_TOKEN"]
    with fakecolab.colab(denied=("HF_TOKEN",)):  # the notebook may not read it: no token, no error
        assert distllm._platform_defaults(distllm.Config()).token is None
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    with fakecolab.kaggle({"HF_TOKEN": "hf_kaggle"}):
        assert distllm._platform_defaults(distllm.Config()).token == "hf_kaggle"
    with fakecolab.kaggle({}):
        assert distllm._platform_defaults(distllm.Config()).token is None
    monkeypatch.setenv("HF_TOKEN", "hf_env")  # huggingface_hub reads that one itself
    with fakecolab.kaggle({"HF_TOKEN": "hf_kaggle"}):
        assert distllm._platform_defaults(distllm.Config()).token is None


def _fake_proc(tmp_path, booted: float, pid1_ticks: int):
    """A /proc with the two files a session's start is read from: the boot time and process 1's start."""
    (tmp_path / "1").mkdir(parents=True)
    (tmp_path / "stat").write_text(f"cpu  1 2 3 4\nbtime {int(booted)}\nprocesses 9\n")
    fields = ["S"] + ["0"] * 18 + [str(pid1_ticks), "0", "0"]  # state is field 3, starttime field 22
    (tmp_path / "1" / "stat").write_text("1 (tini (a) init) " + " ".join(fields) + "\n")
    return str(tmp_path)


def test_a_kaggle_worker_leaves_before_its_session_ends_and_shows_the_time_left(monkeypatch, tmp_path):
    import time

    ticks = os.sysconf("SC_CLK_TCK")
    booted = int(time.time()) - 30 * 3600  # the host kernel booted 30 h ago; this container 2 h ago
    proc = _fake_proc(tmp_path, booted, pid1_ticks=28 * 3600 * ticks)
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    monkeypatch.setattr(distllm, "_session_end", functools.partial(distllm._session_end, proc=proc))
    cfg = distllm._platform_defaults(distllm.Config(), worker=True)
    assert cfg.leave_at == booted + 28 * 3600 + 12 * 3600
    assert distllm._platform_defaults(distllm.Config(leave_at=123.0), worker=True).leave_at == 123.0  # given
    assert distllm._platform_defaults(distllm.Config()).leave_at is None  # a host has no such deadline
    worker = distllm.Worker(distllm.JoinInfo("tcp://127.0.0.1:9", None, None, None).encode(), config=cfg)
    left = (cfg.leave_at - time.time()) / 3600
    assert 9.9 < left < 10.0
    assert f"session ends in {left:.1f} h" in distllm._worker_html(worker)


def test_a_session_whose_start_cannot_be_told_sets_no_deadline(monkeypatch, tmp_path, caplog):
    import time

    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    old = _fake_proc(tmp_path / "a", int(time.time()) - 40 * 3600, pid1_ticks=25)  # btime is the host's boot
    assert distllm._session_end(proc=old) is None  # not "leave now": the guess is wrong, the session is not over
    assert "end cannot be told" in caplog.text
    assert distllm._session_end(proc=str(tmp_path / "none")) is None  # no /proc at all
    real = distllm._session_end()  # this machine's own /proc: a deadline in the future, or none
    assert real is None or real[1] > time.time()


def test_the_panel_turns_on_colabs_widget_manager_before_it_shows(capsys):
    import fakecolab

    class Owner:
        _panel = None

        def __repr__(self):
            return "<owner>"

    widget = type("Panel", (), {"widget": type("W", (), {"model_id": "abc"})()})()
    with fakecolab.colab() as calls:
        distllm._show("<b>snapshot</b>", lambda: widget, Owner())
        assert calls["widget_manager"] == [True]


def test_a_worker_held_to_a_share_of_its_gpu_reports_that_share_not_the_cards_free_memory(monkeypatch):
    """Four T4-sized workers on one 140 GB card, each held to 15 GB: the planner must see 15 GB each."""
    gb = 2**30

    def share(fraction):  # as torch's: a torch.device needs its index ("cuda" alone raised, on a real H100)
        def get(device):
            if isinstance(device, torch.device) and device.index is None:
                raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{device}")
            return fraction
        return get

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (120 * gb, 140 * gb))
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", share(15 / 140), raising=False)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 1 * gb)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert distllm._available_memory(torch.device("cuda:0")) == 14 * gb
    # a worker on the default device ("cuda", what `distllm join` and local workers use): its join died here
    assert distllm._available_memory(torch.device("cuda")) == 14 * gb
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", share(1.0))  # no share set
    assert distllm._available_memory(torch.device("cuda:0")) == 120 * gb


def test_the_host_knows_how_much_each_worker_downloads_for_its_layers(tmp_path):
    """Before a worker loads, the host has the bytes of the weight files its range is in (the panel shows
    them while it loads); for a Hub repo the sizes come from HEAD requests, nothing is downloaded."""
    path = write_model(str(tmp_path / "sharded"), "llama", layers=6, max_shard_size="60KB")
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    with distllm.local(path, workers=2, stages=2, quant="none", calibrate=False) as cluster:
        for w in cluster.workers():
            start, end = w["layers"]
            files = {weight_map[k] for k in weight_map if any(k.startswith(f"model.layers.{i}.")
                                                              for i in range(start, end))}
            assert w["download_bytes"] == sum(os.path.getsize(os.path.join(path, f)) for f in files)
    with FakeHub({"me/sharded": path}) as hub:
        files = distllm._ModelFiles("me/sharded", endpoint=hub.endpoint, cache_dir=str(tmp_path / "cache"))
        name = sorted(set(weight_map.values()))[0]
        assert files.size(name) == os.path.getsize(os.path.join(path, name))
        assert not any(f.endswith(".safetensors") for f in hub.downloads("me/sharded"))  # a HEAD, not a GET
