"""Models loaded by their real names from a Hugging Face cache in the documented layout, offline.

A temporary ``HF_HOME`` holds, under the **real repo ids**: the LLaVA stand-in as ``llava-hf/llava-1.5-7b-hf``
(sharded, as the real one is), a timm ViT as ``timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k`` and a CLIP
ViT-B/32 as ``timm/vit_base_patch32_clip_224.openai`` (where open_clip's ``openai`` tag points). Every load runs in a
fresh process with ``HF_HOME`` and ``HF_HUB_OFFLINE=1`` set, as a user's would; the error cases must answer in one
line, without a traceback, and without trying the network (every socket connection is refused and recorded).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CLIP_REPO, LLAVA_ID, TIMM_NAME  # noqa: F401 -- the hf_home fixture's names

from hw3lib.rehearsal.hub_cache import repo_folder


NO_NETWORK = """
import os, socket
def _refuse(self, address, *args):
    with open(os.environ["HW3_TEST_CONNECTIONS"], "a") as f:
        f.write(repr(address) + "\\n")
    raise OSError("the network was tried in a test that must stay offline")
socket.socket.connect = socket.socket.connect_ex = _refuse
"""


def hw3(args: list[str], home: Path, timeout: float = 300, code: str | None = None):
    """Run ``hw3 ARGS`` (or ``python -c CODE``) in a fresh process offline against ``home``: ``(result, tried)``,
    ``tried`` the addresses it tried to connect to (a ``sitecustomize`` refuses and records every one)."""
    guard = home.parent / f"no-network-{home.name}"
    guard.mkdir(parents=True, exist_ok=True)
    (guard / "sitecustomize.py").write_text(NO_NETWORK)
    log = guard / "connections.txt"
    log.unlink(missing_ok=True)
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HW3_TEST_CONNECTIONS": str(log),
           "PYTHONPATH": os.pathsep.join([str(guard), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("HF_HUB_CACHE", None)
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "hw3lib", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)  # a bound, not a measure
    return result, log.read_text().splitlines() if log.is_file() else []


def assert_one_line_error(result, *needles: str) -> str:
    err = result.stderr.strip()
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], err[-2000:])
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_cache_layout_is_the_documented_one(hf_home):
    folder = repo_folder(LLAVA_ID, hf_home / "hub")
    commit = (folder / "refs/main").read_text()
    snapshot = folder / "snapshots" / commit
    config = snapshot / "config.json"
    assert config.is_symlink() and not os.path.isabs(os.readlink(config))
    assert config.resolve().parent == (folder / "blobs").resolve()
    index = json.loads((snapshot / "model.safetensors.index.json").read_text())
    assert all((snapshot / shard).is_file() for shard in set(index["weight_map"].values()))


def test_llava_caption_default_model_loads_from_the_cache(hf_home, world, tmp_path):
    """The default --model (the real id) loads offline from the cache and captions like the stand-in's folder."""
    images = tmp_path / "images"
    images.mkdir()
    for f in sorted((world / "p1_data/images/val").glob("*.jpg"))[:4]:
        shutil.copy(f, images / f.name)
    result, _ = hw3(["llava-caption", str(images), str(tmp_path / "by_id.json"), "--num-workers", "0",
                     "--device", "cpu"], hf_home)
    assert result.returncode == 0, result.stderr[-3000:]
    from hw3lib.demo import MODELS_DIR

    result, _ = hw3(["llava-caption", str(images), str(tmp_path / "by_folder.json"), "--num-workers", "0",
                     "--device", "cpu", "--model", str(MODELS_DIR / "llava")], hf_home)
    assert result.returncode == 0, result.stderr[-3000:]
    by_id, by_folder = (json.loads((tmp_path / f).read_text()) for f in ("by_id.json", "by_folder.json"))
    assert len(by_id) == 4 and by_id == by_folder and all(by_id.values())


