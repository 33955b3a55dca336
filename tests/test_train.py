import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hw3lib.captioner import (CaptionerConfig, EncoderConfig, CaptionerGeneration, build, course_files,
                              trained_state_dict)
from hw3lib.cli import main
from hw3lib.data import DataError, load_split
from hw3lib.decoder import LoraConfig
from hw3lib.demo.world import WorldConfig, build_world
from hw3lib.train import TrainConfig, attempt_schedule, row_adapter, run_key, train


class Killed(Exception):
    pass


def _fresh(world, models_dir, dropout=0.1):
    torch.manual_seed(0)
    cfg = CaptionerConfig(encoder=EncoderConfig(name=str(models_dir / "vit"), pool=2),
                          lora=LoraConfig(r=2, alpha=4, dropout=dropout, targets=("c_attn",)), **course_files(world))
    return build(cfg)


def test_killed_and_resumed_equals_uninterrupted(world, models_dir, tmp_path):
    recs = load_split(world / "p2_data/train.json", world / "p2_data/images/train")[:12]
    val = load_split(world / "p2_data/val.json", world / "p2_data/images/val")[:3]
    cfg = TrainConfig(num_epochs=3, batch_size=8, lr=3e-3, captions_per_image=2, seed=1)
    kw = dict(log=lambda *_: None, device="cpu")

    model, enc, tr = _fresh(world, models_dir)
    train(model, enc, tr, recs, val, cfg, tmp_path / "a", **kw)
    reference = trained_state_dict(model)

    def kill(epoch, step):
        if epoch == 1 and step == 1:
            raise Killed

    model, enc, tr = _fresh(world, models_dir)
    with pytest.raises(Killed):
        train(model, enc, tr, recs, val, cfg, tmp_path / "b", on_step=kill, **kw)
    model, enc, tr = _fresh(world, models_dir)  # a new process: fresh model, resumes from last.pt
    result = train(model, enc, tr, recs, val, cfg, tmp_path / "b", **kw)
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    resumed = trained_state_dict(model)
    assert set(resumed) == set(reference)
    for k in reference:
        assert torch.equal(resumed[k], reference[k]), k
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "b").iterdir())

    # a run of another configuration is refused before any work; with overwrite=True it replaces the old one
    other = replace(cfg, num_epochs=1, lr=1e-3)
    model, enc, tr = _fresh(world, models_dir)
    with pytest.raises(DataError, match=r"holds a run of another configuration"):
        train(model, enc, tr, recs, val, other, tmp_path / "b", **kw)
    messages = []
    result = train(model, enc, tr, recs, val, other, tmp_path / "b", overwrite=True, log=messages.append,
                   device="cpu")
    assert [row["epoch"] for row in result.history] == [1]
    assert any("starting over" in m for m in messages)


def test_a_run_stopped_early_keeps_its_epoch_and_continues_into_the_whole_schedule(world, models_dir, tmp_path):
    """The attempts of notebook 02 train the first epochs of the main schedule: stopping there is the same run, on
    the same learning-rate curve, as the main run up to that epoch (the kept adapter equals it bit for bit)."""
    from safetensors.torch import load_file

    recs = load_split(world / "p2_data/train.json", world / "p2_data/images/train")[:12]
    val = load_split(world / "p2_data/val.json", world / "p2_data/images/val")[:3]
    main_cfg, early_cfg = attempt_schedule(TrainConfig(num_epochs=3, batch_size=8, lr=3e-3, captions_per_image=2,
                                                       seed=1), 1)
    assert (main_cfg.stop_after, main_cfg.keep_epochs) == (0, (1,))
    assert (early_cfg.stop_after, early_cfg.keep_epochs) == (1, (1,))
    kw = dict(log=lambda *_: None, device="cpu")
    model, enc, tr = _fresh(world, models_dir)
    full = train(model, enc, tr, recs, val, main_cfg, tmp_path / "main", **kw)
    reference = trained_state_dict(model)
    model, enc, tr = _fresh(world, models_dir)
    early = train(model, enc, tr, recs, val, early_cfg, tmp_path / "early", **kw)
    assert [r["epoch"] for r in early.history] == [1] and early.history[0]["lr"] == full.history[0]["lr"] > 0
    assert "val_cider" not in early.history[0] and early.best_path is None  # no validation: it picks nothing here
    kept, same = (load_file(row_adapter(r, 1, "x")) for r in (full, early))
    assert set(kept) == set(same) and all(torch.equal(kept[k], same[k]) for k in kept)
    assert row_adapter(full, None, "x") == full.best_path
    with pytest.raises(DataError, match=r"no adapter after epoch 2"):
        row_adapter(full, 2, tmp_path / "main")

    model, enc, tr = _fresh(world, models_dir)  # the same run asked for the whole schedule: it continues
    rest = train(model, enc, tr, recs, val, replace(early_cfg, stop_after=0), tmp_path / "early", **kw)
    assert [r["epoch"] for r in rest.history] == [1, 2, 3]
    assert all(torch.equal(v, reference[k]) for k, v in trained_state_dict(model).items())

    assert attempt_schedule(main_cfg, 0)[1] is None and attempt_schedule(main_cfg, 3)[1] == main_cfg
    with pytest.raises(ValueError, match=r"attempt_epochs must lie in 0..num_epochs \(3\), got 4"):
        attempt_schedule(main_cfg, 4)
    with pytest.raises(ValueError, match=r"stop_after \(5\)"):
        train(model, enc, tr, recs, val, replace(main_cfg, stop_after=5), tmp_path / "bad", **kw)


