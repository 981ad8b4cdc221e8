"""Replicas that guard the output, with real worker processes: one stage held by two workers, one of which
computes wrong numbers (its outputs off by 30%: a faulty GPU, another build) and answers first; the correct
one is slower (20 ms a layer more). A disagreement is settled by a third opinion (here the host, which
recomputes the step: the range is small), never by who answered first."""

from __future__ import annotations

import logging

import pytest

import distllm
from conftest import wait_for

PROMPTS = [[5 + i, 17, 29 + i, 3] for i in range(8)]


@pytest.fixture(scope="module")
def reference():
    with distllm.local("tiny", workers=1, quant="none", calibrate=False) as cluster:
        return [cluster.generate(p, max_new_tokens=12) for p in PROMPTS]


def _pair(cluster):
    """The faulty worker (fast) and the correct one (slow), both holding the one stage."""
    (good,) = cluster.spawn_local(1, test_step_delay_ms=2.5)  # 20 ms a step more (8 layers)
    wait_for(lambda: any(w["state"] == "ready" for w in cluster.workers()), 60, "the correct worker")
    (bad,) = cluster.spawn_local(1, test_output_noise=0.3)
    wait_for(lambda: sum(w["state"] == "ready" and bool(w["layers"]) for w in cluster.workers()) == 2, 60,
             "both holding the stage")
    return good, bad


@pytest.mark.parametrize("verify", ["first", "agree"])
def test_the_faulty_replica_is_removed_never_the_correct_one(reference, verify, caplog):
    caplog.set_level(logging.WARNING, logger="distllm")
    with distllm.host("tiny", quant="none", workers=1, replicas=2, stages=1, calibrate=False, verify=verify,
                      bind="127.0.0.1", rebalance_s=0.0) as cluster:
        _pair(cluster)
        names = {w["name"]: w for w in cluster.workers()}
        bad = next(n for n in names if n != "local-0")
        outcomes = []
        for prompt, want in zip(PROMPTS, reference):
            try:
                got = cluster.generate(prompt, max_new_tokens=12)
                outcomes.append("same" if got == want else f"DIFFERENT {got} vs {want}")
            except distllm.RequestFailedError as exc:
                assert "found wrong" in str(exc)
                outcomes.append("failed: found wrong")
                print("the stream said:", exc)
        states = {w["name"]: w["state"] for w in cluster.workers()}
        print(verify, outcomes, states, cluster.stats()["disagreements"], cluster.stats()["removed"])
        assert states["local-0"] == "ready" and states[bad] == "failed"
        assert not any(o.startswith("DIFFERENT") for o in outcomes)
        if verify == "agree":
            assert outcomes == ["same"] * len(PROMPTS)
        else:  # requests that went on with the faulty answers before it was found fail, saying so; none is
            # done with wrong tokens (a request's "done" waits for its replicas' answers); then all are right
            failed = outcomes.count("failed: found wrong")
            assert outcomes == ["failed: found wrong"] * failed + ["same"] * (len(PROMPTS) - failed)
            assert failed < len(PROMPTS) // 2
        assert any(f"worker {bad} computed wrong numbers" in r.getMessage() for r in caplog.records)
        assert cluster.stats()["removed"] == 1
