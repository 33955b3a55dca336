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
