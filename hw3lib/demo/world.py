"""The shapes world: a procedurally generated captioning data set written in the HW3 layout.

Every image holds 1-3 coloured shapes on a plain, slightly noisy background. Because the scenes are synthetic the
ground truth is known exactly: each object's colour, shape, size, tight box and pixel mask. That turns two things
that real data only lets you eyeball into measurements: whether a caption names the right objects
(:func:`parse_caption`) and whether an attention map points at the object a word names (boxes and masks).

Layout written by :func:`build_world` (the same as the course's ``hw3_data/``)::

    p1_data/images/val/*.jpg + p1_data/val.json
    p2_data/images/{train,val}/*.jpg + p2_data/{train,val}.json
    p3_data/images/*.jpg                                   5 fixed scenes
    <every split>: <name>_objects.json (colour, shape, size, box per object) + <name>_masks.npz (label maps)

Everything is a pure function of :class:`WorldConfig`: the same seed gives byte-identical JSON and the same pixels.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..data import write_json_atomic

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 200, 30),
    "purple": (135, 55, 175),
    "orange": (245, 130, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
SIZES: dict[str, tuple[int, int]] = {"small": (16, 22), "large": (30, 38)}  # side of the shape in px at 96 px
GENERATOR_VERSION = 2  # bump when the generator's output changes for the same config: stale worlds are rebuilt
SCALE = 4  # render at 4x, then downsample: anti-aliased edges like a real photo's, masks from the same geometry


@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0  # everything (scenes, captions, split membership) follows from it
    image_size: int = 96  # square images; 96 px keeps CPU training in minutes and fits patch 8 (12 x 12 grid)
    num_train: int = 3000  # p2 train: enough for a captioner to learn colours, shapes and counts
    num_val: int = 300  # p2 val: CIDEr over 300 images is stable to about +-0.02
    num_p1: int = 100  # p1 val: the LLaVA sweep captions it once per setting
    max_objects: int = 3  # 1..max_objects objects per scene
    captions_per_image: int = 5  # as in COCO

    def fingerprint(self) -> str:
        payload = {**asdict(self), "generator_version": GENERATOR_VERSION}
        return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Obj:
    color: str
    shape: str
    size: str
    center: tuple[int, int]  # in 96-px coordinates
    side: int  # px at 96


# --------------------------------------------------------------------------------------------------- rendering
def _shape_polygon(shape: str, cx: float, cy: float, side: float) -> list[tuple[float, float]] | None:
    h = side / 2
    if shape == "triangle":
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "star":
        pts = []
        for k in range(10):
            r = h if k % 2 == 0 else h * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + r * math.cos(a), cy + h * 0.1 + r * math.sin(a)))
        return pts
    return None


def _draw(draw: ImageDraw.ImageDraw, obj: Obj, fill) -> None:
    cx, cy, side = obj.center[0] * SCALE, obj.center[1] * SCALE, obj.side * SCALE
    h = side / 2
    if obj.shape == "circle":
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif obj.shape == "square":
        draw.rectangle([cx - h * 0.85, cy - h * 0.85, cx + h * 0.85, cy + h * 0.85], fill=fill)
    else:
        draw.polygon(_shape_polygon(obj.shape, cx, cy, side), fill=fill)


def render(objects: list[Obj], size: int, rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
    """Draw a scene. Returns the RGB image and its label map (0 = background, k = objects[k - 1])."""
    big = size * SCALE
    tint = rng.integers(200, 240)
    bg = tuple(int(np.clip(tint + rng.integers(-12, 13), 0, 255)) for _ in range(3))
    canvas = Image.new("RGB", (big, big), bg)
    labels = Image.new("L", (big, big), 0)
    d_img, d_lab = ImageDraw.Draw(canvas), ImageDraw.Draw(labels)
    for k, obj in enumerate(objects, start=1):
        jitter = rng.integers(-18, 19, size=3)
        colour = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLORS[obj.color], jitter))
        _draw(d_img, obj, colour)
        _draw(d_lab, obj, k)
    image = canvas.resize((size, size), Image.Resampling.LANCZOS)
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 3.0, (size, size, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    # label of each output pixel = label at the centre of its SCALE x SCALE block
    lab = np.asarray(labels)[SCALE // 2 :: SCALE, SCALE // 2 :: SCALE].copy()
    return image, lab


def _place(rng: np.random.Generator, n: int, size: int) -> list[Obj]:
    objects: list[Obj] = []
    boxes: list[tuple[float, float, float, float]] = []
    for _ in range(n):
        for _try in range(200):
            size_name = str(rng.choice(list(SIZES)))
            lo, hi = SIZES[size_name]
            side = int(rng.integers(lo, hi + 1)) * size // 96
            h = side / 2
            cx = int(rng.integers(math.ceil(h) + 2, size - math.ceil(h) - 2))
            cy = int(rng.integers(math.ceil(h) + 2, size - math.ceil(h) - 2))
            box = (cx - h - 3, cy - h - 3, cx + h + 3, cy + h + 3)
            if all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for b in boxes):
                colour = str(rng.choice(list(COLORS)))
                shape = str(rng.choice(SHAPES))
                objects.append(Obj(colour, shape, size_name, (cx, cy), side))
                boxes.append(box)
                break
    return objects


# --------------------------------------------------------------------------------------------------- captions
_NUMBERS = {1: "one", 2: "two", 3: "three"}


def _phrase(obj: Obj, with_size: bool) -> str:
    words = [obj.size, obj.color, obj.shape] if with_size else [obj.color, obj.shape]
    return f"{'an' if words[0][0] in 'aeiou' else 'a'} {' '.join(words)}"


def _join(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _where(obj: Obj, size: int) -> str:
    x, y = obj.center
    third = size / 3
    row = "top" if y < third else "bottom" if y > 2 * third else ""
    col = "left" if x < third else "right" if x > 2 * third else ""
    if not row and not col:
        return "in the center"
    return f"in the {' '.join(w for w in (row, col) if w)}" if row and col else f"on the {row or col}"


def captions_for(objects: list[Obj], size: int, rng: np.random.Generator, k: int) -> list[str]:
    """k distinct reference captions in varied styles, like COCO's five annotators."""
    n = len(objects)

    def objs(with_size: bool, shuffle: bool = True) -> str:
        order = list(rng.permutation(n)) if shuffle else list(range(n))
        return _join([_phrase(objects[i], with_size) for i in order])

    left_to_right = sorted(objects, key=lambda o: o.center[0])
    styles = [
        lambda: f"{objs(True)}.",
        lambda: f"there is {objs(False)} on a gray background",
        lambda: f"an image of {objs(bool(rng.integers(2)))}",
        lambda: f"{objs(False)} on a plain background",
        lambda: f"a picture showing {objs(True)}",
        lambda: (f"a single {_phrase(objects[0], True)[2:]} {_where(objects[0], size)}" if n == 1
                 else f"{_NUMBERS[n]} shapes: {objs(False)}"),
        lambda: (f"{_phrase(objects[0], False)} {_where(objects[0], size)}" if n == 1 else
                 f"{_phrase(left_to_right[0], False)} to the left of {_phrase(left_to_right[-1], False)}"
                 + (f" and {_phrase(left_to_right[1], False)}" if n == 3 else "")),
        lambda: f"{objs(False)} drawn on a light background",
    ]
    out: list[str] = []
    for i in rng.permutation(len(styles)):
        text = styles[i]()
        text = text[0].upper() + text[1:] if rng.random() < 0.5 else text
        if text not in out:
            out.append(text)
        if len(out) == k:
            break
    return out


