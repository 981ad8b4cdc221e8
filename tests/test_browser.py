"""The host notebook in JupyterLab, driven by Debian's chromium through Playwright.

A real JupyterLab server and kernel run the host notebook (its last cell, which
closes the cluster, left out); two worker processes find the host through its
store, as `python -m distllm join --store` does on a worker machine. The model is the
trained SmolLM2-135M-Instruct (GGUF). The test reads the live panel the way a person
does: the nodes it lists, and a question typed into its prompt box, answered through the
chat template and streamed into the page piece by piece (equal to transformers' answer).
Set DISTLLM_SCREENSHOT=docs/panel.png to keep the panel's screenshot.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import urllib.request

import nbformat
import pytest

import distllm
from conftest import reference_generate, wait_for
from nbrun import ROOT, prepare

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PROMPT = "What is a GPU? Answer in two sentences."
WORKERS = ("cpu-worker-1", "cpu-worker-2")  # two `distllm join` processes on this machine's CPU


def chat_reference(question: str, max_new_tokens: int) -> str:
    """The answer transformers' generate gives with SmolLM2's GGUF file, as the panel's chat shows it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(distllm._trained_model_path())
    with distllm._transformers_quiet():
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    ids = distllm.chat_prompt_ids(tokenizer, [{"role": "user", "content": question}])
    return distllm._completion_text(tokenizer, ids, reference_generate(model, ids, max_new_tokens))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on loopback serving tmp_path; yields its base URL and token."""
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg"), "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "ws"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "run")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
         f"--ServerApp.root_dir={tmp_path}", f"--IdentityProvider.token={token}", "--LabApp.news_url=None",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--LabApp.extension_manager=readonly",
         "--allow-root"],
        env=env, stdout=open(tmp_path / "lab.log", "w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: server_up(f"{base}/api/status?token={token}") or proc.poll() is not None, 90,
                 "JupyterLab to start")
        assert proc.poll() is None, (tmp_path / "lab.log").read_text()
        yield base, token
    finally:
        proc.terminate()
        proc.wait(30)


def test_panel_in_jupyterlab_lists_workers_and_streams_a_typed_prompt(tmp_path, lab):
    if not os.path.exists(CHROMIUM):
        pytest.fail("Debian's chromium is needed for this test: apt-get install chromium")
    from playwright.sync_api import expect, sync_playwright

    base, token = lab
    # The screenshot for the README shows a store path a user would have (cleared afterwards).
    store = os.path.expanduser("~/distllm-state") if os.environ.get("DISTLLM_SCREENSHOT") else tmp_path / "store"
    shutil.rmtree(store, ignore_errors=True)
    nb = prepare("notebooks/host.ipynb", MODEL='"smollm2"', QUANT='"none"', STORE=repr(str(store)),
                 OPTIONS='{"bind": "127.0.0.1", "workers": 2, "stages": 2, "dtype": "float32"}')
    assert nb.cells[-1].source == "cluster.close()"
    nb.cells = nb.cells[:-1]  # keep the cluster running for the panel
    nbformat.write(nb, tmp_path / "host.ipynb")
    workers = [subprocess.Popen([sys.executable, "-m", "distllm", "join", "--store", str(store), "--name", name],
                                cwd=ROOT, stdout=open(tmp_path / f"{name}.log", "w"), stderr=subprocess.STDOUT)
               for name in WORKERS]
    expected = chat_reference(PROMPT, 48)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1500, "height": 1300})
            page.goto(f"{base}/lab/tree/host.ipynb?token={token}")
            expect(page.locator(".jp-Notebook")).to_be_visible(timeout=60_000)
            expect(page.get_by_text("Python 3 (ipykernel) | Idle")).to_be_visible(timeout=60_000)
            for attempt in range(3):  # on a busy machine the menu may still be greyed out at first
                page.get_by_role("menuitem", name="Run", exact=True).click()
                page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
                try:
                    expect(page.locator(".jp-InputPrompt", has_text="[1]:")).to_have_count(1, timeout=20_000)
                    break
                except AssertionError:
                    page.keyboard.press("Escape")
            else:
                page.screenshot(path=str(tmp_path / "not-running.png"))
                raise AssertionError(f"Run All Cells did not run the notebook (see {tmp_path / 'not-running.png'})")

            panel = page.locator(".distllm-panel")
            expect(panel).to_be_visible(timeout=120_000)
            table = panel.locator("table").first
            for name in WORKERS:
                expect(table.get_by_text(name)).to_be_visible(timeout=120_000)
            expect(panel.locator(".rep")).to_have_count(2, timeout=60_000)  # the layer map: two stages
            expect(panel.locator("td", has_text="job first-job")).to_be_visible(timeout=120_000)  # the notebook's job

            page.evaluate("""() => {  // record every text the answer shows while it streams
                window.seen = [];
                new MutationObserver(() => {
                    const pre = document.querySelector('.distllm-panel pre.answer');
                    const last = window.seen[window.seen.length - 1];
                    if (pre && last !== pre.textContent) window.seen.push(pre.textContent);
                }).observe(document.querySelector('.distllm-panel'), {subtree: true, childList: true,
                                                                      characterData: true});
            }""")
            panel.locator("textarea").fill(PROMPT)
            max_tokens = panel.locator("input[type='number']").first
            max_tokens.fill("48")
            max_tokens.press("Tab")  # the widget syncs its value on change
            panel.get_by_role("button", name="Generate").click()
            expect(panel.get_by_text("answered:")).to_be_visible(timeout=60_000)
            seen = page.evaluate("window.seen")
            assert seen[-1] == expected
            assert len(seen) >= 3 and all(expected.startswith(s) for s in seen), seen  # it came in pieces
            panel.scroll_into_view_if_needed()
            shot = tmp_path / "panel.png"
            panel.screenshot(path=str(shot))
            if os.environ.get("DISTLLM_SCREENSHOT"):
                shutil.copy(shot, os.path.join(ROOT, os.environ["DISTLLM_SCREENSHOT"]))
            assert shot.stat().st_size > 10_000
            browser.close()
    finally:
        for p in workers:
            p.kill()
            p.wait(30)
        if os.environ.get("DISTLLM_SCREENSHOT"):
            shutil.rmtree(store, ignore_errors=True)
