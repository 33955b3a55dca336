"""Caption sets in the HW3 layout (COCO captions JSON + an image folder), image loading, datasets and collate.

The course's JSON is the COCO captions format::

    {"images": [{"id": int, "file_name": "000000001086.jpg"}, ...],
     "annotations": [{"image_id": int, "caption": str, "id": int}, ...]}

and predictions are ``{file name without extension: caption}``. Every problem with the input is reported as a
:class:`DataError` that names the file and says what is wrong.
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class DataError(ValueError):
    """Bad input data; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Record:
    image_path: Path  # the image file
    file_id: str  # file name without extension: the key of predictions and references
    references: tuple[str, ...]  # the reference captions (empty for an unlabelled folder)


def _no_duplicate_keys(pairs: list) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:  # json would keep the last one silently
            raise ValueError(f"the key {key!r} appears twice")
        seen[key] = value
    return seen


def read_json(path: str | Path):
    """A JSON file (UTF-8, with or without a byte-order mark); a key that appears twice in an object is an error."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"), object_pairs_hook=_no_duplicate_keys)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not a JSON file") from None
    except PermissionError:
        raise DataError(f"{path}: not readable (permission denied)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    except ValueError as e:
        raise DataError(f"{path}: {e}; each key may appear once") from None


def load_annotations(path: str | Path) -> dict[str, list[str]]:
    """``{file id: [reference captions]}`` from a COCO captions JSON, in the order of its ``images`` list.

    Raises:
        DataError: not COCO captions (missing keys, wrong types), an annotation whose ``image_id`` is not among the
            images, an image without any caption, or two images with the same file name.
    """
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(
            data.get("annotations"), list):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise DataError(f"{path}: not a COCO captions file: expected an object with lists 'images' and "
                        f"'annotations', got {keys}")
    if not data["images"]:
        raise DataError(f"{path}: 'images' is empty: nothing to evaluate")
    id_to_name: dict = {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not isinstance(img.get("id"), (int, str)) or isinstance(img["id"], bool) \
                or not isinstance(img.get("file_name"), str):
            raise DataError(f"{path}: images[{i}] needs an 'id' (number or string) and a string 'file_name', "
                            f"got {str(img)[:120]}")
        name = Path(img["file_name"]).stem
        if name in id_to_name.values():
            raise DataError(f"{path}: images[{i}]: file name {img['file_name']!r} appears twice")
        if img["id"] in id_to_name:  # its captions would go to one image, the other would have none
            raise DataError(f"{path}: images[{i}]: id {img['id']!r} appears twice (also for "
                            f"{id_to_name[img['id']]!r}); each image needs an id of its own")
        id_to_name[img["id"]] = name
    refs: dict[str, list[str]] = defaultdict(list)
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not isinstance(ann.get("image_id"), (int, str)) \
                or not isinstance(ann.get("caption"), str):
            raise DataError(f"{path}: annotations[{i}] needs an 'image_id' (number or string) and a string "
                            f"'caption', got {str(ann)[:120]}")
        if ann["image_id"] not in id_to_name:
            raise DataError(f"{path}: annotations[{i}] refers to image_id {ann['image_id']!r}, "
                            f"which is not in 'images'")
        refs[id_to_name[ann["image_id"]]].append(ann["caption"])
    missing = [n for n in id_to_name.values() if n not in refs]
    if missing:
        raise DataError(f"{path}: {len(missing)} image(s) have no caption, e.g. {missing[:3]}")
    return {n: refs[n] for n in id_to_name.values()}


def load_split(annotation: str | Path, image_dir: str | Path, check_images: bool = True) -> list[Record]:
    """Records of a captioned split: each image of the JSON with its references.

    Args:
        annotation: the COCO captions JSON (``p2_data/val.json``).
        image_dir: the folder of its images (``p2_data/images/val``).
        check_images: fail now, naming the file, when an image is missing (not when it is corrupt: that is found
            when it is loaded).
    """
    refs = load_annotations(annotation)
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: image folder not found")
    names = {p.stem: p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    records = []
    for file_id, caps in refs.items():
        path = names.get(file_id, image_dir / f"{file_id}.jpg")
        if check_images and file_id not in names:
            raise DataError(f"{path}: image listed in {annotation} not found")
        records.append(Record(path, file_id, tuple(caps)))
    return records


def hw3_split(root: str | Path, part: str, split: str = "val") -> list[Record]:
    """A split of an ``hw3_data`` root by name: ``hw3_split(root, "p2_data", "train")`` reads
    ``p2_data/train.json`` with ``p2_data/images/train``."""
    folder = Path(root) / part
    return load_split(folder / f"{split}.json", folder / "images" / split)


def list_images(image_dir: str | Path) -> list[Record]:
    """Records (without references) of every image in a folder, sorted by name."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: image folder not found")
    paths = sorted(p for p in image_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DataError(f"{image_dir}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    nested = sorted(str(p.relative_to(image_dir)) for p in image_dir.rglob("*")
                    if p.parent != image_dir and p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if nested:
        warnings.warn(f"{image_dir}: {len(nested)} image(s) in subfolders are skipped (only the folder's own "
                      f"images are captioned), e.g. {nested[:3]}", stacklevel=2)
    by_stem: dict[str, list[Path]] = defaultdict(list)
    for p in paths:
        by_stem[p.stem].append(p)
    twins = {stem: group for stem, group in by_stem.items() if len(group) > 1}
    if twins:
        stem, group = next(iter(twins.items()))
        warnings.warn(f"{image_dir}: {len(twins)} name(s) are shared by several images; predictions are keyed by "
                      f"the name, so only the first of each is captioned, e.g. {[p.name for p in group]}",
                      stacklevel=2)
    return [Record(group[0], stem, ()) for stem, group in by_stem.items()]


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: 16-bit and float images are rescaled (not clipped to white), transparency is
    composited on white, palette and grayscale images are expanded."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        hi = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        image = Image.fromarray(arr)  # uint8 (H, W) -> mode L
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Open an image as RGB; a missing, truncated or non-image file raises :class:`DataError` naming it."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im)
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image file (or an unsupported format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: corrupt or truncated image ({e})") from None


class ImageDataset:
    """A map-style dataset of records -> ``(transform(image), index)``, for DataLoaders with workers."""

    def __init__(self, records: list[Record], transform=None):
        self.records, self.transform = records, transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        image = load_image(self.records[i].image_path)
        return (self.transform(image) if self.transform is not None else image), i


def read_predictions(path: str | Path) -> dict[str, str]:
    """A predictions JSON ``{file id: caption}``; checks that it is an object of strings."""
    path = Path(path)
    pred = read_json(path)
    if not isinstance(pred, dict):
        raise DataError(f"{path}: predictions must be a JSON object {{file id: caption}}, got {type(pred).__name__}")
    bad = {k: type(v).__name__ for k, v in pred.items() if not isinstance(v, str)}
    if bad:
        first = next(iter(bad.items()))
        raise DataError(f"{path}: every caption must be a string; {len(bad)} are not, e.g. {first[0]!r}: {first[1]}")
    empty = [k for k, v in pred.items() if not v.strip()]
    if empty:
        warnings.warn(f"{path}: {len(empty)} of {len(pred)} captions are empty or whitespace (they score 0), "
                      f"e.g. {empty[:3]}", stacklevel=2)
    return pred


def check_keys(pred: dict, refs: dict, pred_name: str = "predictions", ref_name: str = "annotations") -> None:
    """Prediction keys must equal the reference keys (the course's evaluate.py asserts the same)."""
    missing = sorted(set(refs) - set(pred))
    extra = sorted(set(pred) - set(refs))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if extra:
            parts.append(f"{len(extra)} extra (e.g. {extra[:3]})")
        raise DataError(f"{pred_name}: keys differ from the images of {ref_name}: {'; '.join(parts)}. Keys are file "
                        f"names without extension, like '000000001086'")
    bad = [k for k, v in pred.items() if not isinstance(v, str)]
    if bad:
        raise DataError(f"{pred_name}: captions must be strings; not for {bad[:3]}")


def check_output_file(path: str | Path, what: str = "output") -> Path:
    """Before any work: ``path`` can be written as a file (not a folder; its folder exists or can be made and is
    writable). Raises :class:`DataError` naming it."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder; the {what} must be a file path (e.g. {path / 'pred.json'})")
    _check_writable_folder(path.parent, what)
    return path


def check_output_dir(path: str | Path, what: str = "output folder") -> Path:
    """Before any work: ``path`` is (or can be made) a writable folder, not a file. Creates it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DataError(f"{path}: is a file; the {what} must be a folder")
    _check_writable_folder(path, what)
    return path


def _check_writable_folder(folder: Path, what: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise DataError(f"{folder}: a file stands where the {what}'s folder should be") from None
    except OSError as e:
        raise DataError(f"{folder}: cannot create the {what}'s folder ({e.strerror})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DataError(f"{folder}: the {what}'s folder is not writable")


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary name beside ``path`` to write to. On success one rename puts it in place, so a killed job
    never leaves half a file under the real name; on failure the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | Path, payload, indent: int | None = 1) -> None:
    """Write JSON through a temporary file and a rename (:func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=indent, ensure_ascii=False), encoding="utf-8")


ROOT = Path(__file__).resolve().parents[1]  # the workbook's folder: where the notebooks run, and the demo's models lie


def relative(path: str | Path, start: str | Path | None = None) -> str:
    """``path`` relative to ``start`` (the working directory: the workbook's root in its notebooks) when it lies
    inside it, else as given: what reports print, so that no one's home folder ends up in them."""
    path, start = Path(path), Path(start or Path.cwd())
    try:
        return str(path.resolve().relative_to(start.resolve()))
    except ValueError:
        return str(path)
