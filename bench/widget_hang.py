"""Notebook 04's hang, reproduced on the CPU in a loop: a tiny notebook whose third cell shows a widget, executed
N times as `hw3 run` executes a notebook (a runner process per notebook, every cell bounded), counting the runs whose
cell never got its execute reply.

    python bench/widget_hang.py --browser output --runs 20   # the browser as it was: figures in an Output widget
    python bench/widget_hang.py --browser image --runs 40    # hw3lib.viz.attention_browser: PNGs in an Image widget
    python bench/widget_hang.py --browser plain --runs 20    # no browser: one figure in one Output widget

Each run takes ~10 s on a 2-core machine; a hung one takes --bound seconds and leaves the kernel's stacks. The
result (counts, versions, the one-line errors) is printed as JSON and written with --json. docs/rehearsal.md has what
it showed.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]

ENTRIES = """import numpy as np
from PIL import Image
import matplotlib.pyplot as plt
from hw3lib import viz
rng = np.random.default_rng(0)
entries = {f"img{i} / m{i%2}": {"view": Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)),
           "words": [f"w{j}" for j in range(15)], "maps": rng.random((15, 12, 4, 16, 16), dtype=np.float32),
           "layers": [str(l) for l in range(12)], "layer": 11} for i in range(n_entries)}
fig, ax = plt.subplots(); ax.imshow(entries['img0 / m0']['view']); plt.show()"""

# the browser before 2026-12-04, drawing with pyplot into an Output widget (hw3lib/viz.py's history)
OUTPUT_BROWSER = """import ipywidgets as w
from IPython.display import display
from hw3lib.attention import aggregate, upsample

def output_browser(entries):
    pick = w.Dropdown(options=list(entries), description="image / model")
    layer = w.Dropdown(description="layer")
    heads = w.Dropdown(description="heads")
    word = w.IntSlider(description="word", min=0)
    out = w.Output()
    e = entries[pick.value]
    layer.options = [(f"{lab}", i) for i, lab in enumerate(e["layers"])] + [("mean", "mean")]
    layer.value = e["layer"]
    heads.options = [("mean", "mean"), ("max", "max")] + [(f"head {h}", h) for h in range(e["maps"].shape[2])]
    heads.value = "mean"
    word.max = len(e["words"]) - 1

    def draw(*_):
        e = entries[pick.value]
        out.clear_output(wait=True)
        m = aggregate(e["maps"][word.value : word.value + 1], layer.value, heads.value)[0]
        size = e["view"].size[0]
        with out:
            fig, ax = plt.subplots(figsize=(3.6, 3.8))
            ax.imshow(e["view"])
            ax.imshow(upsample(m, size), cmap="jet", alpha=0.5, extent=(0, size, size, 0))
            ax.axis("off")
            plt.show()

    for control in (pick, layer, heads, word):
        control.observe(draw, "value")
    draw()
    box = w.VBox([w.HBox([pick, layer, heads]), word, out])
    display(box)
    return box

browser = output_browser(entries)"""

PLAIN = """import ipywidgets as w
from IPython.display import display
out = w.Output()
with out:
    fig, ax = plt.subplots(); ax.plot([1, 2]); plt.show()
display(out)"""

CELLS = {"output": OUTPUT_BROWSER, "image": "browser = viz.attention_browser(entries)", "plain": PLAIN}


def notebook(kind: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell("n_entries = 10", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell(ENTRIES), nbformat.v4.new_code_cell(CELLS[kind]),
                nbformat.v4.new_code_cell("print('after')")]
    return nb


def main() -> None:
    from hw3lib.workbook import WorkbookError, execute_in_child

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--browser", choices=sorted(CELLS), default="image")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--bound", type=float, default=20.0, help="seconds a cell may run (hw3 run's cell_timeout)")
    ap.add_argument("--json", type=Path, help="write the result here too")
    args = ap.parse_args()
    if args.runs < 1 or args.bound <= 0:
        ap.error("--runs must be >= 1 and --bound > 0")
    runs = []
    with tempfile.TemporaryDirectory(prefix="widget-hang-") as tmp:
        source = Path(tmp) / "nb.ipynb"
        nbformat.write(notebook(args.browser), source)
        for i in range(args.runs):
            t0, error = time.time(), ""
            try:
                execute_in_child("nb", source, Path(tmp) / f"run{i}.ipynb", {}, ROOT, args.bound, progress=False)
            except WorkbookError as e:
                error = str(e).replace(tmp, "TMP")
            runs.append({"seconds": round(time.time() - t0, 1), "error": error})
            print(f"run {i + 1}/{args.runs}: {runs[-1]['seconds']} s {'FAILED ' + error[:160] if error else 'ok'}",
                  flush=True)
    hung = sum("ran past" in r["error"] for r in runs)
    result = {"browser": args.browser, "runs": args.runs, "passed": sum(not r["error"] for r in runs),
              "hung": hung, "other_failures": sum(bool(r["error"]) for r in runs) - hung, "bound_s": args.bound,
              "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
              "versions": {p: version(p) for p in ("ipykernel", "ipywidgets", "pyzmq", "jupyter_client", "nbclient",
                                                     "papermill", "tornado")},
              "per_run": runs}
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