def _fake_hw3_data(root, models_dir):
    """The real layout with a random GPT-2-format checkpoint of a tiny config and 12-digit JPEGs."""
    build_world(root, WorldConfig(seed=5, num_train=8, num_val=4, num_p1=2))
    p2 = root / "p2_data"
    for f in ("encoder.json", "vocab.bpe"):
        shutil.copy(models_dir / "decoder" / f, p2 / f)
    vocab = len(json.loads((p2 / "encoder.json").read_text()))
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=1, n_embd=64, vocab_size=vocab, n_positions=128,
                                      bos_token_id=vocab - 1, eos_token_id=vocab - 1))
    torch.save(gpt2.transformer.state_dict(), p2 / "decoder_model.bin")
    return root


def test_dry_run_on_a_fake_hw3_data(models_dir, tmp_path, capsys):
    root = _fake_hw3_data(tmp_path / "hw3_data", models_dir)
    out = tmp_path / "run"
    code = main(["train", "--data-root", str(root), "--out", str(out), "--encoder", "vit_tiny_patch16_224",
                 "--random-weights", "--pool", "2", "--epochs", "1", "--batch-size", "8", "--lora-r", "2",
                 "--max-new-tokens", "6", "--num-workers", "0", "--captions-per-image", "1"])
    assert code == 0, capsys.readouterr().err
    assert (out / "best.safetensors").is_file() and (out / "last.pt").is_file()
    pred = tmp_path / "pred.json"
    images = root / "p2_data/images/val"
    assert main(["caption", str(images), str(pred), str(root / "p2_data/decoder_model.bin"),
                 "--adapter", str(out / "best.safetensors"), "--max-new-tokens", "6"]) == 0
    captions = json.loads(pred.read_text())
    assert set(captions) == {p.stem for p in images.iterdir()}
    capsys.readouterr()
    assert main(["evaluate", "--pred", str(pred), "--annotation", str(root / "p2_data/val.json"), "--images",
                 str(images), "--clip-model", str(models_dir / "clip"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["num_images"] == 4


def test_train_refuses_too_many_parameters(models_dir, tmp_path, capsys):
    root = _fake_hw3_data(tmp_path / "hw3_data", models_dir)
    code = main(["train", "--data-root", str(root), "--out", str(tmp_path / "r"), "--encoder", "vit_tiny_patch16_224",
                 "--random-weights", "--lora-r", "20000", "--lora-targets", "c_fc"])
    assert code == 2
    assert "trainable parameters: the assignment allows fewer than 10,000,000" in capsys.readouterr().err


# ------------------------------------------------------------------------------ the same command, the same run
def _cli_root(tmp_path, models_dir, num_train: int):
    root = tmp_path / "hw3_data"
    build_world(root, WorldConfig(seed=7, num_train=num_train, num_val=3, num_p1=2))
    for f in ("decoder_model.bin", "encoder.json", "vocab.bpe"):
        shutil.copy(models_dir / "decoder" / f, root / "p2_data" / f)
    return root


def _train_cmd(root, out, epochs: int, batch_size: int = 8) -> list[str]:
    import sys

    return [sys.executable, "-m", "hw3lib", "train", "--data-root", str(root), "--out", str(out), "--encoder",
            str(Path(__file__).resolve().parents[1] / "data/demo/models/vit"), "--pool", "2", "--epochs",
            str(epochs), "--batch-size", str(batch_size), "--num-workers", "0", "--max-new-tokens", "5",
            "--eval-images", "2", "--lora-dropout", "0.1", "--seed", "3"]


def _adapter(out):
    from safetensors.torch import load_file

    return load_file(str(out / "best.safetensors")), torch.load(out / "last.pt", weights_only=False)["trained"]


def test_two_processes_give_bit_identical_adapters(models_dir, tmp_path):
    """hw3 train --seed S twice, in separate processes: the same tensors, bit for bit (CPU). At 64 captions a step
    the CPU's threaded index_add sums in any order unless deterministic kernels are on (seen: 3e-7 apart)."""
    import subprocess

    root = _cli_root(tmp_path, models_dir, num_train=60)
    for name in ("a", "b"):
        subprocess.run(_train_cmd(root, tmp_path / name, 2, batch_size=64), check=True, capture_output=True)
    (best_a, last_a), (best_b, last_b) = _adapter(tmp_path / "a"), _adapter(tmp_path / "b")
    assert set(last_a) == set(last_b) and len(last_a) > 4
    for k in last_a:
        assert torch.equal(last_a[k], last_b[k]), k
    for k in best_a:
        assert torch.equal(best_a[k], best_b[k]), k


def test_sigkill_and_resume_equals_an_uninterrupted_run(models_dir, tmp_path):
    """A run killed with SIGKILL during epoch 2 and restarted with the same command ends with the tensors of a run
    that was never interrupted; each run is its own process."""
    import signal
    import subprocess
    import time

    root = _cli_root(tmp_path, models_dir, num_train=60)
    subprocess.run(_train_cmd(root, tmp_path / "whole", 3), check=True, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(root, out, 3), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (out / "last.pt").is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert torch.load(out / "last.pt", weights_only=False)["epoch"] == 0  # killed after epoch 1 of 3
    resumed = subprocess.run(_train_cmd(root, out, 3), check=True, capture_output=True, text=True)
    assert "resumed from" in resumed.stdout + resumed.stderr
    (_, whole), (_, again) = _adapter(tmp_path / "whole"), _adapter(out)
    for k in whole:
        assert torch.equal(whole[k], again[k]), k
    assert not [f for f in out.iterdir() if f.name.endswith(".tmp")]


def test_ctrl_c_stops_training_and_its_workers_and_keeps_the_last_epoch(models_dir, tmp_path):
    """SIGINT (Ctrl-C) after epoch 1: exit 130 within seconds, one line saying where the run can go on from, no
    DataLoader worker left, and a whole last.pt (checkpoints are written atomically)."""
    from conftest import interrupt

    root = _cli_root(tmp_path, models_dir, num_train=40)
    out = tmp_path / "run"
    cmd = _train_cmd(root, out, 50) + ["--num-workers", "2", "--feature-cache", "off"]  # workers in every epoch
    run = interrupt(cmd, ready=lambda p: (out / "last.pt").is_file() and p.children())  # epoch 2, with workers
    err = run["err"]
    assert run["code"] == 130 and run["seconds"] < 30 and run["family"], (run["code"], err[-2000:])
    said = [line for line in err.splitlines() if line.startswith("hw3 train:")]
    assert said == [f"hw3 train: interrupted: {out}/last.pt holds the last finished epoch; the same command goes "
                    f"on from it"], err[-2000:]
    assert "Traceback" not in err and not run["left"]()
    assert torch.load(out / "last.pt", weights_only=False)["epoch"] >= 0
    assert not [f for f in out.iterdir() if f.name.endswith(".tmp")]


def test_compiled_step_gives_the_loss_curve_of_the_eager_step(world, models_dir, tmp_path):
    """TrainConfig.compile: every step padded to the largest and run through torch.compile (forward and backward)
    trains the same adapter as the eager step, to float rounding, with the whole step compiled and with the blocks
    only (compile_scope). (Without dropout: compiled code draws its own dropout masks, so with dropout the two
    curves differ as two seeds do.)"""
    recs = load_split(world / "p2_data/train.json", world / "p2_data/images/train")[:24]
    val = load_split(world / "p2_data/val.json", world / "p2_data/images/val")[:2]
    runs = {}
    for compiled, scope in ((False, "step"), (True, "step"), (True, "blocks")):
        model, enc, tr = _fresh(world, models_dir, dropout=0.0)
        cfg = TrainConfig(num_epochs=2, batch_size=8, lr=3e-3, captions_per_image=2, seed=1, compile=compiled,
                          compile_scope=scope)
        result = train(model, enc, tr, recs, val, cfg, tmp_path / f"{compiled}{scope}", log=lambda *_: None,
                       device="cpu")
        runs[compiled, scope] = ([row["loss"] for row in result.history], trained_state_dict(model))
        assert model.decoder.block_call is None  # validation and later decoding run the blocks eagerly
    eager, eager_state = runs[False, "step"]
    assert eager[1] < eager[0]
    for fast, fast_state in (runs[True, "step"], runs[True, "blocks"]):
        assert fast == pytest.approx(eager, rel=1e-4)
        for k in eager_state:
            assert torch.allclose(fast_state[k], eager_state[k], atol=1e-3), k
    # compile on or off, whole step or blocks, is the same run: it resumes either way
    keys = {run_key(model.cfg, replace(cfg, compile=c, compile_scope=s), recs, val, CaptionerGeneration())
            for c, s in runs}
    assert len(keys) == 1
    with pytest.raises(ValueError, match="compile_scope must be one of step, blocks, got 'layers'"):
        train(model, enc, tr, recs, val, replace(cfg, compile_scope="layers"), tmp_path / "x", device="cpu")


def test_a_step_that_cannot_compile_trains_eagerly_with_one_warning(world, models_dir, tmp_path, monkeypatch):
    """No compiler on the machine (no Triton, no C++ compiler): the first step says so in one warning and the run
    goes on eagerly, with the adapter of compile=False."""
    import hw3lib.train as train_module

    def no_compiler(fn, **kw):
        def fails(*args):
            raise torch._dynamo.exc.TorchDynamoException("Cannot find a working triton installation")
        return fails

    recs = load_split(world / "p2_data/train.json", world / "p2_data/images/train")[:12]
    val = load_split(world / "p2_data/val.json", world / "p2_data/images/val")[:2]
    cfg = TrainConfig(num_epochs=1, batch_size=8, lr=3e-3, captions_per_image=2, seed=1)
    model, enc, tr = _fresh(world, models_dir)
    train(model, enc, tr, recs, val, replace(cfg, compile=False), tmp_path / "eager", log=lambda *_: None,
          device="cpu")
    eager = trained_state_dict(model)
    monkeypatch.setattr(train_module.torch, "compile", no_compiler)
    model, enc, tr = _fresh(world, models_dir)
    with pytest.warns(UserWarning, match=r"could not compile the training step .*triton.*training eagerly") as seen:
        train(model, enc, tr, recs, val, replace(cfg, compile=True), tmp_path / "fallback", log=lambda *_: None,
              device="cpu")
    assert sum("could not compile" in str(w.message) for w in seen) == 1
    for k, v in trained_state_dict(model).items():
        assert torch.equal(v, eager[k]), k


def test_the_val_features_after_training_are_the_trainings_own(world, models_dir, tmp_path, monkeypatch):
    """After ``train``, ``cached_features`` for the val records it validated on returns the training's own tensor
    (no second extraction, no second copy in RAM), equal to a fresh extraction's. The memo is keyed by the record
    list: ``train`` validates on ``val[:eval_images]``, so this holds for that list (here all of it)."""
    import hw3lib.train as train_module
    from hw3lib.captioner import extract_features

    recs = load_split(world / "p2_data/train.json", world / "p2_data/images/train")[:6]
    val = load_split(world / "p2_data/val.json", world / "p2_data/images/val")[:4]
    cfg = TrainConfig(num_epochs=1, batch_size=8, lr=3e-3, captions_per_image=1, seed=1)
    model, enc, tr = _fresh(world, models_dir)
    train_module._FEATURES.clear()
    train(model, enc, tr, recs, val, cfg, tmp_path / "a", log=lambda *_: None, device="cpu")
    calls = []
    monkeypatch.setattr(train_module, "extract_features", lambda *a, **k: calls.append(a) or extract_features(*a, **k))
    feats = train_module.cached_features(enc, tr, val, model.cfg.encoder, cfg, tmp_path / "a", "cpu")
    assert calls == [] and any(feats is f for f in train_module._FEATURES.values())
    assert torch.equal(feats, extract_features(enc, tr, val, model.cfg.encoder, device="cpu"))
