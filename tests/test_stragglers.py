"""A slow node, seen by the host and routed around, with real `distllm join` processes: one of them is
throttled from outside (stopped 30 ms of every 40). What it reports of its own compute does not change;
what its steps cost at the host does, and its range moves to the standby (make before break) with every
token unchanged. Throughput figures: bench/stragglers.py."""

from __future__ import annotations

import logging
import os
import time

import distllm
from conftest import wait_for
from netem import Throttle, join_processes, memory_fraction_for

PROMPT = list(range(3, 19))


def test_a_throttled_worker_is_measured_and_its_range_moves_to_the_standby(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="distllm")
    with distllm.host("tiny", quant="none", workers=3, bind="127.0.0.1", calibrate=False, rebalance_s=1.0, max_stages=2,
                      move_cooldown_s=5.0, direct_links=False) as cluster:
        core = cluster._core
        # Each worker holds half the model: two stages (at most) and a standby.
        cluster.config.memory_fraction = memory_fraction_for(core.n_layers // 2, core._layer_bytes + core._kv_bytes)
        names = ["a", "b", "c"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with join_processes(cluster.join_string, names, str(tmp_path), env=env) as procs:
            cluster.wait_ready(120)
            plan = cluster.layer_map()
            assert len(plan) == 2, plan
            want = cluster.generate(PROMPT, max_new_tokens=24)
            slow = plan[0][2]  # the first stage's holder
            standby = next(n for n in names if n not in {name for _, _, name in plan})
            with Throttle(procs[names.index(slow)].pid) as throttle:
                for _ in range(3):  # figures taken while it is well
                    assert cluster.generate(PROMPT, max_new_tokens=24) == want
                throttle.on = lambda: True
                t0 = time.monotonic()
                while not any(slow in why and "costs" in why for _, why in core._moves):
                    assert cluster.generate(PROMPT, max_new_tokens=24) == want
                    assert time.monotonic() - t0 < 90, f"no move off {slow}: {cluster.workers()}"
                figures = {w["name"]: w for w in cluster.workers()}
                assert figures[slow]["cost_ms"] > 2 * figures[slow]["compute_ms"], figures[slow]
                wait_for(lambda: all(name != slow for _, _, name in cluster.layer_map()), 60,
                         f"{slow}'s range to move off it")
                assert standby in {name for _, _, name in cluster.layer_map()}
                for _ in range(3):
                    assert cluster.generate(PROMPT, max_new_tokens=24) == want
                throttle.on = lambda: False  # it recovers: its pings say so after a while
                wait_for(lambda: any(f"worker {slow} is fast again" in r.getMessage() for r in caplog.records), 60,
                         f"{slow} seen as recovered")
            assert cluster.generate(PROMPT, max_new_tokens=24) == want
