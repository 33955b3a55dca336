"""Notebooks are committed clean, declare typed parameters, and run."""
import json

import nbformat
import pytest

import hw3lib.workbook as wb
from hw3lib.workbook import WorkbookConfig

NOTEBOOKS = sorted((wb.ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_clean(path):
    nb = nbformat.read(str(path), as_version=4)
    assert "widgets" not in nb.metadata
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name} has outputs"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one parameters cell"


def test_shapes_world_notebook_runs(world, tmp_path):
    cfg = WorkbookConfig.load(wb.ROOT / "configs/demo.yaml")
    cfg.output_dir = tmp_path
    cfg.parameters = {**cfg.parameters, "num_show": 4}
    merged = wb.run(cfg, only=["00_shapes_world"], log=lambda *_: None)
    assert merged["clip_check"]["auc"] >= 0.9
    assert merged["world"]["parser_agreement"] == 1.0
    assert (tmp_path / "report/00_shapes_world.html").stat().st_size > 10_000
    assert json.loads((tmp_path / "metrics.json").read_text())["clip_check"] == merged["clip_check"]
