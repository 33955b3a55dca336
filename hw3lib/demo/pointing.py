"""Pointing accuracy on the shapes world: does the peak of a colour or shape word's attention map lie on an object
with that colour or shape? The world's ground truth (objects and masks) makes it a number; the chance rate is the
fraction of patches that would count as a hit.

A word points correctly when the peak patch's centre lies inside, or within ``radius`` (one encoder patch) of, an
object with the attribute it names. A word naming an attribute that no object has is a miss (chance 0 for it).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from ..attention import aggregate, choose_view, crop_box, with_query
from .world import COLORS, SHAPES, load_masks, load_objects


@dataclass
class Pointing:
    hits: int = 0
    total: int = 0
    chance_sum: float = 0.0

    def add(self, hit: bool, chance: float) -> None:
        self.hits += int(hit)
        self.total += 1
        self.chance_sum += chance

    @property
    def accuracy(self) -> float:
        return self.hits / self.total if self.total else float("nan")

    @property
    def chance(self) -> float:
        return self.chance_sum / self.total if self.total else float("nan")


def _singular(word: str) -> str:
    w = word.lower().strip(".,;:!?\"'()")
    return w[:-1] if w.endswith("s") and w[:-1] in {"circle", "square", "triangle", "star"} else w


def attribute_words(words: list[str], colors, shapes) -> list[tuple[int, str, str]]:
    """``(index, "color" | "shape", value)`` for every colour or shape word."""
    out = []
    for i, w in enumerate(words):
        s = _singular(w)
        if s in colors:
            out.append((i, "color", s))
        elif s in shapes:
            out.append((i, "shape", s))
    return out


def hit_region(labels: np.ndarray, objects: list[dict], attribute: str, value: str, radius: float) -> np.ndarray:
    """Pixels within ``radius`` of an object that has ``attribute == value`` (``labels``: 0 background, k object
    k - 1, at the model's view)."""
    ks = [k + 1 for k, o in enumerate(objects) if o[attribute] == value]
    mask = np.isin(labels, ks)
    if not mask.any() or radius <= 0:
        return mask
    size = 2 * int(round(radius)) + 1
    img = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(size))
    return np.asarray(img) > 0


def point(word_map: np.ndarray, region: np.ndarray) -> tuple[bool, float]:
    """Is the peak patch's centre inside ``region``; and the chance rate: the fraction of patch centres inside it."""
    rows, cols = word_map.shape
    h, w = region.shape
    ys = ((np.arange(rows) + 0.5) * h / rows).astype(int)
    xs = ((np.arange(cols) + 0.5) * w / cols).astype(int)
    inside = region[np.ix_(ys, xs)]
    r, c = np.unravel_index(int(np.argmax(word_map)), word_map.shape)
    return bool(inside[r, c]), float(inside.mean())


def view_labels(labels: np.ndarray, size: int, crop_pct: float = 1.0) -> np.ndarray:
    """A label map brought to the model's view (same crop as :func:`model_view`, nearest neighbour)."""
    img = Image.fromarray(labels.astype(np.uint8))
    return np.asarray(img.resize((size, size), Image.NEAREST, box=crop_box(*img.size, size, crop_pct)))


def pointing_by_layer(items: list[dict], colors, shapes, radius: float, heads: int | str = "mean"
                      ) -> dict[str, Pointing]:
    """Pointing accuracy per layer (and over the mean of the layers) for captioned images.

    Each item: ``words``, ``maps`` ``(W, L, H, rows, cols)`` (one map per word), ``objects`` (the sidecar list) and
    ``labels`` (the label map at the model's view). Every colour or shape word counts; a word naming an attribute
    that no object has is a miss (chance 0 for it)."""
    n_layers = items[0]["maps"].shape[1] if items else 0
    table = {str(layer): Pointing() for layer in range(n_layers)}
    table["mean"] = Pointing()
    for it in items:
        for i, attribute, value in attribute_words(it["words"], colors, shapes):
            region = hit_region(it["labels"], it["objects"], attribute, value, radius)
            for layer in [*range(n_layers), "mean"]:
                word_map = aggregate(it["maps"][i : i + 1], layer, heads)[0]
                table[str(layer)].add(*point(word_map, region))
    return table


def pointing_items(entries: list[dict], objects: dict[str, list[dict]], masks: dict[str, np.ndarray]) -> list[dict]:
    """Entries joined with the shapes world's ground truth (label maps brought to each model's view)."""
    return [{"words": e["words"], "maps": e["maps"], "objects": objects[e["file_id"]],
             "labels": view_labels(masks[e["file_id"]], e["size"], e["crop_pct"])} for e in entries]


def pointing_table(entries: list[dict], split_dir: str | Path, heads: int | str = "mean", query: str = "predict"
                   ) -> dict[str, Pointing]:
    """Pointing accuracy by layer for the entries of :func:`hw3lib.attention.captioner_entries` /
    :func:`~hw3lib.attention.llava_entries` on one split of the world (``split_dir``: ``p1_data`` or ``p2_data``;
    validation images), with the words' maps of ``query`` (:func:`hw3lib.attention.with_query`)."""
    split_dir = Path(split_dir)
    items = pointing_items([with_query(e, query) for e in entries], load_objects(split_dir / "val_objects.json"),
                           load_masks(split_dir / "val_masks.npz"))
    return pointing_by_layer(items, COLORS, SHAPES, radius=entries[0]["patch_px"], heads=heads)


def pointing_summary(tables: dict[str, dict[str, dict[str, Pointing]]], heads: int | str) -> tuple[dict, list[dict]]:
    """Notebook 04's record of :func:`pointing_table` results (``tables[model][query]``), and its table rows
    (accuracy next to the chance rate). ``summary[model][query]`` maps each layer label to its accuracy. The chance
    rate depends on the words and the images only, not on the query."""
    rows = [{"model": name, "query": query, "layer": layer, "words": p.total, "pointing accuracy": p.accuracy,
             "chance": p.chance, "x chance": p.accuracy / p.chance if p.chance else float("nan")}
            for name, by_query in tables.items() for query, table in by_query.items() for layer, p in table.items()]
    means = {name: next(iter(by_query.values()))["mean"] for name, by_query in tables.items()}
    chance_sum = sum(m.chance_sum for m in means.values())
    words = sum(m.total for m in means.values())
    summary = {"chance": chance_sum / words if words else float("nan"), "heads": str(heads),
               **{name: {query: {layer: p.accuracy for layer, p in table.items()} for query, table in by_query.items()}
                  for name, by_query in tables.items()},
               "chance_by_model": {name: m.chance for name, m in means.items()},
               "words": {name: m.total for name, m in means.items()}}
    return summary, rows


def pointing_findings(summary: dict, models: list[str]) -> str:
    """One line per model (Markdown): the query and layer that point best, against chance and against the course's
    choice (the predicting step at the last layer)."""
    lines = []
    for name in models:
        acc, n_layers = summary[name], len(summary[name]["predict"]) - 1
        query, layer = choose_view("best", "best", n_layers, acc)
        best = acc[query][str(layer)]
        lines.append(f"- **{name}**: the {query} query at layer {layer} points best, {best:.2f} "
                     f"({best / summary['chance_by_model'][name]:.1f}x chance); the course's choice (predict, "
                     f"last layer) gives {acc['predict'][str(n_layers - 1)]:.2f}.")
    return "\n".join(lines)
