"""Shared fixtures. The demo world is built once (seconds; the stand-ins' weights are committed)."""
from __future__ import annotations

import json
import os
import shutil

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

LLAVA_ID = "llava-hf/llava-1.5-7b-hf"
TIMM_NAME = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
CLIP_REPO = "timm/vit_base_patch32_clip_224.openai"


@pytest.fixture(scope="session")
def world():
    """The demo profile's hw3_data root (built from its seed if missing)."""
    from hw3lib.demo import ensure_demo_data

    return ensure_demo_data(log=lambda *_: None)


@pytest.fixture(scope="session")
def models_dir(world):
    from hw3lib.demo import MODELS_DIR

    return MODELS_DIR


@pytest.fixture(scope="session")
def hf_home(tmp_path_factory, models_dir):
    """An HF_HOME whose hub cache holds the three models under their real ids (built once, ~10 s)."""
    import open_clip
    import timm
    import torch
    from safetensors.torch import save_file
    from transformers import LlavaForConditionalGeneration

    from hw3lib.rehearsal.hub_cache import write_folder, write_repo

    home = tmp_path_factory.mktemp("hf_home")
    cache, work = home / "hub", tmp_path_factory.mktemp("saved")
    # LLaVA: the stand-in, re-saved in shards so that a missing shard can be tested; its processor files beside it
    llava = LlavaForConditionalGeneration.from_pretrained(models_dir / "llava")
    llava.save_pretrained(work / "llava", max_shard_size="5MB")
    for f in (models_dir / "llava").iterdir():
        if f.suffix != ".safetensors" and f.name != "train_log.json" and not (work / "llava" / f.name).exists():
            shutil.copy(f, work / "llava" / f.name)
    assert len(list((work / "llava").glob("model-*.safetensors"))) > 1
    write_folder(LLAVA_ID, work / "llava", cache)
    # timm: random weights of a real timm name, in timm's hub format
    torch.manual_seed(0)
    vit = timm.create_model(TIMM_NAME, pretrained=False)
    save_file(vit.state_dict(), work / "vit.safetensors")
    (work / "config.json").write_text(json.dumps({"architecture": TIMM_NAME.split(".")[0], "num_classes": 1000,
                                                  "pretrained_cfg": vit.pretrained_cfg}, default=str))
    write_repo(f"timm/{TIMM_NAME}", {"model.safetensors": work / "vit.safetensors",
                                     "config.json": work / "config.json"}, cache)
    # CLIP ViT-B/32 (QuickGELU): random weights, fp16 to halve the file, as open_clip's 'openai' tag expects
    clip = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None)
    save_file({k: v.half().contiguous() for k, v in clip.state_dict().items()}, work / "clip.safetensors")
    write_repo(CLIP_REPO, {"open_clip_model.safetensors": work / "clip.safetensors"}, cache)
    body = {k: v for k, v in vit.state_dict().items() if not k.startswith("head")}  # num_classes=0 drops the head
    torch.save({"vit_sum": sum(float(v.double().sum()) for v in body.values())}, home / "expected.pt")
    return home


@pytest.fixture(scope="session")
def clip_scorer(models_dir):
    from hw3lib.metrics import ClipConfig, ClipScorer

    return ClipScorer(ClipConfig(model=str(models_dir / "clip"), pretrained=None, device="cpu"))


@pytest.fixture(scope="session")
def llava(models_dir):
    """The LLaVA stand-in (a real LlavaForConditionalGeneration + processor) on the CPU."""
    from hw3lib.llava import load_llava

    return load_llava(models_dir / "llava", device="cpu")


@pytest.fixture(scope="session")
def p1_records(world):
    from hw3lib.data import list_images

    return list_images(world / "p1_data" / "images" / "val")


def interrupt(cmd: list[str], ready, wait: float = 300) -> dict:
    """Start ``cmd`` as a terminal would (SIGINT not ignored, unlike in a shell's background job), send it SIGINT
    once ``ready(process)`` holds (a psutil process) (or it has ended, or ``wait`` seconds have passed), and wait for it. Returns its exit
    status, stderr, the seconds from the signal to its end, and the processes it had started then (still running
    ones: ``left()``). Whatever happens, nothing of it outlives the test."""
    import signal
    import subprocess
    import time

    import psutil

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + wait
        watched = psutil.Process(proc.pid)
        while proc.poll() is None and not ready(watched) and time.monotonic() < deadline:
            time.sleep(0.1)
        family = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        seconds = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            for p in psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]:
                p.kill()
            proc.wait()

    def left() -> list:
        time.sleep(1)
        return [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    return {"code": proc.returncode, "err": err, "seconds": seconds, "family": family, "left": left}
