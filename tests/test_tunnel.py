"""Workers reach the host through a relay speaking bore's protocol; CURVE runs end to end."""

from __future__ import annotations

import pytest

import distllm
from borerelay import BoreRelay
from conftest import prompt_of, reference_generate, reference_model


@pytest.mark.parametrize("secret", [None, "s3cret"])
def test_generation_through_a_bore_relay(model_dir, secret):
    path = model_dir("llama")
    relay = BoreRelay(secret=secret)
    try:
        spec = f"bore://{secret + '@' if secret else ''}127.0.0.1:{relay.control_port}"
        with distllm.local(path, workers=2, stages=2, quant="none", tunnel=spec) as cluster:
            endpoint = distllm.JoinInfo.parse(cluster.join_string).endpoint
            assert endpoint != f"tcp://127.0.0.1:{cluster.port}", "the join string must carry the relay's port"
            got = cluster.generate(prompt_of(12), max_new_tokens=16)
        assert relay.visitors >= 2  # both workers came in through the relay
        assert got == reference_generate(reference_model(path), prompt_of(12), 16)
    finally:
        relay.close()


def test_wrong_bore_secret_is_refused_clearly(model_dir):
    relay = BoreRelay(secret="right")
    try:
        with pytest.raises(distllm.DistllmError, match="refused the tunnel"):
            distllm.host(model_dir("llama"), tunnel=f"bore://wrong@127.0.0.1:{relay.control_port}")
        with pytest.raises(distllm.DistllmError, match="asked for no secret|wants a secret|refused"):
            distllm.host(model_dir("llama"), tunnel=f"bore://127.0.0.1:{relay.control_port}")
    finally:
        relay.close()


def test_bad_tunnel_spec_is_named(model_dir):
    with pytest.raises(ValueError, match="tunnel='ssh://x'"):
        distllm.host(model_dir("llama"), tunnel="ssh://x")