def test_timm_encoder_and_clip_load_by_name(hf_home):
    """timm and open_clip resolve their real names to the cached repos and load the very weights stored there."""
    code = f"""
import torch
from hw3lib.captioner import EncoderConfig, create_encoder
from hw3lib.metrics import ClipConfig, ClipScorer
enc, transform = create_encoder(EncoderConfig(name={TIMM_NAME!r}))
expected = torch.load({str(hf_home / "expected.pt")!r})["vit_sum"]
got = sum(float(v.double().sum()) for v in enc.state_dict().values())
assert abs(got - expected) < 1e-6 * max(1.0, abs(expected)), (got, expected)
clip = ClipScorer(ClipConfig(model="ViT-B-32-quickgelu", pretrained="openai", device="cpu"))
print("ok", tuple(enc.patch_embed.grid_size), clip.model.visual.conv1.weight.shape)
"""
    result, _ = hw3([], hf_home, code=code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok (14, 14)" in result.stdout


# ------------------------------------------------------------------------------------------------ errors
@pytest.fixture
def images(tmp_path, world):
    """A folder with one image: hw3 llava-caption checks its input before it loads a model."""
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(next((world / "p1_data/images/val").glob("*.jpg")), folder)
    return folder


def test_empty_cache_names_the_id_and_hw3_download(tmp_path, images):
    result, tried = hw3(["llava-caption", str(images), str(tmp_path / "out.json")], tmp_path / "empty")
    assert_one_line_error(result, LLAVA_ID, "not in the Hugging Face cache", "hw3 download")
    assert tried == []  # the cache was read; the network was not tried


def test_typo_in_the_id_suggests_the_cached_one(hf_home, tmp_path, images):
    result, _ = hw3(["llava-caption", str(images), str(tmp_path / "out.json"), "--model",
                     "llava-hf/llava-1.5-7b-hg"], hf_home)
    assert_one_line_error(result, "llava-hf/llava-1.5-7b-hg", f"Did you mean '{LLAVA_ID}'", "hw3 download")


def test_a_timm_name_where_llava_is_expected(hf_home, tmp_path, images):
    result, _ = hw3(["llava-caption", str(images), str(tmp_path / "out.json"), "--model", TIMM_NAME], hf_home)
    assert_one_line_error(result, TIMM_NAME, "timm", "not a LLaVA")
    result, _ = hw3(["llava-caption", str(images), str(tmp_path / "out.json"), "--model", f"timm/{TIMM_NAME}"],
                    hf_home)
    assert_one_line_error(result, f"timm/{TIMM_NAME}", "not a LLaVA")


def test_missing_weights_shard_is_named(hf_home, tmp_path, images):
    broken = tmp_path / "home"
    shutil.copytree(hf_home / "hub", broken / "hub", symlinks=True)
    snapshot = next((repo_folder(LLAVA_ID, broken / "hub") / "snapshots").iterdir())
    shard = sorted(snapshot.glob("model-*.safetensors"))[1]
    shard.unlink()
    result, tried = hw3(["llava-caption", str(images), str(tmp_path / "out.json")], broken)
    assert_one_line_error(result, LLAVA_ID, shard.name, "incomplete", "hw3 download")
    assert tried == []


def test_encoder_and_clip_absent_offline_fail_fast(tmp_path, world):
    empty = tmp_path / "empty"
    result, tried = hw3(["train", "--data-root", str(world), "--out", str(tmp_path / "run")], empty)
    assert_one_line_error(result, "vit_large_patch14_clip_224.openai_ft_in12k_in1k", "hw3 download")
    assert tried == []
    pred = tmp_path / "pred.json"
    ann = json.loads((world / "p1_data/val.json").read_text())
    pred.write_text(json.dumps({i["file_name"][:-4]: "a red circle" for i in ann["images"]}))
    result, tried = hw3(["evaluate", "--pred", str(pred), "--annotation", str(world / "p1_data/val.json"),
                         "--images", str(world / "p1_data/images/val")], empty)
    assert_one_line_error(result, "ViT-B-32-quickgelu", CLIP_REPO, "hw3 download")
    assert tried == []
