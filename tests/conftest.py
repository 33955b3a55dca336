"""Shared fixtures. The demo world is built once (seconds; the stand-ins' weights are committed)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


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
