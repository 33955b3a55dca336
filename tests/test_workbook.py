import json

import nbformat
import pytest

import hw3lib.workbook as wb
from hw3lib.workbook import WorkbookConfig, WorkbookError


def _notebook(path, cells):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for i, (tag, src) in enumerate(cells):
        cell = nbformat.v4.new_code_cell(src)
        if tag:
            cell.metadata["tags"] = [tag]
        nb.cells.append(cell)
    nbformat.write(nb, str(path))


@pytest.fixture
def fake_root(tmp_path, monkeypatch):
    (tmp_path / "notebooks").mkdir()
    monkeypatch.setattr(wb, "ROOT", tmp_path)
    _notebook(tmp_path / "notebooks/01_ok.ipynb", [
        ("parameters", "value = 1\noutput_dir = 'x'"),
        (None, "from hw3lib.report import save_metrics\nsave_metrics(output_dir, 'ok', {'value': value * 2})"),
    ])
    _notebook(tmp_path / "notebooks/02_fails.ipynb", [
        ("parameters", "output_dir = 'x'"),
        (None, "x = 1"),
        (None, "raise ValueError('planted failure')"),
    ])
    return tmp_path


def test_runs_notebooks_and_merges_metrics(fake_root):
    cfg = WorkbookConfig(profile="t", output_dir=fake_root / "out", notebooks=["01_ok"], parameters={"value": 21})
    merged = wb.run(cfg, log=lambda *_: None)
    assert merged["ok"] == {"value": 42} and merged["profile"] == "t"
    assert json.loads((fake_root / "out/metrics.json").read_text())["ok"]["value"] == 42
    assert (fake_root / "out/01_ok.ipynb").is_file()
    html = (fake_root / "out/report/01_ok.html").read_text()
    assert "save_metrics" in html
    cost = merged["notebook_cost"]["01_ok"]  # each notebook's time and memory, a run with --only adds to it
    assert cost["seconds"] > 0 and cost["peak_rss_gib"] > 0.01 and "device" in cost
    assert merged["notebook_seconds"] == {"01_ok": cost["seconds"]}


def test_parameters_override_as_papermill_types_them():
    cfg = WorkbookConfig("t", "o", ["01_ok"], {"data_root": "hw3_data", "lr": 0.001})
    cfg.override([["data_root", "/data/hw3_data"], ["lr", "1e-4"], ["num_epochs", "2"], ["flag", "True"],
                  ["none", "None"], ["name", "ViT-B-32"]])
    assert cfg.parameters == {"data_root": "/data/hw3_data", "lr": 1e-4, "num_epochs": 2, "flag": True,
                              "none": None, "name": "ViT-B-32"}


def test_failing_notebook_names_notebook_and_cell(fake_root):
    cfg = WorkbookConfig(profile="t", output_dir=fake_root / "out", notebooks=["01_ok", "02_fails"])
    # [4]: the number shown in the executed notebook, where papermill's injected-parameters cell comes first
    with pytest.raises(WorkbookError, match=r"02_fails\.ipynb failed in cell \[4\] \(\"raise ValueError\('planted "
                                            r"failure'\)\"\): ValueError: planted failure"):
        wb.run(cfg, html=False, log=lambda *_: None)


def test_unknown_parameter_and_missing_notebook(fake_root):
    with pytest.raises(WorkbookError, match=r"parameters \['valu'\] are declared by none"):
        wb.run(WorkbookConfig("t", fake_root / "o", ["01_ok"], {"valu": 1}), log=lambda *_: None)
    with pytest.raises(WorkbookError, match="notebooks not found"):
        wb.run(WorkbookConfig("t", fake_root / "o", ["09_nope"]), log=lambda *_: None)


def test_config_files(tmp_path):
    for name in ("demo", "hw3"):
        cfg = WorkbookConfig.load(wb.ROOT / "configs" / f"{name}.yaml")
        assert cfg.profile == name and cfg.notebooks
        for nb in cfg.notebooks:
            assert wb.notebook_path(nb).is_file()
    (tmp_path / "bad.yaml").write_text("profile: x\nparameters:\n  nested: {a: 1}\n")
    with pytest.raises(WorkbookError, match=r"bad\.yaml: parameters must be flat"):
        WorkbookConfig.load(tmp_path / "bad.yaml")
    (tmp_path / "typo.yaml").write_text("profile: x\nnotebook: [a]\n")
    with pytest.raises(WorkbookError, match=r"typo\.yaml: a config is a mapping"):
        WorkbookConfig.load(tmp_path / "typo.yaml")
