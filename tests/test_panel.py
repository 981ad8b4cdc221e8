"""The notebook face of a cluster: HTML snapshot, live ipywidgets panel, worker status, drain.

Widgets are real ipywidgets objects driven the way a frontend drives them (clicks,
values); without a kernel their comms are ipywidgets' own no-op comms. The notebook
and browser tests (test_notebooks.py, test_browser.py) show them in real frontends.
"""

from __future__ import annotations

import html
import re
import sys
from unittest import mock

import pytest

import distllm
from conftest import reference_generate, reference_model, wait_for

PROMPT = "Why is the sky blue?"


@pytest.fixture(scope="module")
def cluster():
    with distllm.local("tiny", workers=2, stages=2, quant="none", calibrate=False) as c:
        yield c


def live_names(c):
    return sorted(w["name"] for w in c.workers() if w["state"] == "ready")


def test_snapshot_shows_join_cell_nodes_layer_map_and_stats(cluster):
    text = repr(cluster)
    assert "'tiny'" in text and "2 workers" in text and "2 stages" in text
    page = cluster._repr_html_()
    cell = html.unescape(re.search(r'<pre class="join">(.*?)</pre>', page, re.S).group(1))
    assert cell == f'import distllm\ndistllm.join("{cluster.join_string}")'
    assert distllm.JoinInfo.parse(re.search(r'join\("(.*)"\)', cell).group(1)).endpoint.startswith("tcp://127.0.0.1")
    for name in ("local-0", "local-1"):
        assert f"{name}</td>" in page
    assert page.count('<div class="seg"') == len(cluster.layer_map()) == 2
    assert "0–3 local-" in page and "4–7 local-" in page
    assert "tokens served" in page


def test_panel_streams_a_prompt_identical_to_a_single_process(cluster):
    panel = distllm._Panel(cluster)
    wait_for(lambda: sorted(panel.node.options) == live_names(cluster) == ["local-0", "local-1"], what="node list")
    panel.prompt.value, panel.max_tokens.value = PROMPT, 24
    panel.go.click()
    # The tiny model has a chat template: the prompt box is the user's turn of a chat.
    ids = distllm.chat_prompt_ids(cluster.tokenizer, [{"role": "user", "content": PROMPT}])
    model = reference_model(distllm._tiny_model_dir())
    expected = distllm._completion_text(cluster.tokenizer, ids, reference_generate(model, ids, 24))
    wait_for(lambda: "answered" in panel.message.value, what="the streamed answer")
    shown = html.unescape(re.search(r'<pre class="answer">(.*?)</pre>', panel.answer.value, re.S).group(1))
    assert shown == expected == distllm._completion_text(cluster.tokenizer, ids,
                                                         cluster.generate(ids, max_new_tokens=24))
    assert not panel.go.disabled


def test_an_answer_cut_short_goes_on_with_continue_to_the_same_text(cluster):
    """An answer stopped (Stop: the stream's stop()) or broken off after 8 tokens: Continue goes on from its
    resume token, and the panel shows the unbroken answer. (The cut is made here, not by a timed click: a
    fast machine could finish the answer before the click.)"""
    import itertools

    panel = distllm._Panel(cluster)
    ids = distllm.chat_prompt_ids(cluster.tokenizer, [{"role": "user", "content": PROMPT}])
    params = dict(max_new_tokens=60, temperature=0.8)
    s = cluster.stream(ids, **params)
    decoder, cut = distllm._TextStream(cluster.tokenizer, ids), ""
    for token in itertools.islice(s, 8):
        cut += decoder.push(token)
    s.stop()  # (the stream stays resumable from its 8th item)
    seed = int(s.resume_token.split("/")[1])
    panel._broken = (PROMPT, params, s.resume_token, cut, decoder)
    panel.more.layout.display = ""
    panel.more.click()
    wait_for(lambda: "answered" in panel.message.value, what="the rest of the answer")
    shown = html.unescape(re.search(r'<pre class="answer">(.*?)</pre>', panel.answer.value, re.S).group(1))
    whole = distllm._completion_text(cluster.tokenizer, ids, cluster.generate(ids, **params, seed=seed))
    assert shown == whole and shown.startswith(cut)
    assert panel.more.layout.display == "none" and panel._broken is None


def test_panel_buttons_show_failures_in_red_and_keep_the_panel_working(cluster, caplog):
    panel = distllm._Panel(cluster)
    drain = next(b for b in panel.widget.children[1].children if getattr(b, "description", "") == "Drain")
    checkpoint = next(b for b in panel.widget.children[1].children if getattr(b, "description", "") == "Checkpoint now")
    assert checkpoint.disabled  # no store: nothing to checkpoint to
    panel.node.options = []  # nothing chosen
    drain.click()
    assert 'class="bad"' in panel.message.value and "no node chosen" in panel.message.value
    assert "panel: drain failed" in caplog.text
    panel.prompt.value = "   "
    panel.go.click()
    assert 'class="bad"' in panel.message.value
    panel._act("kick", lambda: cluster.kick("nobody"))
    assert "no worker named 'nobody'" in html.unescape(panel.message.value)


def test_display_is_a_cached_live_widget_or_html_without_ipywidgets(cluster):
    shown = []
    with mock.patch("IPython.display.display", lambda obj, **kw: shown.append((obj, kw))):
        cluster._ipython_display_()
        cluster._ipython_display_()
        bundle = shown[0][0]
        assert shown[0][0] == shown[1][0] and shown[0][1] == {"raw": True}  # one panel, shown twice
        assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == cluster._panel.widget.model_id
        assert "distllm.join(" in bundle["text/html"]
        cached, cluster._panel = cluster._panel, None
        try:
            with mock.patch.dict(sys.modules, {"ipywidgets": None}):  # import ipywidgets now fails
                cluster._ipython_display_()
            assert "distllm.join(" in shown[2][0].data and cluster._panel is None
        finally:
            cluster._panel = cached


def test_worker_status_shows_state_layers_steps_and_memory():
    with distllm.host("tiny", quant="none", bind="127.0.0.1", calibrate=False) as c:
        worker = distllm.join(c.join_string, name="status-test", background=True)
        try:
            c.wait_ready(60)
            c.generate("hi", max_new_tokens=3)
            status = distllm._WorkerStatus(worker)
            wait_for(lambda: "ready" in status.widget.value and "steps served" in status.widget.value,
                     what="a ready status")
            assert "layers 0–7" in status.widget.value and "RAM" in status.widget.value
            assert re.search(r"([1-9]\d*) steps served", status.widget.value)
        finally:
            worker.stop()
        wait_for(lambda: "stopped" in status.widget.value, what="the stopped status")


def test_drain_moves_the_layers_away_then_lets_the_worker_go(tmp_path):
    with distllm.local("tiny", workers=2, quant="none", calibrate=False) as c:
        assert len(c.layer_map()) == 2  # equal speeds: one range each
        before = c.generate(PROMPT, max_new_tokens=16)
        with pytest.raises(KeyError, match="no live worker named 'nobody'"):
            c.drain("nobody")
        c.drain("local-0")
        wait_for(lambda: {w["name"]: w["state"] for w in c.workers()}.get("local-0") == "left", what="the drain")
        assert [m[2] for m in c.layer_map()] == ["local-1"]
        assert c.generate(PROMPT, max_new_tokens=16) == before
        proc = next(p for p in c.local_processes if p.name == "local-0")
        proc.join(30)
        assert proc.exitcode == 0  # it was told to stop, not killed
