"""A COCO-like ``hw3_data/`` in the course's exact layout, with the quirks of the real COCO files.

What the real data throws at a pipeline, and this reproduces:
* JPEGs at COCO's usual sizes (640 x 480, 480 x 640, 640 x 427, 500 x 375, 612 x 612 ...), landscape and portrait;
* a few grayscale and CMYK JPEGs, and one that carries an EXIF orientation tag (as the course's code does, nothing
  rotates it: ``Image.open(...).convert("RGB")``);
* 12-digit zero-padded names of non-consecutive COCO-style ids;
* five captions per image with real-world noise: capitals, trailing spaces and newlines, missing or doubled
  punctuation, a duplicated caption.

The pictures are smooth colour fields with a few shapes: the rehearsal measures the path and its cost, not quality
(its weights are random). Deterministic from ``seed``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..data import write_json_atomic

COCO_SIZES = [(640, 480), (480, 640), (640, 427), (500, 375), (612, 612), (427, 640), (640, 424), (375, 500),
              (640, 512), (640, 360)]
_SUBJECTS = ["a man", "a woman", "two people", "a dog", "a cat", "a group of people", "a young boy", "a giraffe",
             "a train", "a red bus", "a plate of food", "a large kitchen", "an elephant", "a tennis player"]
_ACTIONS = ["standing next to", "sitting on", "riding", "walking down", "looking at", "holding", "parked near",
            "in front of", "on top of", "playing with"]
_OBJECTS = ["a wooden bench", "the street", "a surfboard", "a table", "a field of grass", "a building",
            "the beach", "a skateboard", "a frisbee", "some trees", "a white wall", "a snowy hill"]


@dataclass
class CocoLikeSizes:
    """How many images each split gets (the course's data: p1 val 500, p2 train ~10,000, p2 val ~1,500, p3 5)."""

    p1_val: int = 200
    p2_train: int = 2000
    p2_val: int = 300
    p3: int = 5  # the course's five P3 images


def _caption(rng: np.random.Generator) -> str:
    s = f"{rng.choice(_SUBJECTS)} {rng.choice(_ACTIONS)} {rng.choice(_OBJECTS)}"
    if rng.random() < 0.4:
        s += f" {rng.choice(['with', 'near', 'beside'])} {rng.choice(_OBJECTS)}"
    return s[0].upper() + s[1:] + "."


def _noisy(caption: str, rng: np.random.Generator) -> str:
    """One of COCO's habits: ALL CAPS, lower case, no full stop, doubled punctuation, trailing space / newline."""
    r = rng.random()
    if r < 0.06:
        caption = caption.upper()
    elif r < 0.2:
        caption = caption.lower()
    r = rng.random()
    if r < 0.25:
        caption = caption.rstrip(".")
    elif r < 0.3:
        caption = caption.rstrip(".") + " ."
    elif r < 0.33:
        caption = caption.rstrip(".") + "!!"
    r = rng.random()
    if r < 0.1:
        caption += " "
    elif r < 0.15:
        caption += "\n"
    elif r < 0.18:
        caption += "  \n"
    return caption


def captions_for(rng: np.random.Generator) -> list[str]:
    caps = [_noisy(_caption(rng), rng) for _ in range(5)]
    if rng.random() < 0.05:  # annotators sometimes typed the same sentence twice
        caps[4] = caps[0]
    return caps


def _picture(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    w, h = size
    x = np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    a, b, c = (rng.random((1, 1, 3), dtype=np.float32) * 255 for _ in range(3))
    arr = a * (1 - x) * (1 - y) + b * x + c * y * (1 - x)
    arr = arr + rng.normal(0, 6, (h, w, 3)).astype(np.float32)
    image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 5))):
        x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
        x1, y1 = x0 + int(rng.integers(30, w // 2)), y0 + int(rng.integers(30, h // 2))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
    return image


def _save(image: Image.Image, path: Path, quirk: str) -> None:
    if quirk == "gray":
        image.convert("L").save(path, quality=88)
    elif quirk == "cmyk":
        image.convert("CMYK").save(path, quality=88)
    elif quirk == "exif":
        exif = Image.Exif()
        exif[0x0112] = 6  # Orientation: rotate 90 CW to display
        image.save(path, quality=88, exif=exif.tobytes())
    else:
        image.save(path, quality=88)


def _quirk(i: int) -> str:
    return "exif" if i == 3 else "gray" if i % 47 == 5 else "cmyk" if i % 61 == 7 else ""


def _write_image(task: tuple[Path, tuple[int, int], str, int]) -> None:
    path, size, quirk, seed = task
    _save(_picture(size, np.random.default_rng(seed)), path, quirk)


def write_split(image_dir: Path, annotation: Path | None, n: int, rng: np.random.Generator, used: set[int],
                log=print, workers: int = 0) -> dict[str, int]:
    """``n`` images into ``image_dir`` and (when given) their COCO captions JSON; returns counts of the quirks.
    Each picture has its own seed, so ``workers`` processes write the same files as one."""
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations, tasks, counts = [], [], [], {"gray": 0, "cmyk": 0, "exif": 0}
    for i in range(n):
        image_id = int(rng.integers(1, 600_000))
        while image_id in used:
            image_id = int(rng.integers(1, 600_000))
        used.add(image_id)
        name = f"{image_id:012d}.jpg"
        size = COCO_SIZES[int(rng.integers(len(COCO_SIZES)))]
        quirk = _quirk(i)
        if quirk:
            counts[quirk] += 1
        tasks.append((image_dir / name, size, quirk, int(rng.integers(2**63))))
        images.append({"file_name": name, "id": image_id, "width": size[0], "height": size[1]})
        for caption in captions_for(rng):
            annotations.append({"image_id": image_id, "id": 100_000 + len(annotations) * 7, "caption": caption})
    if workers > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            pool.map(_write_image, tasks, chunksize=16)
    else:
        for task in tasks:
            _write_image(task)
    if annotation is not None:
        write_json_atomic(annotation, {"images": images, "annotations": annotations}, indent=None)
    log(f"  {image_dir}: {n} JPEGs ({', '.join(f'{v} {k}' for k, v in counts.items())})")
    return counts


def write_hw3_data(root: str | Path, sizes: CocoLikeSizes = CocoLikeSizes(), seed: int = 0, log=print,
                   workers: int | None = None) -> Path:
    """The course's ``hw3_data/`` layout with COCO-like images and captions (no decoder weights: see weights.py)."""
    import os

    root = Path(root)
    rng, used = np.random.default_rng(seed), set()
    workers = min(16, os.cpu_count() or 1) if workers is None else workers
    for image_dir, annotation, n in (("p1_data/images/val", "p1_data/val.json", sizes.p1_val),
                                     ("p2_data/images/train", "p2_data/train.json", sizes.p2_train),
                                     ("p2_data/images/val", "p2_data/val.json", sizes.p2_val),
                                     ("p3_data/images", None, sizes.p3)):
        write_split(root / image_dir, root / annotation if annotation else None, n, rng, used, log, workers)
    return root
