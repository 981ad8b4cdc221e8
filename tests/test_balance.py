"""Placement: the planner's promises as pure-function tests, and a real local cluster where a
worker slowed on purpose loses layers in a rebalance and tokens/s rises, output unchanged."""

from __future__ import annotations

import random
import threading
import time

import pytest

import distllm
from distllm import NodeProfile, moved_layers, plan_cost, plan_stages, worth_rebalancing


def _covers(plan, n_layers):
    assert plan[0].start == 0 and plan[-1].end == n_layers
    assert all(a.end == b.start and a.start < a.end for a, b in zip(plan, plan[1:]))


@pytest.mark.parametrize("seed", range(40))
def test_memory_is_never_exceeded_and_every_layer_is_served_while_capacity_exists(seed):
    rng = random.Random(seed)
    n_layers = rng.choice([8, 32, 80])
    nodes = [NodeProfile(i, rng.randint(0, n_layers // 2), rng.uniform(0.3, 4.0), rng.uniform(0, 150),
                         rng.choice([0.0, 0.05, 0.5, 2.0])) for i in range(rng.randint(1, 12))]
    replicas = rng.choice([1, 2, 3])
    plan = plan_stages(n_layers, nodes, replicas=replicas, concurrency=rng.choice([1, 8, 32]))
    if sum(n.capacity for n in nodes) < n_layers:
        assert plan is None
        return
    assert plan is not None, "capacity exists, so every layer must be placed"
    _covers(plan, n_layers)
    cap = {n.id: n.capacity for n in nodes}
    holders = [w for s in plan for w in s.workers]
    assert len(holders) == len(set(holders)), "a node holds one range"
    for stage in plan:
        assert 1 <= len(stage.workers) <= replicas
        for w in stage.workers:
            assert stage.layers <= cap[w], f"node {w} holds {stage.layers} layers, room for {cap[w]}"


def test_faster_nodes_get_proportionally_more_layers():
    nodes = [NodeProfile("fast", 64, 1.0), NodeProfile("mid", 64, 2.0), NodeProfile("slow", 64, 4.0)]
    plan = plan_stages(35, nodes, stages=3)
    layers = {s.workers[0]: s.layers for s in plan}
    assert layers == {"fast": 20, "mid": 10, "slow": 5}


def test_memory_caps_a_fast_node_and_the_rest_moves_on():
    nodes = [NodeProfile("fast", 6, 1.0), NodeProfile("slow", 64, 4.0)]
    plan = plan_stages(32, nodes)
    assert {s.workers[0]: s.layers for s in plan} == {"fast": 6, "slow": 26}


def test_one_fast_node_that_holds_everything_serves_alone_at_one_stream_and_is_split_under_load():
    nodes = [NodeProfile(i, 32, 1.0, rtt_ms=50.0) for i in range(4)]
    assert len(plan_stages(32, nodes, concurrency=1)) == 1  # each extra stage only adds a round trip
    assert len(plan_stages(32, nodes, concurrency=32)) == 4  # pipelining pays when sessions pile up


def test_unstable_and_deadline_bound_ranges_get_replicas_first():
    # Three ranges need three holders; "flaky" is quick enough to hold one, and its range
    # (hazard 0.3/h: a short record, or a deadline near) is the one that gets the spare.
    nodes = [NodeProfile("steady", 8, 1.0, hazard=0.02), NodeProfile("flaky", 8, 0.7, hazard=0.3),
             NodeProfile("calm", 8, 1.0, hazard=0.03), NodeProfile("spare", 8, 1.0, hazard=0.03)]
    plan = plan_stages(24, nodes, replicas=2, stages=3)
    assert {s.workers[0]: s.workers for s in plan} == {"steady": ["steady"], "calm": ["calm"],
                                                        "flaky": ["flaky", "spare"]}


def test_a_replica_much_slower_than_its_range_is_not_paired_with_it():
    nodes = [NodeProfile("fast", 16, 0.2, hazard=2.0), NodeProfile("slow", 16, 1.0, hazard=0.0)]
    plan = plan_stages(16, nodes, replicas=2, stages=1)
    assert [s.workers for s in plan] == [["fast"]] or [s.workers for s in plan] == [["slow"]]


def test_an_unstable_node_gets_fewer_layers_than_an_equally_fast_stable_one():
    nodes = [NodeProfile("stable", 32, 1.0, hazard=0.0), NodeProfile("unstable", 32, 1.0, hazard=1.0)]
    layers = {s.workers[0]: s.layers for s in plan_stages(30, nodes, stages=2)}
    assert layers["stable"] > layers["unstable"]


def test_an_unchanged_swarm_keeps_its_plan_and_a_small_gain_moves_nothing():
    nodes = [NodeProfile("a", 32, 1.0, held=(16, 32)), NodeProfile("b", 32, 1.0, held=(0, 16))]
    plan = plan_stages(32, nodes, stages=2)
    assert [(s.start, s.end, s.workers) for s in plan] == [(0, 16, ["b"]), (16, 32, ["a"])]  # as held
    by_id = {n.id: n for n in nodes}
    assert moved_layers(plan, plan_stages(32, nodes, stages=2)) == 0
    assert not worth_rebalancing(plan, plan_stages(32, nodes, stages=2), by_id, concurrency=8)
    slightly = {**by_id, "a": NodeProfile("a", 32, 1.1, held=(16, 32))}  # 10% slower: not worth a move
    assert not worth_rebalancing(plan, plan_stages(32, list(slightly.values()), stages=2), slightly, concurrency=8)
    much = {**by_id, "a": NodeProfile("a", 32, 4.0, held=(16, 32))}  # 4x slower: move
    proposal = plan_stages(32, list(much.values()), stages=2)
    assert worth_rebalancing(plan, proposal, much, concurrency=8)
    assert plan_cost(proposal, much, concurrency=8) < 0.8 * plan_cost(plan, much, concurrency=8)
    assert moved_layers(plan, proposal) < 32  # only the boundary moves, not every layer


def test_a_new_node_joining_a_balanced_cluster_moves_nothing():
    nodes = [NodeProfile("a", 32, 1.0, held=(0, 16)), NodeProfile("b", 32, 1.0, held=(16, 32))]
    plan = plan_stages(32, nodes, stages=2)
    joined = [*nodes, NodeProfile("c", 32, 1.0)]
    assert moved_layers(plan, plan_stages(32, joined, stages=2)) == 0


# -- a real cluster ------------------------------------------------------------------


def _tokens_per_second(cluster, prompts, tokens):
    out, threads = {}, []

    def run(i, p):
        out[i] = cluster.generate(p, max_new_tokens=tokens)

    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        threads.append(threading.Thread(target=run, args=(i, p)))
        threads[-1].start()
    for t in threads:
        t.join(120)
    return len(prompts) * tokens / (time.perf_counter() - t0), [out[i] for i in range(len(prompts))]


def test_a_slowed_worker_loses_layers_and_tokens_per_second_rise():
    prompts = [f"balance {i}" for i in range(6)]
    cluster = distllm.host("tiny", workers=2, stages=2, quant="none", bind="127.0.0.1", rebalance_s=0)
    try:
        cluster.spawn_local(1, worker_threads=1)
        cluster.spawn_local(1, worker_threads=1, test_step_delay_ms=5.0)  # local-1 plays a slow node
        cluster.wait_ready(60)
        before_map = {name: last - first + 1 for first, last, name in cluster.layer_map()}
        assert set(before_map) == {"local-0", "local-1"}  # calibration cannot see the delay (near-even split)
        slow_rate, reference = _tokens_per_second(cluster, prompts, 24)
        cluster.rebalance()
        deadline = time.monotonic() + 60
        while cluster.stats()["rebalances"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cluster.stats()["rebalances"] == 1, cluster.status
        cluster.wait_ready(60)
        after_map = {name: last - first + 1 for first, last, name in cluster.layer_map()}
        fast_rate, after = _tokens_per_second(cluster, prompts, 24)
        cluster.rebalance()  # measured again on the new ranges: no further move (hysteresis)
        time.sleep(0.5)
        assert cluster.stats()["rebalances"] == 1
    finally:
        cluster.close()
    assert after_map["local-1"] < before_map["local-1"] and after_map["local-1"] < after_map["local-0"], (
        before_map, after_map)
    assert after == reference  # token-identical across the move
    assert fast_rate > 1.5 * slow_rate, (slow_rate, fast_rate)


# -- the swarm simulator (drives the same planner) -------------------------------------


def test_simulated_t4_swarm_planner_with_replicas_completes_everything_and_beats_the_equal_split():
    rows = {r["policy"]: r for r in distllm.simulate(seeds=[0], hours=6.0, gpus=["T4"] * 10,
                                                     policies=("equal", "replicas"))}
    equal, replicas = rows["equal"], rows["replicas"]
    assert replicas["failed"] == 0 and replicas["completed"] > 0
    assert replicas["goodput"] > 1.2 * equal["goodput"], (equal, replicas)
    assert replicas["p99_ms"] < equal["p99_ms"], (equal, replicas)
    assert replicas["stalled"] <= equal["stalled"]


def test_simulator_is_deterministic_per_seed_and_refuses_unknown_policies():
    a = distllm.SwarmSimulator("planner", seed=3, hours=0.5).run()
    b = distllm.SwarmSimulator("planner", seed=3, hours=0.5).run()
    assert a == b and a["goodput"] > 0
    with pytest.raises(ValueError, match="policy"):
        distllm.SwarmSimulator("random")