_SHAPE_RE = "|".join(SHAPES)
_COLOR_RE = "|".join(COLORS)
_OBJECT = re.compile(rf"\b({_COLOR_RE})\s+(?:(?:small|large|big|tiny)\s+)?({_SHAPE_RE})(?:e?s)?\b")
_OBJECT_SIZE_FIRST = re.compile(rf"\b(?:small|large|big|tiny)\s+({_COLOR_RE})\s+({_SHAPE_RE})(?:e?s)?\b")


def parse_caption(caption: str) -> frozenset[tuple[str, str]]:
    """The set of (colour, shape) objects a caption names, e.g. ``{("red", "circle"), ("blue", "square")}``.

    A shape counts when a colour word stands right before it (a size word may sit between them); counts and
    plurals collapse ("two red circles" -> ``{("red", "circle")}``), which is what *caption accuracy* compares.
    """
    text = caption.lower()
    return frozenset((m.group(1), m.group(2)) for m in _OBJECT.finditer(text)) | frozenset(
        (m.group(1), m.group(2)) for m in _OBJECT_SIZE_FIRST.finditer(text))


def object_set(objects: list[dict]) -> frozenset[tuple[str, str]]:
    return frozenset((o["color"], o["shape"]) for o in objects)


# --------------------------------------------------------------------------------------------------- p3 scenes
P3_SCENES: list[list[Obj]] = [  # fixed, hand-made: one object; two apart; three; small ones; same colour twice
    [Obj("red", "circle", "large", (48, 48), 36)],
    [Obj("blue", "square", "large", (24, 50), 32), Obj("yellow", "triangle", "large", (72, 46), 32)],
    [Obj("green", "star", "large", (24, 26), 32), Obj("purple", "circle", "small", (70, 24), 20),
     Obj("orange", "square", "large", (50, 72), 30)],
    [Obj("orange", "circle", "small", (20, 76), 18), Obj("blue", "star", "small", (78, 18), 20)],
    [Obj("red", "triangle", "large", (28, 30), 34), Obj("red", "square", "small", (72, 70), 20)],
]


