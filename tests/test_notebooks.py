"""Notebooks are committed clean, declare typed parameters, and run."""
import ast
import json

import jupytext
import nbformat
import papermill
import pytest

import hw3lib.workbook as wb
from hw3lib.workbook import WorkbookConfig

NOTEBOOKS = sorted((wb.ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
SCRIPTS = sorted((wb.ROOT / "notebooks").glob("[0-9][0-9]_*.py"))


def pair_differences(ipynb, script) -> list[str]:
    """What differs between a notebook and its percent-format script: cell kinds, sources, tags."""
    def cells(nb):
        return [(c.cell_type, c.source.strip("\n"), sorted(c.metadata.get("tags", []))) for c in nb.cells]

    a, b = cells(nbformat.read(str(ipynb), as_version=4)), cells(jupytext.read(str(script)))
    diffs = [f"cell {i}: {x[0]} {x[1][:50]!r} ... vs {y[0]} {y[1][:50]!r} ..."
             for i, (x, y) in enumerate(zip(a, b)) if x != y]
    return diffs + ([f"{len(a)} cells vs {len(b)}"] if len(a) != len(b) else [])


def test_every_notebook_is_a_jupytext_pair():
    assert NOTEBOOKS and [p.stem for p in NOTEBOOKS] == [p.stem for p in SCRIPTS]
    config = (wb.ROOT / "notebooks/jupytext.toml").read_text()
    assert 'formats = "ipynb,py:percent"' in config
    for path in SCRIPTS:
        assert path.read_text().startswith("# %% [markdown]"), f"{path.name}: not a percent-format script"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_pair_in_sync(path):
    diffs = pair_differences(path, path.with_suffix(".py"))
    assert not diffs, f"{path.name} and {path.stem}.py differ (run: jupytext --sync notebooks/*.ipynb): {diffs[:3]}"


def test_sync_check_sees_an_edit(tmp_path):
    """The check above catches an edit made on one side only (in JupyterLab without jupytext, or in the .py)."""
    src = NOTEBOOKS[0].with_suffix(".py")
    edited = tmp_path / src.name
    edited.write_text(src.read_text().replace("# %%\n", "# %%\nx = 1  # an edit\n", 1))
    assert pair_differences(NOTEBOOKS[0], edited)
    untagged = tmp_path / "untagged.py"
    untagged.write_text(src.read_text().replace('# %% tags=["parameters"]', "# %%"))
    assert pair_differences(NOTEBOOKS[0], untagged)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_clean(path):
    nb = nbformat.read(str(path), as_version=4)
    assert "widgets" not in nb.metadata
    assert nb.metadata.kernelspec.name == "hw3", "the workbook's kernel (hw3lib.kernel registers it)"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name} has outputs"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one parameters cell"
    # papermill must understand every line (it silently skips one whose comment holds '='), so that
    # `papermill --help-notebook` lists them and the runner can route each config value
    body = ast.parse(tagged[0].source).body
    assert all(isinstance(node, ast.AnnAssign) for node in body), "each parameter is declared `name: type = value`"
    assigned = [node.target.id for node in body]
    assert list(papermill.inspect_notebook(str(path))) == assigned
    for cell in nb.cells:  # the logic lives in hw3lib; a cell shows one idea (the parameters cell: one per line)
        if cell.cell_type == "code" and cell not in tagged:
            assert len(cell.source.splitlines()) <= 20, f"{path.name}: a code cell over 20 lines"
    start = next(i for i, c in enumerate(nb.cells) if "## Try it yourself" in c.source)
    rest = nb.cells[start + 1:]  # the exercises end the notebook: prose, and code cells that check themselves
    assert rest and all(c.cell_type == "markdown" or "check(" in c.source for c in rest), \
        f"{path.name} ends with its exercises"


@pytest.fixture
def inside_outputs():
    """An output folder inside the workbook (outputs/ is ignored by git), removed afterwards."""
    import shutil
    import uuid

    path = wb.ROOT / "outputs" / f".pytest-{uuid.uuid4().hex[:8]}"
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_shapes_world_notebook_runs(world, inside_outputs):
    tmp_path = inside_outputs
    cfg = WorkbookConfig.load(wb.ROOT / "configs/demo.yaml")
    cfg.output_dir = tmp_path
    cfg.parameters = {**cfg.parameters, "num_show": 4}
    merged = wb.run(cfg, only=["00_shapes_world"], log=lambda *_: None)
    assert merged["clip_check"]["auc"] >= 0.9
    assert merged["world"]["parser_agreement"] == 1.0
    html = (tmp_path / "report/00_shapes_world.html").read_text()
    assert html.count("data:image/png;base64") >= 4, "the figures are embedded in the report"
    assert json.loads((tmp_path / "metrics.json").read_text())["clip_check"] == merged["clip_check"]
    # the executed notebook and its report name paths relative to the workbook: no one's home folder in them
    for path in (tmp_path / "00_shapes_world.ipynb", tmp_path / "report/00_shapes_world.html"):
        assert str(wb.ROOT) not in path.read_text(), path
    params = nbformat.read(str(tmp_path / "00_shapes_world.ipynb"), as_version=4).cells
    injected = next(c for c in params if "injected-parameters" in c.metadata.get("tags", []))
    assert f"output_dir = \"outputs/{tmp_path.name}\"" in injected.source


def test_captioner_notebooks_run_quickly(world, tmp_path):
    """02 then 03 on a slice of the training set: the papermill path, the metrics sections, the adapter hand-off."""
    cfg = WorkbookConfig.load(wb.ROOT / "configs/demo.yaml")
    cfg.output_dir = tmp_path
    cfg.parameters = {**cfg.parameters, "num_epochs": 2, "attempt_epochs": 1, "max_train_images": 60,
                      "eval_images": 10, "max_new_tokens": 12, "num_show": 2}
    merged = wb.run(cfg, only=["02_train_lora_captioner", "03_evaluate"], html=False, log=lambda *_: None)
    captioner = merged["captioner"]
    for key in ("cider", "clipscore", "caption_accuracy", "trainable_params", "baseline_cider", "attempts"):
        assert key in captioner, key
    assert captioner["trainable_params"] < 10_000_000
    # the report's LoRA attempts: one knob each against the main run, the first epoch of its schedule, scored as 03
    # scores, beside the main run's own adapter after that epoch
    main, early, *attempts, ablation = captioner["attempts"]
    assert [a["run"] for a in attempts] == ["attempt 1", "attempt 2"] and ablation["run"] == "ablation"
    assert (main["epochs"], early["run"], early["epochs"]) == (2, "main, epoch 1", 1)
    knobs = ("lora_r", "alpha", "dropout", "targets", "visual_norm")
    for a in attempts:
        assert a["epochs"] == early["epochs"] == 1
        changed = {k for k in knobs if a[k] != main[k]}
        assert changed in ({"lora_r", "alpha"}, {"targets"}), changed
        assert a["alpha_over_r"] == main["alpha_over_r"]
    assert ablation["epochs"] == 1 and ablation["visual_norm"] is False
    assert (tmp_path / "p2/main/epoch-1.safetensors").is_file() and early["val_cider"] != main["val_cider"]
    assert main["val_cider"] == pytest.approx(captioner["cider"]) and main["val_clipscore"] == pytest.approx(
        captioner["clipscore"])  # 02 scores its runs with 03's code and decoding: the same adapter, the same numbers
    predictions = json.loads((tmp_path / "p2_val_predictions.json").read_text())
    per_image = json.loads((tmp_path / "p2_val_per_image.json").read_text())
    assert len(predictions) == 300 and set(per_image) == set(predictions)
    assert (tmp_path / "p2/main/best.safetensors").is_file()

    # P3 on the same quick run: 04 (attention maps, pointing accuracy) and 05 (best / worst CLIPScore)
    cfg.parameters = {**cfg.parameters, "pointing_images": 6}
    merged = wb.run(cfg, only=["04_attention_maps", "05_best_worst_clipscore"], log=lambda *_: None)
    attention = merged["attention"]
    assert 0 < attention["chance"] < 1 and set(attention["llava"]) == {"predict", "read", "both"}
    for model in ("captioner", "llava"):
        assert all(set(by_layer) == {"0", "1", "2", "mean"} for by_layer in attention[model].values())
        query, layer = attention["query_shown"][model], attention["layer_shown"][model]
        assert max(v for k, v in attention[model][query].items() if k != "mean") == attention[model][query][layer]
    assert len(attention["p3_captions"]["llava"]) == 5
    pairs = merged["best_worst"]
    assert pairs["top"]["clipscore"] >= pairs["bottom"]["clipscore"]
    assert {"image", "caption", "clipscore"} <= set(pairs["top"]) and pairs["top"]["image"] in per_image
    assert (tmp_path / "report/04_attention_maps.html").read_text().count("data:image/png;base64") >= 11
    assert (tmp_path / "report/05_best_worst_clipscore.html").read_text().count("data:image/png;base64") >= 3


def test_llava_notebook_runs(world, tmp_path):
    """01 on a slice of p1: the sweep rows, the best setting, the predictions file, figures in the report."""
    cfg = WorkbookConfig.load(wb.ROOT / "configs/demo.yaml")
    cfg.output_dir = tmp_path
    instructions = {"one sentence": "Describe this image in one sentence.", "detailed": "Describe the image in detail."}
    cfg.parameters = {**cfg.parameters, "llava_num_images": 12, "llava_instructions": instructions,
                      "llava_generations": {"greedy": {"max_new_tokens": 50}}, "llava_num_show": 1}
    merged = wb.run(cfg, only=["01_llava_prompts"], log=lambda *_: None)
    llava = merged["llava"]
    assert [r["instruction_name"] for r in llava["sweep"]] == ["one sentence", "detailed"]
    for row in llava["sweep"]:
        assert {"instruction", "generation", "cider", "clipscore", "mean_length", "caption_accuracy"} <= set(row)
    assert llava["best"]["instruction_name"] == "one sentence"
    assert llava["sweep"][1]["mean_length"] > 2 * llava["sweep"][0]["mean_length"]
    assert len(json.loads((tmp_path / "p1_predictions.json").read_text())) == 12
    html = (tmp_path / "report/01_llava_prompts.html").read_text()
    assert html.count("data:image/png;base64") >= 3
