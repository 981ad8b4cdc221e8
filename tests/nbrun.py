"""Run the project's notebooks headless with a real kernel (nbclient), papermill-style.

`prepare()` loads a notebook, checks its first code cell is the documented
`%pip install` (skipped here: the checkout under test is installed already) and adds
a cell of parameter values after the cell tagged "parameters". Run as a script it
executes a whole notebook and writes the executed copy (also when a cell fails):

    python tests/nbrun.py notebooks/worker.ipynb out.ipynb JOIN_STRING='"dllm1..."'
"""

from __future__ import annotations

import os
import sys

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIP_CELL = '%pip install -q "distllm @ git+https://github.com/distllm/distllm"'


def prepare(path: str, **params) -> nbformat.NotebookNode:
    """The notebook at `path` (relative to the checkout), ready to run here with `params` (values as Python)."""
    nb = nbformat.read(os.path.join(ROOT, path), as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code[0].source == PIP_CELL, f"{path}: the first code cell must be {PIP_CELL!r}"
    code[0].source = "# %pip install skipped: this checkout is installed"
    if params:
        at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
        cell = nbformat.v4.new_code_cell("\n".join(f"{k} = {v}" for k, v in params.items()))
        cell.metadata["tags"] = ["injected-parameters"]
        cell.id = "injected-parameters"
        nb.cells.insert(at + 1, cell)
    return nb


def client(nb: nbformat.NotebookNode, timeout: float = 300) -> NotebookClient:
    return NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": ROOT}})


def outputs_of(cell) -> tuple[str, list[dict]]:
    """A cell's printed text (stdout, stderr, tracebacks) and its rich outputs (data by MIME type)."""
    text, data = "", []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            text += out.text
        elif out.output_type in ("display_data", "execute_result"):
            data.append(out.data)
        elif out.output_type == "error":
            text += "\n".join(out.traceback)
    return text, data


def stdout_of(cell) -> str:
    """What a cell printed to stdout alone (log lines go to stderr: a rebalance under load may say so)."""
    return "".join(out.text for out in cell.get("outputs", [])
                   if out.output_type == "stream" and out.get("name") == "stdout")


if __name__ == "__main__":
    source, target, *assignments = sys.argv[1:]
    notebook = prepare(source, **dict(a.split("=", 1) for a in assignments))
    try:
        client(notebook, timeout=600).execute()
    finally:
        nbformat.write(notebook, target)
