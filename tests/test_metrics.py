"""What an operator watches: the cluster's numbers in Prometheus' text format, from `cluster.metrics()`
and the API's /metrics, parsed by prometheus_client's own parser, its counters equal to stats()."""

from __future__ import annotations

import threading

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import distllm
from conftest import prompt_of


def _parse(text: str) -> dict:
    """{sample name with its labels: value} of a scrape."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


@pytest.fixture(scope="module")
def cluster():
    with distllm.local("tiny", workers=2, quant="none", calibrate=False) as cluster:
        yield cluster


def test_metrics_scraped_during_a_run_parse_and_their_counters_match_stats(cluster):
    server = cluster.serve(port=0)
    scrapes: list[str] = []
    done = threading.Event()

    def scrape() -> None:
        with httpx.Client(timeout=30) as client:
            while not done.is_set():
                response = client.get(server.url.removesuffix("/v1") + "/metrics")
                assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
                scrapes.append(response.text)

    scraper = threading.Thread(target=scrape)
    scraper.start()
    try:
        streams = [cluster.stream(prompt_of(n), max_new_tokens=20) for n in (3, 9, 17)]
        got = [list(s) for s in streams]
    finally:
        done.set()
        scraper.join()
    assert all(got) and len(scrapes) >= 2
    for text in scrapes:  # every scrape parses
        _parse(text)
    stats = cluster.stats()
    final = _parse(cluster.metrics())
    for key, _ in distllm._ClusterCollector._COUNTERS:
        assert final[f"distllm_{key}_total"] == stats[key], key
    assert final["distllm_tokens_total"] >= sum(map(len, got))
    assert final["distllm_requests_total"] >= 3
    # one first token per request, and every later token's gap, in the histograms
    assert final["distllm_time_to_first_token_seconds_count"] == stats["requests"]
    assert final["distllm_inter_token_seconds_count"] == stats["tokens"] - stats["requests"]
    assert final['distllm_time_to_first_token_seconds_bucket{le=+Inf}'] == stats["requests"]
    assert final["distllm_workers{state=ready}"] == 2
    assert sum(v for k, v in final.items() if k.startswith("distllm_worker_layers{")) == cluster.n_layers
    assert final["distllm_requests{state=running}"] == 0 and final["distllm_store_lag_seconds"] == 0


def test_metrics_need_the_api_key_when_the_api_has_one(cluster):
    server = cluster.serve(port=0, api_key="k")
    url = server.url.removesuffix("/v1") + "/metrics"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer k"}).status_code == 200
