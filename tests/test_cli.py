import json
import subprocess
import sys

import pytest

from hw3lib.cli import main


def test_evaluate_json_line(world, models_dir, tmp_path, capsys):
    ann = json.loads((world / "p1_data/val.json").read_text())
    pred = {img["file_name"][:-4]: "a red circle" for img in ann["images"]}
    (tmp_path / "pred.json").write_text(json.dumps(pred))
    code = main(["evaluate", "--pred", str(tmp_path / "pred.json"), "--annotation", str(world / "p1_data/val.json"),
                 "--images", str(world / "p1_data/images/val"), "--clip-model", str(models_dir / "clip"),
                 "--clip-pretrained", "", "--json"])
    assert code == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(line)
    assert set(result) == {"cider", "clipscore", "num_images"} and result["num_images"] == len(pred)


def test_evaluate_wrong_keys_is_a_clear_error(world, models_dir, tmp_path, capsys):
    (tmp_path / "pred.json").write_text(json.dumps({"000000000001": "a red circle"}))
    code = main(["evaluate", "--pred", str(tmp_path / "pred.json"), "--annotation", str(world / "p1_data/val.json"),
                 "--images", str(world / "p1_data/images/val"), "--clip-model", str(models_dir / "clip")])
    assert code == 2
    err = capsys.readouterr().err
    assert "pred.json: keys differ" in err and "missing" in err and "extra (e.g. ['000000000001'])" in err


def test_module_entry_point_lists_every_command_and_each_has_its_help(capsys):
    from hw3lib.cli import build_parser

    out = subprocess.run([sys.executable, "-m", "hw3lib", "--help"], capture_output=True, text=True, check=True).stdout
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    commands = list(sub.choices)
    assert len(commands) >= 10 and {"run", "report", "train", "caption", "llava-caption", "lab"} <= set(commands)
    listed = out[out.index("{"):].split("}")[0].strip("{").split(",")
    assert listed == commands  # the usage line names every command, in the parser's order
    for command in commands:  # and each has its own --help, with a usage line naming it and its options
        with pytest.raises(SystemExit) as done:
            build_parser(command).parse_args([command, "--help"])
        usage = capsys.readouterr().out
        assert done.value.code == 0 and usage.startswith(f"usage: hw3 {command}") and "options:" in usage, usage[:300]


def test_download_offline_says_so(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["download"]) == 1
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err


def test_download_lists_local_folders_and_reads_extends(monkeypatch, capsys):
    """The demo's models are folders: nothing to fetch (it was "not a timm model name"). A card's config extends
    hw3.yaml: its model names come from there (it was "cannot read the model names")."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["download", "-f", "configs/demo.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "llava_model data/demo/models/llava: a local folder, nothing to fetch" in out
    assert "nothing to fetch: configs/demo.yaml loads offline" in out
    assert main(["download", "-f", "configs/hw3-24gb.yaml", "--dry-run"]) == 0
    assert "llava-hf/llava-1.5-7b-hf" in capsys.readouterr().out


def test_out_of_memory_says_which_setting_to_lower():
    import argparse

    from hw3lib.cli import _out_of_memory

    class OutOfMemoryError(RuntimeError):  # torch.cuda.OutOfMemoryError, as the handler recognises it: by name
        pass

    e = OutOfMemoryError("CUDA out of memory. Tried to allocate 200.00 MiB. GPU 0 has a total capacity of ...")
    said = _out_of_memory(e, argparse.Namespace(command="llava-caption", batch_size=16))
    assert said == ("out of GPU memory: tried to allocate 200.00 MiB; batch 16 does not fit: try --batch-size 8, or "
                    "fewer bits: --load-in-8bit or --load-in-4bit (configs/hw3-12gb.yaml: 4-bit and batch 8 for a "
                    "12 GB card)")
    eight = _out_of_memory(e, argparse.Namespace(command="llava-caption", batch_size=16, load_in_8bit=True))
    assert eight.endswith("try --batch-size 8, or --load-in-4bit (configs/hw3-12gb.yaml: 4-bit and batch 8 for a 12 GB "
                          "card)")
    four = _out_of_memory(e, argparse.Namespace(command="llava-caption", batch_size=16, load_in_4bit=True))
    assert four.endswith("batch 16 does not fit: try --batch-size 8")
    assert "--batch-size 32" in _out_of_memory(e, argparse.Namespace(command="train", batch_size=64))
    assert _out_of_memory(ValueError("x"), argparse.Namespace(command="train")) is None


def test_llava_caption_turns_on_expandable_segments_unless_set(tmp_path, monkeypatch, capsys):
    """Before its first CUDA allocation, llava-caption asks for expandable segments (the small cards' larger greedy
    batches fit only with them, docs/benchmarks.md); a PYTORCH_CUDA_ALLOC_CONF of the user's stays as it is."""
    import os

    name = "PYTORCH_CUDA_ALLOC_CONF"
    monkeypatch.setenv(name, "x")  # so that the test's own setting is undone afterwards
    monkeypatch.delenv(name)
    command = ["llava-caption", str(tmp_path / "no-images"), str(tmp_path / "out.json")]
    assert main(command) == 2 and "no-images" in capsys.readouterr().err  # wrong input, after the setting
    assert os.environ[name] == "expandable_segments:True"
    monkeypatch.setenv(name, "max_split_size_mb:128")
    assert main(command) == 2
    assert os.environ[name] == "max_split_size_mb:128"
    from hw3lib.alloc_conf import expandable_segments

    assert not expandable_segments()
    monkeypatch.setenv(name, "garbage_collection_threshold:0.8, expandable_segments: True")
    assert expandable_segments()
    monkeypatch.delenv(name)
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "max_split_size_mb:64")  # torch's newer name: also the user's
    assert not expandable_segments() and name not in os.environ


def test_the_allocator_setting_comes_before_torch():
    """hw3 llava-caption sets it before torch is imported, so before any CUDA allocation could read the default."""
    code = ("import os, sys\n"
            "import hw3lib.cli as cli\n"
            "import hw3lib.alloc_conf as a\n"
            "seen = []\n"
            "real = a.expandable_segments\n"
            "a.expandable_segments = lambda: seen.append('torch' in sys.modules) or real()\n"
            "cli.main(['llava-caption', 'no-such-folder', 'out.json'])\n"
            "print(seen, os.environ['PYTORCH_CUDA_ALLOC_CONF'])\n")
    env = {k: v for k, v in __import__("os").environ.items() if not k.endswith("ALLOC_CONF")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120).stdout
    assert out.strip().splitlines()[-1] == "[False] expandable_segments:True", out
