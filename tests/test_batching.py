"""Sessions decoded together in one padded step per stage (`decode_batch`): each session's numbers are
the ones it gets alone, so a batched cluster still matches a single-process run token for token, and a
replay after a SIGKILL reproduces them."""

from __future__ import annotations

import os
import signal
import threading

import pytest
import torch

import distllm
from conftest import holder_of, prompt_of, wait_for

FAST = dict(heartbeat_s=0.2, liveness_s=1.0, quant="none", prefill_chunk=8, calibrate=False)


def _shard(files, config, batch: int) -> distllm.StageShard:
    return distllm.StageShard(files, config, 1, 4, quant="none", dtype=torch.float32, device=torch.device("cpu"),
                              batch=batch)


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma"])
def test_a_session_decoded_with_others_gets_the_numbers_it_gets_alone(family, model_dir, monkeypatch):
    # Buffers grow every 8 positions here: a session's pool grows with its longest row, so rows also
    # run at capacities they never would alone (mistral: past its sliding window of 8).
    monkeypatch.setattr(distllm, "_GRAIN", 8)
    files = distllm._ModelFiles(model_dir(family))
    config = distllm._load_config(files)
    torch.manual_seed(0)
    hidden = [torch.randn(1, 40, config.hidden_size) for _ in range(6)]
    prompts = [3, 9, 17, 4, 30, 6]  # 6 sessions, batch 4: two pools

    alone = []
    for h, p in zip(hidden, prompts):
        s = _shard(files, config, 4)
        alone.append(torch.cat([s.forward("x", h[:, :p], 0)]
                               + [s.forward("x", h[:, i:i + 1], i) for i in range(p, 40)], dim=1))

    s = _shard(files, config, 4)
    got = {k: [s.forward(f"s{k}", hidden[k][:, :p], 0)] for k, p in enumerate(prompts)}
    pos = dict(enumerate(prompts))
    rnd = 0
    while any(p < 40 for p in pos.values()):  # ever other groups: some sessions sit steps out
        rnd += 1
        group = [k for k, p in pos.items() if p < 40 and (k + rnd) % 3 != 0][:4] or [
            next(k for k, p in pos.items() if p < 40)]
        outs = s.decode([(f"s{k}", hidden[k][:, pos[k]:pos[k] + 1], pos[k]) for k in group])
        for k, out in zip(group, outs):
            got[k].append(out)
            pos[k] += 1
    assert len(s.pools) == 2 and s.pools[0].capacity >= 40
    for k in range(6):
        assert torch.equal(torch.cat(got[k], dim=1), alone[k]), f"session {k} differs from its run alone"

    # A replay (a fresh stage rebuilding the cache from the inputs) gives the first pass's numbers...
    replay = _shard(files, config, 4).forward("r", hidden[1], 0, decode_from=prompts[1])
    assert torch.equal(replay, alone[1])
    # ... and the padded step computes what the unbatched cache does, to float32 rounding.
    plain = distllm.StageShard(files, config, 1, 4, quant="none", dtype=torch.float32, device=torch.device("cpu"))
    ref = torch.cat([plain.forward("x", hidden[4][:, :30], 0)]
                    + [plain.forward("x", hidden[4][:, i:i + 1], i) for i in range(30, 40)], dim=1)
    torch.testing.assert_close(alone[4], ref, rtol=1e-4, atol=1e-4)


def test_decode_refuses_what_it_cannot_batch_and_reports_order_errors_per_step(model_dir):
    files = distllm._ModelFiles(model_dir("llama"))
    config = distllm._load_config(files)
    s = _shard(files, config, 2)
    h = torch.randn(1, 4, config.hidden_size)
    s.forward("a", h, 0)
    s.forward("b", h, 0)
    with pytest.raises(ValueError, match="two steps of one session"):
        s.decode([("a", h[:, :1], 4), ("a", h[:, :1], 5)])
    with pytest.raises(ValueError, match="3 positions in one decode batch of 2"):
        s.decode([("a", h[:, :1], 4), ("b", h[:, :1], 4), ("c", h[:, :1], 0)])
    ok, gap = s.decode([("a", h[:, :1], 4), ("b", h[:, :1], 9)])  # b's cache ends at 4
    assert ok.shape == (1, 1, config.hidden_size) and isinstance(gap, distllm.StepOrderError)
    assert s.slots["a"].length == 5 and s.slots["b"].length == 4
    with pytest.raises(ValueError, match="decode_batch"):
        distllm.Config(decode_batch=0)
    with pytest.raises(distllm.DistllmError, match="no memory on cpu for the KV buffers of 2 sessions"):
        s.slots["a"].pool.grow(1 << 44)  # 2 rows x 2^44 positions: petabytes, past any address space
    assert s.decode([("a", h[:, :1], 5)])[0].shape == (1, 1, config.hidden_size)  # and it serves on


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma"])
@pytest.mark.parametrize("rows", ["padded", "compact", "per session"])
def test_a_verify_steps_positions_are_rows_of_one_step_with_decodings_numbers(model_dir, rows, family, monkeypatch):
    """Speculation's verify step (the last token and k drafts) through a stage in one step, each position a
    row with its own cache length: bit for bit what decoding them one at a time gives; beside other
    sessions' steps, after a rejection crops it, and longer than the rows of one step. Padded: every row
    of a pool (a GPU's captured step); compact: only the rows of a pool that compute (a CPU's); per
    session: a cache per session, a lone row computed doubled and a verify step's queries attending one
    at a time (a CPU's, where the host speculates). Mistral: past its sliding window of 8 (blocks of 8)."""
    monkeypatch.setattr(distllm, "_GRAIN", 8)
    files = distllm._ModelFiles(model_dir(family))
    config = distllm._load_config(files)

    def stage() -> distllm.StageShard:
        if rows == "per session":
            s = distllm.StageShard(files, config, 1, 4, quant="none", dtype=torch.float32,
                                   device=torch.device("cpu"), decoding_rows=True)
            assert s.decoding_rows >= 2, "this CPU's products give no two row counts alike: rows not tried"
            return s
        s = _shard(files, config, 6)
        if rows == "padded":
            s.compact = 0
        else:
            assert s.compact >= 2, "this CPU's products give no two row counts alike: compact steps not tried"
        return s

    torch.manual_seed(0)
    h = torch.randn(1, 40, config.hidden_size)
    ref = stage()
    ref.forward("x", h[:, :20], 0)
    want = torch.cat([ref.forward("x", h[:, i:i + 1], i) for i in range(20, 40)], dim=1)

    s = stage()
    assert s.verify_rows == {"padded": 6, "compact": s.compact, "per session": s.decoding_rows}[rows]
    for sid in ("x", "other"):
        s.forward(sid, h[:, :20], 0)
    got = s.forward("x", h[:, 20:25], 20, decode_from=20)  # k = 4
    assert torch.equal(got, want[:, :5])
    # two drafts rejected: the next verify step starts at 23 again, beside another session's decode step
    if rows == "per session":  # (sessions go one by one there)
        got, other = s.forward("x", h[:, 23:27], 23, decode_from=20), s.forward("other", h[:, 20:21], 20)
    else:
        got, other = s.decode([("x", h[:, 23:27], 23), ("other", h[:, 20:21], 20)])
    assert torch.equal(got, want[:, 3:7]) and other.shape == (1, 1, config.hidden_size)
    got = s.forward("x", h[:, 27:40], 27, decode_from=20)  # more positions than one step's rows
    assert torch.equal(got, want[:, 7:])
    assert s.slots["x"].length == 40


