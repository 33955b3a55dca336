"""hw3lib.distributed: the same commands under a launcher (torchrun here; accelerate launch sets the same
variables). Two gloo processes on the CPU must give what one process gives."""
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from hw3lib.distributed import Dist, current, setup


def _launch(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "hw3lib", *args]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def test_one_process_without_a_launcher(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    d = setup()
    assert d == Dist() == current() and not d.active and d.main
    assert d.gather({"a": 1}) == [{"a": 1}] and d.broadcast(3) == 3
    t = torch.ones(3)
    d.all_reduce_([t])
    assert torch.equal(t, torch.ones(3))


def test_shards_cover_every_item_once():
    items = list(range(11))
    shards = [Dist(r, 3).shard(items) for r in range(3)]
    assert sorted(sum(shards, [])) == items and {len(s) for s in shards} == {3, 4}
    assert Dist(0, 1).device("cpu") == torch.device("cpu")
    # by batches: rank 0 gets batches 0 and 2 of [0 1 2] [3 4 5] [6 7 8] [9 10], rank 1 batches 1 and 3
    assert Dist(0, 2).shard_batches(items, 3) == [0, 1, 2, 6, 7, 8]
    assert Dist(1, 2).shard_batches(items, 3) == [3, 4, 5, 9, 10]


def test_sharded_llava_captions_equal_one_process(models_dir, p1_records, tmp_path):
    """hw3 llava-caption under torchrun with 2 gloo processes writes the very JSON one process writes (7 images in
    batches of 2: batches 1 and 3 on one process, 2 and 4 on the other), and leaves no partial file."""
    img = tmp_path / "imgs"
    img.mkdir()
    for r in p1_records[:7]:
        shutil.copy(r.image_path, img / r.image_path.name)
    common = ["llava-caption", str(img), "--model", str(models_dir / "llava"), "--num-workers", "0",
              "--batch-size", "2", "--device", "cpu", "--deterministic"]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    subprocess.run([sys.executable, "-m", "hw3lib", common[0], common[1], str(one), *common[2:]], check=True,
                   capture_output=True, env=_env())
    run = subprocess.run(_launch(2, common[0], common[1], str(two), *common[2:]), capture_output=True, text=True,
                         env=_env())
    assert run.returncode == 0, run.stderr[-3000:]
    assert "on 2 processes" in run.stdout and run.stdout.count("captions ->") == 1  # the main process reports
    assert two.read_bytes() == one.read_bytes() and len(json.loads(one.read_text())) == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "one.json", "two.json"]


def test_resume_from_the_partial_files_of_several_processes(llava, p1_records, tmp_path):
    """A run of 2 processes was killed: each left its own partial file. One process resumes from both."""
    from hw3lib.llava import DEFAULT_INSTRUCTION, LlavaGeneration, caption_folder

    model, processor = llava
    gen = LlavaGeneration(max_new_tokens=6)
    recs = p1_records[:5]
    out = tmp_path / "pred.json"
    settings = {"model": "m", "instruction": DEFAULT_INSTRUCTION, "generation": asdict(gen), "first_sentence": False}
    for rank, rec in ((0, recs[0]), (1, recs[1])):
        lines = [{"settings": settings}, {"file_id": rec.file_id, "caption": f"kept {rank}"}]
        (tmp_path / f"pred.json.partial.rank{rank}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    run = caption_folder(model, processor, recs, out, generation=gen, batch_size=2, progress=False, model_name="m")
    assert run.reused == 2 and run.computed == 3
    assert run.captions[recs[0].file_id] == "kept 0" and run.captions[recs[1].file_id] == "kept 1"
    assert json.loads(out.read_text()) == run.captions and list(tmp_path.iterdir()) == [out]


def test_data_parallel_training_equals_one_process(models_dir, tmp_path):
    """hw3 train under torchrun with 2 gloo processes: each takes half of every step's captions, weighted by its
    share of the tokens, and the gradients are summed, so the adapter equals the one-process adapter (up to the
    order of float sums) and so do the losses. LoRA dropout is off: masks would differ with the split."""
    from test_train import _cli_root, _train_cmd

    root = _cli_root(tmp_path, models_dir, num_train=30)

    def cmd(out):
        c = _train_cmd(root, out, 2, batch_size=16)[3:]  # without "python -m hw3lib"
        return c[: c.index("--lora-dropout")] + ["--lora-dropout", "0"] + c[c.index("--lora-dropout") + 2:]

    subprocess.run([sys.executable, "-m", "hw3lib", *cmd(tmp_path / "one")], check=True, capture_output=True,
                   env=_env())
    run = subprocess.run(_launch(2, *cmd(tmp_path / "two")), capture_output=True, text=True, env=_env())
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 processes" in run.stdout and run.stdout.count("best epoch") == 1
    # the disk feature cache: the main process writes it, the other waits and reads it
    disk = subprocess.run(_launch(2, *cmd(tmp_path / "disk"), "--feature-cache", "disk"), capture_output=True,
                          text=True, env=_env())
    assert disk.returncode == 0, disk.stderr[-3000:]
    assert len(list((tmp_path / "disk").glob("features-*.pt"))) == 2  # train and val
    one = torch.load(tmp_path / "one" / "last.pt", weights_only=False)
    for name in ("two", "disk"):
        other = torch.load(tmp_path / name / "last.pt", weights_only=False)
        assert set(one["trained"]) == set(other["trained"]) and len(one["trained"]) > 4
        for k, v in one["trained"].items():
            torch.testing.assert_close(other["trained"][k], v, atol=2e-5, rtol=1e-4, msg=f"{name}: {k}")
        for a, b in zip(one["history"], other["history"]):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def test_sweep_on_two_processes_equals_one(llava, models_dir, world, tmp_path):
    """llava.sweep(gpus=2) captions every setting under torchrun (2 gloo processes), then scores in this process:
    the same predictions files and the same rows as gpus=1; a second call reuses them without launching."""
    from hw3lib.data import hw3_split
    from hw3lib.llava import LlavaGeneration, LlavaLoad, sweep

    model, processor = llava
    records = hw3_split(world, "p1_data")[:5]
    refs = {r.file_id: list(r.references) for r in records}
    instructions = {"one": "Describe this image in one sentence.", "few": "Describe the image in a few words."}
    gens = {"greedy": LlavaGeneration(max_new_tokens=10)}
    load = LlavaLoad(str(models_dir / "llava"), device="cpu")
    one = sweep(model, processor, records, instructions, gens, tmp_path / "one", refs, batch_size=2, load=load,
                progress=False, greedy_batch_size=3)
    two = sweep(None, None, records, instructions, gens, tmp_path / "two", refs, batch_size=2, load=load,
                progress=False, gpus=2, greedy_batch_size=3)
    for a, b in zip(one, two):
        assert Path(a["predictions"]).read_bytes() == Path(b["predictions"]).read_bytes()
        assert (a["name"], a["cider"], a["mean_length"]) == (b["name"], b["cider"], b["mean_length"])
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    again = sweep(None, None, records, instructions, gens, tmp_path / "two", refs, batch_size=2, load=load,
                  progress=False, gpus=2)
    assert again == two


def test_wrong_input_under_a_launcher_is_said_once(tmp_path):
    """Every process reads the same input: the main process names the problem, once; the launch fails."""
    run = subprocess.run(_launch(2, "train", "--data-root", str(tmp_path / "nope"), "--out", str(tmp_path / "r")),
                         capture_output=True, text=True, env=_env())
    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if line.startswith("hw3 train")]
    assert lines == [f"hw3 train: {tmp_path / 'nope'}/p2_data/train.json: file not found"]
