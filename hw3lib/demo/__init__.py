"""The demo profile: the shapes world (regenerated from its seed) and the stand-in models (committed weights)."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from .standins import DEFAULT_DIR as MODELS_DIR
from .world import WorldConfig, build_world, world_is_built

WORLD_DIR = MODELS_DIR.parent / "hw3_data"
STANDINS = {  # stand-in -> the files that make it
    "decoder": ("decoder_model.bin", "encoder.json", "vocab.bpe"),
    "vit": ("config.json", "model.safetensors"),
    "clip": ("open_clip_config.json", "open_clip_model.safetensors"),
    "llava": ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json"),  # after clip: its tower
}
COURSE_FILES = ("decoder_model.bin", "encoder.json", "vocab.bpe")  # copied into p2_data/, as the course ships them


def missing_standins(models_dir: Path = MODELS_DIR) -> list[str]:
    return [name for name, files in STANDINS.items() if not all((models_dir / name / f).is_file() for f in files)]


def ensure_demo_data(rebuild: bool = False, retrain: tuple[str, ...] = (), world_dir: Path = WORLD_DIR,
                     models_dir: Path = MODELS_DIR, cfg: WorldConfig = WorldConfig(), log=print) -> Path:
    """Build the shapes world if it is missing or stale, (re)train missing stand-ins (all of them with
    ``rebuild``; the named ones with ``retrain``), and put the decoder files into ``p2_data/`` as the course does.
    Returns the world's root."""
    if rebuild or not world_is_built(world_dir, cfg):
        t0 = time.time()
        log(f"building the shapes world (seed {cfg.seed}) in {world_dir} ...")
        if world_dir.exists():
            shutil.rmtree(world_dir)
        build_world(world_dir, cfg)
        log(f"  world built in {time.time() - t0:.0f}s")
    unknown = set(retrain) - set(STANDINS)
    if unknown:
        raise ValueError(f"unknown stand-in(s) {sorted(unknown)}; choose from {list(STANDINS)}")
    todo = list(STANDINS) if rebuild else [n for n in STANDINS if n in retrain or n in missing_standins(models_dir)]
    if todo:
        from .standins import build_all

        build_all(world_dir, models_dir, tuple(todo))
    for f in COURSE_FILES:
        src, dst = models_dir / "decoder" / f, world_dir / "p2_data" / f
        if not dst.is_file() or dst.stat().st_mtime < src.stat().st_mtime or dst.stat().st_size != src.stat().st_size:
            shutil.copy2(src, dst)
    return world_dir
