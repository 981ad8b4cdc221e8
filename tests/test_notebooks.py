"""The host, worker and Kaggle notebooks, executed headless by real kernels (nbclient).

The host notebook runs cell by cell in one kernel; its panel's join cell (the HTML
snapshot it leaves for frontends without widgets) is read back and handed to the
worker notebook and the Kaggle worker notebook, each executed whole by its own kernel
in another process. Their answers are compared with a single process's.
"""

from __future__ import annotations

import ast
import html
import json
import os
import re
import subprocess
import sys

import nbformat

from conftest import reference_text, wait_for
from nbrun import ROOT, client, outputs_of, prepare, stdout_of

import distllm

HAIKU = ["Write a haiku about autumn.", "Name three prime numbers.", "What is distributed inference?"]


def start_worker_notebook(path, out, env=None, **params):
    args = [sys.executable, os.path.join(ROOT, "tests", "nbrun.py"), path, str(out)]
    args += [f"{k}={v}" for k, v in params.items()]
    return subprocess.Popen(args, cwd=ROOT, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_host_worker_and_kaggle_notebooks_run_a_cluster_on_loopback(tmp_path):
    nb = prepare("notebooks/host.ipynb", MODEL='"tiny"', QUANT='"nf4"',
                 OPTIONS='{"bind": "127.0.0.1", "workers": 2}')
    workers = []
    runner = client(nb)
    with runner.setup_kernel():
        cells = iter(enumerate(nb.cells))
        for i, cell in cells:  # up to the cell that shows the panel
            runner.execute_cell(cell, i)
            if cell.source.startswith("import distllm"):
                break
        text, outputs = outputs_of(cell)
        shown = next((d for d in outputs if "text/html" in d), {})
        assert "application/vnd.jupyter.widget-view+json" in shown, f"no live panel: {text}"
        cell_shown = html.unescape(re.search(r'<pre class="join">(.*?)</pre>', shown["text/html"], re.S).group(1))
        join_string = re.fullmatch(r'import distllm\ndistllm\.join\("(.*)"\)', cell_shown).group(1)

        workers.append(start_worker_notebook("notebooks/worker.ipynb", tmp_path / "worker.ipynb",
                                             JOIN_STRING=repr(join_string)))
        workers.append(start_worker_notebook("examples/kaggle/worker.ipynb", tmp_path / "kaggle.ipynb",
                                             env={"DISTLLM_JOIN": join_string}))
        try:
            printed = {}
            for i, cell in cells:
                runner.execute_cell(cell, i)
                if cell.cell_type == "code":
                    printed[i] = (stdout_of(cell), outputs_of(cell)[0])  # (answer, all it printed)
        finally:
            for p in workers:
                try:
                    p.wait(timeout=120)  # cluster.close() in the last cell stops them
                except subprocess.TimeoutExpired:
                    p.kill()
    tiny = distllm._tiny_model_dir()
    answers = list(printed.values())
    assert answers[0][0] == reference_text(tiny, "Why is the sky blue?", 64, "nf4") + "\n", answers[0][1]
    assert answers[1][0] == "".join(repr(reference_text(tiny, p, 48, "nf4")) + "\n" for p in HAIKU), answers[1][1]

    for p, out in zip(workers, ("worker.ipynb", "kaggle.ipynb")):
        log = p.stdout.read()
        assert p.returncode == 0, f"{out} failed:\n{log}"
        executed = nbformat.read(tmp_path / out, as_version=4)
        statuses = [d.get("text/html", "") for c in executed.cells if c.cell_type == "code"
                    for d in outputs_of(c)[1]]
        assert any("distllm worker" in s for s in statuses), f"{out} showed no worker status"
        errors = [o for c in executed.cells for o in c.get("outputs", []) if o.output_type == "error"]
        assert not errors, errors


def test_notebooks_are_valid_and_badged_and_the_kaggle_kernel_asks_for_a_gpu_and_internet():
    for path in ("notebooks/host.ipynb", "notebooks/worker.ipynb"):
        nb = nbformat.read(os.path.join(ROOT, path), as_version=4)
        nbformat.validate(nb)
        badge = f"https://colab.research.google.com/github/distllm/distllm/blob/main/{path}"
        assert badge in nb.cells[0].source, f"{path} lacks its Open-in-Colab badge"
        assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{path} has outputs saved"
        for c in nb.cells:
            if c.cell_type == "code" and not c.source.startswith("%"):
                ast.parse(c.source)  # every code cell is valid Python
    meta = json.load(open(os.path.join(ROOT, "examples", "kaggle", "kernel-metadata.json")))
    assert meta["enable_gpu"] is True and meta["enable_internet"] is True and meta["is_private"] is True
    assert meta["kernel_type"] == "notebook" and os.path.exists(os.path.join(ROOT, "examples", "kaggle",
                                                                             meta["code_file"]))


def test_interrupting_the_worker_notebook_leaves_gracefully():
    from jupyter_client.manager import start_new_kernel

    with distllm.host("tiny", quant="none", bind="127.0.0.1", calibrate=False) as cluster:
        nb = prepare("notebooks/worker.ipynb", JOIN_STRING=repr(cluster.join_string))
        code = [c.source for c in nb.cells if c.cell_type == "code"]
        km, kc = start_new_kernel(kernel_name="python3", cwd=ROOT)
        try:
            for source in code[:-1]:
                assert kc.execute_interactive(source, timeout=120)["content"]["status"] == "ok"
            msg_id = kc.execute(code[-1])  # the join cell: serves until interrupted
            wait_for(lambda: [w["state"] for w in cluster.workers()] == ["ready"], 120, "the worker to serve")
            km.interrupt_kernel()  # the notebook's stop button
            reply = kc.get_shell_msg(timeout=60)
            while reply["parent_header"].get("msg_id") != msg_id:
                reply = kc.get_shell_msg(timeout=60)
            assert reply["content"]["status"] == "ok"  # the interrupt was handled: join() returned
            wait_for(lambda: [w["state"] for w in cluster.workers()] == ["left"], 30, "the host to see it leave")
            assert "it left" in cluster.workers()[0]["lost_why"]
        finally:
            kc.stop_channels()
            km.shutdown_kernel(now=True)
