"""Attention of generated words over the image patches (P3): words from sub-word tokens, layer / head
aggregation, the image as the model saw it, upsampling, and the choice of the layer to show. Pointing accuracy,
which needs the shapes world's ground truth, is in :mod:`hw3lib.demo.pointing`.

Both models give, for every generated token, the attention of the query that produced it over the visual tokens,
as an array ``(T, layers, heads, rows, cols)`` over the patch grid (row-major, as the encoder saw the image after
its resize + centre crop): :func:`hw3lib.llava.attention_maps` and :func:`captioner_maps` below.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

WORD_START = (" ", "\u0120", "\u2581")  # a space, GPT-2 byte-level BPE's "Ġ", SentencePiece's "▁"


def word_groups(token_strings: list[str]) -> list[list[int]]:
    """Indices of the tokens of each word. A token that starts with a space marker starts a word; any other token
    (a sub-word piece, punctuation) continues the word before it."""
    groups: list[list[int]] = []
    for i, t in enumerate(token_strings):
        if not groups or t.startswith(WORD_START):
            groups.append([i])
        else:
            groups[-1].append(i)
    return groups


def aggregate(maps: np.ndarray, layer: int | str = -1, heads: int | str = "mean") -> np.ndarray:
    """``(T, L, H, r, c)`` -> ``(T, r, c)``: one layer (index into L) or ``"mean"`` over layers; one head or
    ``"mean"`` / ``"max"`` over heads."""
    x = maps.mean(axis=1) if layer == "mean" else maps[:, layer]
    if heads == "mean":
        return x.mean(axis=1)
    if heads == "max":
        return x.max(axis=1)
    try:
        index = int(heads)
    except ValueError:
        raise ValueError(f"attention_heads {heads!r}: expected 'mean', 'max' or a head index") from None
    if not -x.shape[1] <= index < x.shape[1]:
        raise ValueError(f"attention_heads {index}: the model has {x.shape[1]} heads")
    return x[:, index]


def words_and_maps(token_strings: list[str], maps: np.ndarray, decode) -> tuple[list[str], np.ndarray]:
    """Merge sub-word tokens into words: ``(words, maps averaged over each word's tokens)``. ``decode(indices)``
    gives a word's text from its token indices."""
    groups = word_groups(token_strings)
    words = [decode(g).strip() for g in groups]
    merged = np.stack([maps[g].mean(axis=0) for g in groups]) if groups else maps[:0]
    keep = [i for i, w in enumerate(words) if w]
    return [words[i] for i in keep], merged[keep]


# ------------------------------------------------------------------------------------------ the model's view
def crop_box(width: int, height: int, size: int, crop_pct: float = 1.0) -> tuple[float, float, float, float]:
    """The region of the original image the encoder sees: the shorter side resized to ``size / crop_pct``, then a
    centred ``size`` x ``size`` crop (timm's eval transform and CLIP's image processor). In original pixels."""
    scale = (size / crop_pct) / min(width, height)
    side = size / scale
    left, top = max(0.0, (width - side) / 2), max(0.0, (height - side) / 2)  # max: float round-off only
    return left, top, min(float(width), left + side), min(float(height), top + side)


def model_view(image: Image.Image, size: int, crop_pct: float = 1.0, resample=Image.BICUBIC) -> Image.Image:
    """The image as the encoder saw it (``size`` x ``size``): never stretched to another aspect."""
    return image.resize((size, size), resample, box=crop_box(*image.size, size, crop_pct))


def upsample(grid_map: np.ndarray, size: int) -> np.ndarray:
    """A (rows, cols) map bilinearly upsampled to ``size`` x ``size`` pixels (each patch over its own pixels)."""
    t = torch.as_tensor(np.asarray(grid_map, dtype=np.float32))[None, None]
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()


# ------------------------------------------------------------------------------------------ captioner maps
@torch.no_grad()
def captioner_maps(model, features: torch.Tensor, grid: tuple[int, int], gen=None) -> list[dict]:
    """Caption pre-computed features with attention; per image ``{"caption", "tokens", "maps"}`` with ``maps``
    ``(T, layers, heads, rows, cols)`` over the (pooled) patch grid -- the CLS token, if used, left out."""
    from .captioner import GenerationConfig

    model.eval()
    out = model.generate(features, gen or GenerationConfig(), output_attentions=True)
    rows, cols = grid
    pool = model.cfg.encoder.pool
    rows, cols = rows // pool, cols // pool
    first = 1 if model.cfg.encoder.use_cls else 0
    results = []
    for ids, caption, att in zip(out.token_ids, out.captions, out.attentions):
        att = att[: len(ids)].numpy()  # the closing <|endoftext|> is not a word
        maps = att[..., first:].reshape(*att.shape[:3], rows, cols)
        results.append({"caption": caption, "token_ids": ids, "tokens": model.tokenizer.token_strings(ids),
                        "maps": maps})
    return results


# ------------------------------------------------------------------------------------------ both models, per image
def captioner_entries(model, encoder, transform, records, gen=None, batch_size: int = 64, device=None) -> list[dict]:
    """Caption ``records`` with the P2 captioner and return, per image, what the figures and the pointing score
    need: ``file_id``, ``caption``, ``words``, ``maps`` (W, layers, heads, rows, cols), ``layers``, ``view`` (the
    image as the encoder saw it), ``size``, ``crop_pct``, ``patch_px`` (one encoder patch in view pixels)."""
    from timm.data import resolve_data_config

    from .captioner import encoder_grid, extract_features
    from .data import load_image

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    feats = extract_features(encoder, transform, records, model.cfg.encoder, batch_size, device)
    model.to(device)
    grid = encoder_grid(encoder)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda"):
        results = captioner_maps(model, feats.to(device), grid, gen)
    data_cfg = resolve_data_config(model=encoder)
    size, crop_pct = int(data_cfg["input_size"][-1]), float(data_cfg.get("crop_pct", 1.0))
    entries = []
    for rec, res in zip(records, results):
        ids = res["token_ids"]
        words, maps = words_and_maps(res["tokens"], res["maps"],
                                     lambda g, ids=ids: model.tokenizer.decode([ids[i] for i in g]))
        entries.append({"file_id": rec.file_id, "caption": res["caption"], "words": words, "maps": maps,
                        "layers": list(range(maps.shape[1])), "view": model_view(load_image(rec.image_path), size,
                                                                                  crop_pct),
                        "size": size, "crop_pct": crop_pct, "patch_px": size / grid[0]})
    return entries


def llava_entries(model, processor, records, instruction: str, generation=None) -> list[dict]:
    """The same for LLaVA (one image at a time: one teacher-forced pass with eager attention per image)."""
    from .data import load_image
    from .llava import LlavaGeneration, attention_maps

    ip = processor.image_processor
    size = int(ip.crop_size["height"])
    shortest = ip.size.get("shortest_edge", size) if isinstance(ip.size, dict) else size
    crop_pct = size / shortest
    patch = model.config.vision_config.patch_size
    entries = []
    for rec in records:
        image = load_image(rec.image_path)
        a = attention_maps(model, processor, image, instruction, generation or LlavaGeneration())
        ids = a.token_ids
        words, maps = words_and_maps(a.token_strings, a.maps,
                                     lambda g, ids=ids: processor.tokenizer.decode([ids[i] for i in g]))
        entries.append({"file_id": rec.file_id, "caption": a.caption, "words": words, "maps": maps,
                        "layers": a.layers, "view": model_view(image, size, crop_pct), "size": size,
                        "crop_pct": crop_pct, "patch_px": float(patch)})
    return entries


def choose_layer(setting: int | str, n_layers: int, accuracy: dict[str, float] | None = None) -> int | str:
    """The layer to draw: ``"best"`` (the highest pointing ``accuracy`` by layer label, when measured; else the
    last layer), ``"mean"`` (over the layers), or an index (``3``, ``"3"``, ``-1``)."""
    if setting == "best":
        per_layer = {k: v for k, v in (accuracy or {}).items() if k != "mean"}
        return int(max(per_layer, key=per_layer.get)) if per_layer else n_layers - 1
    if setting == "mean":
        return "mean"
    try:
        index = int(setting)
    except ValueError:
        raise ValueError(f"attention_layer {setting!r}: expected 'best', 'mean' or a layer index") from None
    if not -n_layers <= index < n_layers:
        raise ValueError(f"attention_layer {index}: the model has {n_layers} layers")
    return index % n_layers
