"""Attention of generated words over the image patches (P3): words from sub-word tokens, layer / head
aggregation, the image as the model saw it, upsampling, and the choice of the layer to show. Pointing accuracy,
which needs the shapes world's ground truth, is in :mod:`hw3lib.demo.pointing`.

Both models give, for every generated token, two attentions over the visual tokens, each an array
``(T, layers, heads, rows, cols)`` over the patch grid (row-major, as the encoder saw the image after its resize +
centre crop): that of the query that *predicts* the token (the course's convention) and that of the query that
*reads* it (the token as input, predicting the next one). :func:`with_query` picks one or their mean ("both");
notebook 04 measures which points best. :func:`hw3lib.llava.attention_maps` and :func:`captioner_maps` below.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

WORD_START = (" ", "\u0120", "\u2581")  # a space, GPT-2 byte-level BPE's "Ġ", SentencePiece's "▁"
QUERIES = ("predict", "read", "both")  # whose attention is a word's map (see with_query)
END_WORD = "<|endoftext|>"  # the captioner's end token: the last panel of a series


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


def check_query(query: str, allow_best: bool = False) -> str:
    """``query`` if it names one of :data:`QUERIES` (or ``"best"``, where allowed); else a clear error."""
    names = QUERIES + (("best",) if allow_best else ())
    if query not in names:
        raise ValueError(f"attention_query {query!r}: expected one of {', '.join(names)}")
    return query


def with_query(entry: dict, query: str = "predict") -> dict:
    """The entry with ``maps`` set to its words' maps for ``query``: ``"predict"`` (the attention of the step that
    predicts the word, the course's convention), ``"read"`` (of the step that reads it, which predicts the next
    word) or ``"both"`` (their mean). ``entry`` has ``predict_maps`` and ``read_maps``, as
    :func:`captioner_entries` and :func:`llava_entries` give."""
    check_query(query)
    p, r = entry["predict_maps"], entry["read_maps"]
    return {**entry, "query": query, "maps": p if query == "predict" else r if query == "read" else (p + r) / 2}


def at_view(entries: list[dict], query: str, layer: int) -> list[dict]:
    """The entries as a figure shows them: ``maps`` for ``query`` (:func:`with_query`) and the ``layer`` shown."""
    return [{**with_query(e, query), "layer": layer} for e in entries]


def words_and_maps(token_strings: list[str], maps: np.ndarray, decode) -> tuple[list[str], np.ndarray]:
    """Merge sub-word tokens into words: ``(words, maps averaged over each word's tokens)``. ``decode(indices)``
    gives a word's text from its token indices."""
    groups = word_groups(token_strings)
    words = [decode(g).strip() for g in groups]
    merged = np.stack([maps[g].mean(axis=0) for g in groups]) if groups else maps[:0]
    keep = [i for i, w in enumerate(words) if w]
    return [words[i] for i in keep], merged[keep]


def with_end(words: list[str], maps: np.ndarray, end_word: str, end_map: np.ndarray) -> tuple[list[str], np.ndarray]:
    """The series closed as the course's layout closes it: the end token as a last word, with the map of the step
    that predicted it (the step that ends the caption; the same for every query)."""
    return [*words, end_word], np.concatenate([maps, end_map[None].astype(maps.dtype)])


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
def captioner_maps(model, features: torch.Tensor, grid: tuple[int, int], gen=None, batch_size: int = 16,
                   captions: list[str] | None = None) -> list[dict]:
    """Caption pre-computed features (or take ``captions``, one per image: the ones that were scored), then read the
    attention of one teacher-forced pass over each caption; per image ``{"caption", "token_ids", "tokens", "maps",
    "read_maps", "end_map"}``. ``maps`` ``(T, layers, heads, rows, cols)``
    over the (pooled) patch grid is the attention of the query that predicted each token (with causal attention
    it equals what ``generate(output_attentions=True)`` records; the tests compare them); ``read_maps`` that of the
    query that reads it (for the last token: the step that closes the caption). The CLS token, if used, is left
    out."""
    from .captioner import CaptionerGeneration

    model.eval()
    if captions is None:
        out = model.generate(features, gen or CaptionerGeneration())
        token_ids, texts = out.token_ids, out.captions
    else:
        if len(captions) != len(features):
            raise ValueError(f"{len(captions)} captions for {len(features)} images")
        token_ids, texts = [model.tokenizer.encode(c) for c in captions], list(captions)
    pool = model.cfg.encoder.pool
    rows, cols = grid[0] // pool, grid[1] // pool
    eot = model.tokenizer.eot_id
    results = []
    for start in range(0, len(features), batch_size):
        chunk = token_ids[start : start + batch_size]
        width = max(map(len, chunk)) + 1
        input_ids = torch.tensor([[eot, *ids] + [eot] * (width - 1 - len(ids)) for ids in chunk],
                                 device=features.device)
        with torch.no_grad():
            res = model(features[start : start + batch_size], input_ids, output_attentions=True)
        V = res.logits.shape[1] - width  # visual tokens: the text follows them
        # (B, L, H, width, grid): the text queries over the grid positions (the CLS token left out)
        att = torch.stack([a[:, :, V:, V - rows * cols : V] for a in res.attentions], 1)
        att = att.permute(0, 3, 1, 2, 4).float().cpu().numpy()
        for ids, a in zip(chunk, att):
            T = len(ids)
            grid_rows = a[: T + 1].reshape(T + 1, *a.shape[1:3], rows, cols)
            results.append({"caption": texts[len(results)], "token_ids": ids,
                            "tokens": model.tokenizer.token_strings(ids), "maps": grid_rows[:T],
                            "read_maps": grid_rows[1:], "end_map": grid_rows[T]})
    return results


# ------------------------------------------------------------------------------------------ both models, per image
def captioner_entries(model, encoder, transform, records, gen=None, batch_size: int = 64, device=None,
                      query: str = "predict", captions: list[str] | None = None) -> list[dict]:
    """Caption ``records`` with the P2 captioner (``gen``), or take ``captions`` (the ones that were scored: the maps
    are then read by teacher forcing them), and return, per image, what the figures and the pointing score need:
    ``file_id``, ``caption``, ``words`` (closed by the end token, as the course's layout is), ``predict_maps`` and
    ``read_maps`` (W, layers, heads, rows, cols), ``maps`` and ``query`` (those of ``query``, see
    :func:`with_query`), ``layers``, ``view`` (the image as the encoder saw it), ``size``, ``crop_pct``,
    ``patch_px`` (one encoder patch in view pixels)."""
    from timm.data import resolve_data_config

    from .captioner import encoder_grid, extract_features
    from .data import load_image

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    feats = extract_features(encoder, transform, records, model.cfg.encoder, batch_size, device)
    model.to(device)
    grid = encoder_grid(encoder)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda"):
        results = captioner_maps(model, feats.to(device), grid, gen, captions=captions)
    data_cfg = resolve_data_config(model=encoder)
    size, crop_pct = int(data_cfg["input_size"][-1]), float(data_cfg.get("crop_pct", 1.0))
    entries = []
    for rec, res in zip(records, results):
        ids = res["token_ids"]
        decode = lambda g, ids=ids: model.tokenizer.decode([ids[i] for i in g])  # noqa: E731
        words, maps = with_end(*words_and_maps(res["tokens"], res["maps"], decode), END_WORD, res["end_map"])
        read = with_end(*words_and_maps(res["tokens"], res["read_maps"], decode), END_WORD, res["end_map"])[1]
        entries.append(with_query({
            "file_id": rec.file_id, "caption": res["caption"], "words": words, "predict_maps": maps,
            "read_maps": read, "layers": list(range(maps.shape[1])),
            "view": model_view(load_image(rec.image_path), size, crop_pct),
            "size": size, "crop_pct": crop_pct, "patch_px": size / grid[0]}, query))
    return entries


def llava_entries(model, processor, records, instruction: str, generation=None, query: str = "predict",
                  captions: list[str] | None = None) -> list[dict]:
    """The same for LLaVA (one image at a time: one teacher-forced pass with eager attention per image). With
    ``captions``, those are teacher-forced (the instruction must be the one that produced them), as the tokenizer
    splits them: the words are the caption's, though a generation may have split a word into other pieces."""
    from .data import load_image
    from .llava import LlavaGeneration, attention_maps

    ip = processor.image_processor
    size = int(ip.crop_size["height"])
    shortest = ip.size.get("shortest_edge", size) if isinstance(ip.size, dict) else size
    crop_pct = size / shortest
    patch = model.config.vision_config.patch_size
    tok = processor.tokenizer
    if captions is not None and len(captions) != len(records):
        raise ValueError(f"{len(captions)} captions for {len(records)} images")
    entries = []
    for i, rec in enumerate(records):
        image = load_image(rec.image_path)
        given = None if captions is None else tok(captions[i], add_special_tokens=False).input_ids
        a = attention_maps(model, processor, image, instruction, generation or LlavaGeneration(), generated_ids=given)
        ids = a.token_ids
        decode = lambda g, ids=ids: tok.decode([ids[i] for i in g])  # noqa: E731
        end = tok.eos_token or "</s>"
        words, maps = with_end(*words_and_maps(a.token_strings, a.maps, decode), end, a.end_map)
        read = with_end(*words_and_maps(a.token_strings, a.read_maps, decode), end, a.end_map)[1]
        entries.append(with_query({
            "file_id": rec.file_id, "caption": a.caption if captions is None else captions[i], "words": words,
            "predict_maps": maps, "read_maps": read, "layers": a.layers,
            "view": model_view(image, size, crop_pct), "size": size, "crop_pct": crop_pct,
            "patch_px": float(patch)}, query))
    return entries


@dataclass
class ScoredSettings:
    """How the scored captions were decoded, read from a run's metrics: the captioner as notebook 03 scored it
    (``metrics/captioner.json``), LLaVA as notebook 01's best setting (``metrics/llava.json``). Where a notebook has
    not run, its model's defaults (greedy, :data:`hw3lib.llava.DEFAULT_INSTRUCTION`), and the label says so."""

    captioner: object  # captioner.CaptionerGeneration
    captioner_label: str
    llava: object  # llava.LlavaGeneration
    llava_label: str
    llava_instruction: str
    llava_first_sentence: bool


def scored_settings(output_dir) -> ScoredSettings:
    from .captioner import CaptionerGeneration
    from .llava import DEFAULT_INSTRUCTION, LlavaGeneration
    from .outputs import read_metrics

    captioner, info = read_metrics(output_dir, "captioner"), read_metrics(output_dir, "llava")
    if captioner:
        gen = CaptionerGeneration(**captioner["generation"])
        extras = "".join(f", {k} {v}" for k, v in (("length penalty", gen.length_penalty),
                                                   ("no repeat n-gram", gen.no_repeat_ngram_size)) if v not in (1.0, 0))
        cap_label = ("greedy" if gen.num_beams == 1 else f"beam {gen.num_beams}") + extras + \
            f", at most {gen.max_new_tokens} tokens, as notebook 03 scored"
    else:
        gen, cap_label = CaptionerGeneration(), "greedy; notebook 03 has not run, so its decoding is not known"
    if info:
        best = info["best"]
        llava = LlavaGeneration.from_dict(best["generation_config"])
        return ScoredSettings(gen, cap_label, llava, f"{llava.label}, notebook 01's best setting",
                              best["instruction"], bool(info.get("first_sentence", False)))
    llava = LlavaGeneration()
    return ScoredSettings(gen, cap_label, llava, f"{llava.label}; notebook 01 has not run, so its default",
                          DEFAULT_INSTRUCTION, False)


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


def choose_view(layer: int | str, query: str, n_layers: int,
                accuracy: dict[str, dict[str, float]] | None = None) -> tuple[str, int | str]:
    """``(query, layer)`` to draw. ``query`` as in :func:`with_query` or ``"best"``; ``layer`` as in
    :func:`choose_layer`. ``accuracy`` (pointing accuracy, ``{query: {layer label: accuracy}}``, when measured)
    decides each ``"best"``: the pair that points best. Unmeasured, ``"best"`` means the course's choice: the
    ``"predict"`` query and the last layer."""
    accuracy = accuracy or {}
    if query != "best":
        return check_query(query), choose_layer(layer, n_layers, accuracy.get(query))
    if not accuracy:
        return "predict", choose_layer(layer, n_layers)
    pairs = [(q, choose_layer(layer, n_layers, acc)) for q, acc in accuracy.items()]
    return max(pairs, key=lambda pair: accuracy[pair[0]].get(str(pair[1]), float("-inf")))
