"""hw3lib.outputs: what the notebooks hand each other, read back from a run's folder."""
import json

import pytest

from hw3lib.outputs import Run, clip_scorer, start
from hw3lib.report import save_metrics


def test_a_run_reads_what_the_notebooks_wrote_and_says_what_has_not_run(tmp_path):
    run = Run(tmp_path / "hw3_data", tmp_path / "out")
    assert run.adapter() == tmp_path / "out/p2/main/best.safetensors"
    assert run.adapter("elsewhere/a.safetensors").as_posix() == "elsewhere/a.safetensors"
    assert run.decoder_checkpoint == str(tmp_path / "hw3_data/p2_data/decoder_model.bin")
    # nothing has run: None, the defaults, and an error that names the notebook to run
    assert run.metrics("llava") is None and run.attention_view() == ({}, "predict")
    with pytest.raises(FileNotFoundError, match=r"p2_val_per_image.json: run notebook 03 first"):
        run.per_image()

    save_metrics(run.output_dir, "attention", {"layer_shown": {"captioner": 2, "llava": 20},
                                               "query_shown": {"captioner": "both", "llava": "read"}})
    save_metrics(run.output_dir, "llava", {"best": {"instruction": "Describe."}})
    (run.output_dir / "p2_val_per_image.json").write_text(json.dumps({"1": {"caption": "a", "clipscore": 0.5}}))
    assert run.attention_view() == ({"captioner": 2, "llava": 20}, "both")
    assert run.metrics("llava") == {"best": {"instruction": "Describe."}}
    assert run.per_image() == {"1": {"caption": "a", "clipscore": 0.5}}


def test_start_reads_the_parameters_and_makes_the_figures_folder(tmp_path):
    namespace = {"__annotations__": {"data_root": str, "output_dir": str, "num_show": int},
                 "data_root": "hw3_data", "output_dir": str(tmp_path / "out"), "num_show": 3}
    P, run = start(namespace)
    assert (P.num_show, run.output_dir, run.data_root.as_posix()) == (3, tmp_path / "out", "hw3_data")
    assert (tmp_path / "out/figures").is_dir()
    namespace["num_show"] = 0
    with pytest.raises(ValueError, match=r"parameter 'num_show' must be at least 1, got 0"):
        start(namespace)


def test_no_clip_model_means_no_scorer(models_dir):
    assert clip_scorer("") is None
    scorer = clip_scorer(str(models_dir / "clip"))
    assert scorer.cfg.model == str(models_dir / "clip") and scorer.cfg.pretrained is None
