"""Write notebooks/host.ipynb, notebooks/worker.ipynb and examples/kaggle/ from one place.

The repository address (for `%pip install` and the Open-in-Colab badges) is REPO below; the
tests check the notebooks against it (tests/nbrun.py). Run from the repository root:

    python notebooks/build.py
"""

import json

import nbformat as nbf

REPO = "distllm/distllm"
PIP = f'%pip install -q "distllm @ git+https://github.com/{REPO}"'


def badge(path):
    return (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
            f"(https://colab.research.google.com/github/{REPO}/blob/main/{path})")


def nb(cells):
    n = nbf.v4.new_notebook()
    n.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                  "language_info": {"name": "python"}, "accelerator": "GPU",
                  "colab": {"provenance": [], "gpuType": "T4"}}
    n.cells = cells
    for i, c in enumerate(n.cells):
        c.id = f"cell-{i}"
    return n


md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell


def params(src):
    c = code(src)
    c.metadata["tags"] = ["parameters"]
    return c


host = nb([
    md(f"# distllm host\n\n{badge('notebooks/host.ipynb')}\n\n"
       "This notebook holds the model's embeddings, head and sampling, and coordinates the workers: other "
       "notebooks (Colab, Kaggle, any machine) that each hold a range of the decoder layers, in 4 bits. "
       "Run the three cells, then paste the join cell the panel shows into each "
       "[worker notebook](https://colab.research.google.com/github/" + REPO + "/blob/main/notebooks/worker.ipynb).\n\n"
       "Colab's terms restrict tunnels and distributed workers on free runtimes: host on Kaggle, a paid "
       "runtime or your own machine (`tunnel=\"bore\"` reaches workers outside your network)."),
    code(PIP),
    params('MODEL = "Qwen/Qwen2.5-7B-Instruct"  # a Llama-layout model on the Hub, or "tiny" to try distllm out\n'
           'QUANT = "nf4"         # weights on the workers: "nf4", "int8" or "none"\n'
           'STORE = None          # "hf://you/distllm-state" or a Drive folder: jobs survive a host restart\n'
           'OPTIONS = {}          # more distllm.Config fields, e.g. {"tunnel": "bore", "replicas": 1}'),
    code("import distllm\n\n"
         "cluster = distllm.host(MODEL, quant=QUANT, store=STORE, **OPTIONS)\n"
         "cluster  # the control panel: join cell, nodes, layer map, prompt box"),
    md("Once workers have joined (the panel lists them), ask from code as well as from the panel:"),
    code('cluster.wait_ready()\nprint(cluster.generate("Why is the sky blue?", max_new_tokens=64))'),
    md("A batch job is checkpointed to `STORE` and resumes where it stopped if this notebook restarts:"),
    code('job = cluster.map(["Write a haiku about autumn.", "Name three prime numbers.",\n'
         '                   "What is distributed inference?"], max_new_tokens=48, name="first-job")\n'
         'for answer in job.results():\n    print(repr(answer))'),
    md("When you are done (workers started without a store stop with the host):"),
    code("cluster.close()"),
])

worker = nb([
    md(f"# distllm worker\n\n{badge('notebooks/worker.ipynb')}\n\n"
       "Serves a range of the model's layers for a host notebook. Pick a GPU runtime, paste the host's join "
       "string below (or give the host's store), and run the cells. Interrupt the kernel (■) to leave: the host "
       "moves this worker's layers to another node first."),
    code(PIP),
    params('JOIN_STRING = ""  # paste it from the host\'s panel\n'
           'STORE = None      # or the host\'s store ("hf://you/distllm-state", a Drive folder) to follow it'),
    code("import distllm\n\n"
         "worker = distllm.join(JOIN_STRING or None, store=STORE)  # serves until the host stops it"),
])

kaggle = nb([
    md("# distllm worker on Kaggle\n\n"
       "Runs as a Kaggle kernel (interactively, or pushed with `kaggle kernels push`, see the README): "
       "one distllm worker per GPU (a T4 x2 machine gives two), leaving before Kaggle's 12-hour limit.\n\n"
       "It finds the host from, in order: the Kaggle secrets `DISTLLM_JOIN` or `DISTLLM_STORE` (+ `HF_TOKEN`) "
       "(attached in the editor's Add-ons menu), a `distllm.json` file in an attached private dataset "
       "(secrets are not attached to pushed kernels), or the same names as environment variables."),
    code(PIP),
    code('import glob, json, os, time\n\nimport distllm\n\n\n'
         'def setting(name):\n'
         '    """A Kaggle secret, else a key of an attached dataset\'s distllm.json, else an environment variable."""\n'
         '    try:\n'
         '        from kaggle_secrets import UserSecretsClient\n'
         '    except ImportError:  # not on Kaggle\n'
         '        pass\n'
         '    else:\n'
         '        try:\n'
         '            return UserSecretsClient().get_secret(name)\n'
         '        except Exception as exc:  # the secret is not attached to this kernel\n'
         '            print(f"no Kaggle secret {name} ({type(exc).__name__}); looking further")\n'
         '    for path in glob.glob("/kaggle/input/*/distllm.json"):\n'
         '        with open(path) as f:\n'
         '            if name in (found := json.load(f)):\n'
         '                return found[name]\n'
         '    return os.environ.get(name)\n\n\n'
         'JOIN, STORE, TOKEN = setting("DISTLLM_JOIN"), setting("DISTLLM_STORE"), setting("HF_TOKEN")\n'
         'if not (JOIN or STORE):\n'
         '    raise SystemExit("give DISTLLM_JOIN (the host\'s join string) or DISTLLM_STORE (its store)")\n'
         '# One worker per GPU; each hands its layers over before Kaggle ends the session (12 hours).\n'
         'workers = distllm.join(JOIN or None, store=STORE, token=TOKEN, leave_at=time.time() + 11.5 * 3600)'),
])

nbf.write(host, "notebooks/host.ipynb")
nbf.write(worker, "notebooks/worker.ipynb")
nbf.write(kaggle, "examples/kaggle/worker.ipynb")
meta = {"id": "YOUR-KAGGLE-USERNAME/distllm-worker", "title": "distllm worker", "code_file": "worker.ipynb",
        "language": "python", "kernel_type": "notebook", "is_private": True, "enable_gpu": True,
        "enable_tpu": False, "enable_internet": True, "machine_shape": "NvidiaTeslaT4",
        "dataset_sources": [], "competition_sources": [], "kernel_sources": [], "model_sources": []}
with open("examples/kaggle/kernel-metadata.json", "w") as f:
    json.dump(meta, f, indent=2)
    f.write("\n")