# --------------------------------------------------------------------------------------------------- writing
def _file_name(image_id: int) -> str:
    return f"{image_id:012d}.jpg"


def _obj_record(obj: Obj, labels: np.ndarray, k: int) -> dict:
    ys, xs = np.nonzero(labels == k)
    box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1] if len(xs) else [0, 0, 0, 0]
    return {"color": obj.color, "shape": obj.shape, "size": obj.size, "box": box}


def _write_split(image_dir: Path, ann_path: Path | None, sidecar_stem: Path, scenes: list[list[Obj]],
                 ids: list[int], rng: np.random.Generator, cfg: WorldConfig) -> None:
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations, objects, masks = [], [], {}, []
    for image_id, scene in zip(ids, scenes):
        image, labels = render(scene, cfg.image_size, rng)
        name = _file_name(image_id)
        image.save(image_dir / name, quality=95)
        images.append({"id": image_id, "file_name": name})
        caps = captions_for(scene, cfg.image_size, rng, cfg.captions_per_image)
        for caption in caps:
            annotations.append({"image_id": image_id, "caption": caption, "id": len(annotations) + 1})
        stem = name[:-4]
        objects[stem] = {"objects": [_obj_record(o, labels, k) for k, o in enumerate(scene, 1)], "captions": caps}
        masks.append(labels)
    if ann_path is not None:
        write_json_atomic(ann_path, {"images": images, "annotations": annotations})
    write_json_atomic(Path(f"{sidecar_stem}_objects.json"),
                {"image_size": cfg.image_size, "colors": list(COLORS), "shapes": list(SHAPES), "images": objects})
    np.savez_compressed(f"{sidecar_stem}_masks.npz", labels=np.stack(masks),
                        names=np.array([_file_name(i)[:-4] for i in ids]))