def test_concurrent_sessions_share_decode_steps_and_survive_a_kill(model8):
    prompts = [prompt_of(5 + 3 * k, seed=k) for k in range(6)]
    reference = distllm._reference_decoder(model8, "none", batch=4)
    want = [reference(p, 24)[0] for p in prompts]
    # A slow step (3 ms a layer) lets the other sessions' steps queue behind it: they go in together.
    options = {**FAST, "decode_batch": 4, "test_step_delay_ms": 3.0}
    with distllm.local(model8, workers=3, stages=2, **options) as cluster:
        got: dict = {}

        def run(k: int) -> None:
            got[k] = cluster.generate(prompts[k], max_new_tokens=24)

        threads = [threading.Thread(target=run, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert [got.get(k) for k in range(6)] == want
        batched = cluster.stats()["batched"]
        assert batched >= 6 * 24 // 2, cluster.stats()  # most decode steps shared a step with others

        # Again, and SIGKILL the last stage's worker midway: the standby rebuilds the sessions' caches
        # by replaying the kept inputs one position at a time through the same padded step.
        victim = holder_of(cluster, 7)
        got.clear()
        threads = [threading.Thread(target=run, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        wait_for(lambda: cluster.stats()["batched"] >= batched + 40, what="the batched decode under way")
        os.kill(victim.pid, signal.SIGKILL)
        for t in threads:
            t.join(120)
        stats = cluster.stats()
    assert [got.get(k) for k in range(6)] == want
    assert stats["failures"] == 1 and stats["restarts"] == 0, stats


def test_a_worker_answers_each_step_of_a_batch_on_its_own(model_dir):
    # The compute thread's batch path, without sockets: good steps run together, a step out of order
    # and one of an old epoch get their own error replies, a malformed one its protocol error.
    files = distllm._ModelFiles(model_dir("llama"))
    config = distllm._load_config(files)
    worker = distllm.Worker(_join_string())
    worker._shard, worker._epoch = _shard(files, config, 4), 7
    h = torch.randn(1, 3, config.hidden_size)
    for sid in "abc":
        worker._shard.forward(sid, h, 0)

    def step(sid, start, epoch=7, **extra):
        frames = distllm.encode("forward", {"sid": sid, "step": 1, "stage": 0, "start": start, "epoch": epoch,
                                            **extra}, [h[:, :1]])
        return distllm.decode(frames, allowed={"forward"})

    replies = worker._forward_many([step("a", 3), step("b", 9), step("c", 3), step("d", 0, epoch=6),
                                    step("e", 0, decode_from="x")])
    got = [distllm.decode(r, allowed={"result", "error"}) for r in replies]
    assert [m.type for m in got] == ["result", "error", "result", "error", "error"]
    assert got[0].get("batch", int) == 2 and got[2].get("batch", int) == 2  # a and c went through together
    assert [m.get("code", str) for m in got[1:] if m.type == "error"] == ["order", "stale", "protocol"]
    assert worker._shard.slots["a"].length == 4 and worker._shard.slots["b"].length == 3
    alone = _shard(files, config, 4)
    alone.forward("a", h, 0)
    assert torch.equal(got[0].tensor(0), alone.forward("a", h[:, :1], 3))  # the numbers it gets alone


def _join_string() -> str:
    import zmq

    server_public, _ = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    return distllm.JoinInfo("tcp://127.0.0.1:9", server_public.decode(), client_public.decode(),
                            client_secret.decode()).encode()
