"""Write a clean notebook (no outputs, no widget state) from a cell list: ``python tools/make_notebook.py SPEC.py``.

A spec is a Python file that defines ``CELLS``: a list of ``("md" | "code" | "parameters", source)`` pairs and
``NAME``, the notebook's file name. The committed ``.ipynb`` is what users open; the spec only makes edits diffable.
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

import nbformat


def build(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                   "language_info": {"name": "python"}}
    for kind, source in cells:
        source = source.strip("\n")
        if kind == "md":
            nb.cells.append(nbformat.v4.new_markdown_cell(source))
        else:
            cell = nbformat.v4.new_code_cell(source)
            if kind == "parameters":
                cell.metadata["tags"] = ["parameters"]
            nb.cells.append(cell)
    for i, cell in enumerate(nb.cells):
        cell.id = f"c{i:02d}"
    return nb


if __name__ == "__main__":
    for spec in sys.argv[1:]:
        ns = runpy.run_path(spec)
        out = Path(__file__).resolve().parents[1] / "notebooks" / ns["NAME"]
        nbformat.write(build(ns["CELLS"]), str(out))
        print(f"wrote {out}")