def build_world(root: str | Path, cfg: WorldConfig = WorldConfig()) -> Path:
    """Write the whole world under ``root`` (a ``hw3_data`` folder). Returns ``root``.

    A ``world.json`` stamp records the config; :func:`world_is_built` compares it, so a changed config rebuilds.
    """
    root = Path(root)
    rng = np.random.default_rng(cfg.seed)
    total = cfg.num_train + cfg.num_val + cfg.num_p1 + len(P3_SCENES)
    ids = [int(i) for i in rng.choice(np.arange(1, 600_000), size=total, replace=False)]
    counts = rng.integers(1, cfg.max_objects + 1, size=total)
    scenes = [_place(rng, int(n), cfg.image_size) for n in counts[: total - len(P3_SCENES)]]
    scenes += [[Obj(o.color, o.shape, o.size, (o.center[0] * cfg.image_size // 96, o.center[1] * cfg.image_size // 96),
                    o.side * cfg.image_size // 96) for o in scene] for scene in P3_SCENES]
    a, b, c = cfg.num_train, cfg.num_train + cfg.num_val, cfg.num_train + cfg.num_val + cfg.num_p1
    p2 = root / "p2_data"
    _write_split(p2 / "images/train", p2 / "train.json", p2 / "train", scenes[:a], ids[:a], rng, cfg)
    _write_split(p2 / "images/val", p2 / "val.json", p2 / "val", scenes[a:b], ids[a:b], rng, cfg)
    p1 = root / "p1_data"
    _write_split(p1 / "images/val", p1 / "val.json", p1 / "val", scenes[b:c], ids[b:c], rng, cfg)
    p3 = root / "p3_data"
    _write_split(p3 / "images", None, p3 / "p3", scenes[c:], ids[c:], rng, cfg)
    write_json_atomic(root / "world.json", {"config": asdict(cfg), "fingerprint": cfg.fingerprint()})
    return root


def world_is_built(root: str | Path, cfg: WorldConfig = WorldConfig()) -> bool:
    stamp = Path(root) / "world.json"
    try:
        return json.loads(stamp.read_text())["fingerprint"] == cfg.fingerprint()
    except (OSError, ValueError, KeyError):
        return False


def load_objects(sidecar: str | Path) -> dict[str, list[dict]]:
    """``{file id: [{"color", "shape", "size", "box"}, ...]}`` from a ``*_objects.json`` sidecar."""
    data = json.loads(Path(sidecar).read_text())
    return {k: v["objects"] for k, v in data["images"].items()}


def load_masks(sidecar_npz: str | Path) -> dict[str, np.ndarray]:
    """``{file id: label map (H, W) uint8}``; label k marks object k - 1 of that image's object list."""
    with np.load(sidecar_npz) as z:
        return {str(n): lab for n, lab in zip(z["names"], z["labels"])}


def random_scenes(n: int, seed: int, cfg: WorldConfig = WorldConfig()) -> tuple[list, list, list]:
    """``n`` fresh scenes outside the saved splits (for pre-training stand-ins): RGB arrays (H, W, 3) uint8, label
    maps, and object lists in the sidecar format. JPEG round trip included, as the saved images have it."""
    import io

    rng = np.random.default_rng(seed)
    images, labels, objects = [], [], []
    for count in rng.integers(1, cfg.max_objects + 1, size=n):
        scene = _place(rng, int(count), cfg.image_size)
        image, lab = render(scene, cfg.image_size, rng)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=95)
        images.append(np.asarray(Image.open(buf).convert("RGB")))
        labels.append(lab)
        objects.append([_obj_record(o, lab, k) for k, o in enumerate(scene, 1)])
    return images, labels, objects


def caption_accuracy(predictions: dict[str, str], objects: dict[str, list[dict]]) -> tuple[float, dict[str, bool]]:
    """Fraction of images whose caption names exactly their set of (colour, shape) objects, and per image."""
    per = {k: parse_caption(c) == object_set(objects[k]) for k, c in predictions.items()}
    return (sum(per.values()) / len(per) if per else 0.0), per


def ground_truth(split_dir: str | Path, split: str = "val") -> dict[str, list[dict]] | None:
    """The objects of each image of ``split_dir`` (``p1_data`` or ``p2_data``) when it is the shapes world's, else
    None (the course's data has no such file)."""
    sidecar = Path(split_dir) / f"{split}_objects.json"
    return load_objects(sidecar) if sidecar.is_file() else None


def world_scores(split_dir: str | Path, split: str = "val") -> dict:
    """Extra columns for a sweep or an evaluation: ``{"caption_accuracy": predictions -> float}`` on the shapes
    world, nothing on other data."""
    objects = ground_truth(split_dir, split)
    return {} if objects is None else {"caption_accuracy": lambda pred: caption_accuracy(pred, objects)[0]}


def accuracy_report(predictions: dict[str, str], objects: dict[str, list[dict]], n_wrong: int = 5
                    ) -> tuple[list[dict], list[str]]:
    """Caption accuracy by the number of objects in the scene (table rows), and the first ``n_wrong`` wrong
    captions with what they name and what the scene holds."""
    _, per_image = caption_accuracy(predictions, objects)
    by_count: dict[int, list[bool]] = {}
    for k, ok in per_image.items():
        by_count.setdefault(len(objects[k]), []).append(ok)
    rows = [{"objects in the scene": n, "images": len(v), "caption accuracy": sum(v) / len(v)}
            for n, v in sorted(by_count.items())]
    wrong = [f"{k}: {predictions[k]!r} names {sorted(parse_caption(predictions[k]))}, the scene holds "
             f"{sorted(object_set(objects[k]))}" for k, ok in per_image.items() if not ok][:n_wrong]
    return rows, wrong
