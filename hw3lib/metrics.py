"""CIDEr and CLIPScore exactly as the course's ``evaluate.py`` computes them.

* CIDEr: CIDEr-D of pycocoevalcap (Vedantam et al., 2015) over the whole set, after the PTB tokenizer (Java, shipped
  inside pycocoevalcap). Without Java, :mod:`hw3lib.ptb` reproduces the tokenizer in Python (said once).
* CLIPScore (Hessel et al., 2021): ``2.5 * max(cos(image_emb, text_emb), 0)`` per image, averaged; CLIP ViT-B/32
  with OpenAI weights (``ViT-B-32-quickgelu``), text truncated to 77 tokens. Batched here; same numbers.
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data import DataError, Record, check_keys, load_annotations, read_predictions
from .image_batches import default_workers, image_batches
from .cider import cider, cider_in_background, java_available, java_ptb_tokenize, tokenize  # noqa: F401

# ----------------------------------------------------------------------------------------------------- CLIPScore
@dataclass
class ClipConfig:
    model: str = "ViT-B-32-quickgelu"  # open_clip name, "local-dir:PATH", or a folder holding open_clip_config.json
    pretrained: str | None = "openai"  # tag or local checkpoint file (ignored for folders)
    batch_size: int = 64  # images per forward pass
    num_workers: int | None = None  # threads decoding images; None: up to 16 on a GPU, 0 on the CPU
    device: str | None = None  # default: cuda when present
    # the course's evaluate.py loads CLIP with clip.load, which runs fp16 on a GPU and fp32 on the CPU; "auto" does
    # the same ("fp32" / "fp16" force one). docs/benchmarks.md has the measured difference of the mean.
    precision: str = "auto"


_END_OF_TEXT = re.compile(re.escape("<|endoftext|>"), re.IGNORECASE)


class ClipScorer:
    """An open_clip model with its preprocessing and tokenizer that scores (image, caption) pairs."""

    def __init__(self, cfg: ClipConfig = ClipConfig()):
        import open_clip

        from . import hub

        self.cfg = cfg
        name, pretrained, cache_only = cfg.model, cfg.pretrained, False
        folder = hub.local_folder(name)
        if folder is not None:
            if not (folder / "open_clip_config.json").is_file():
                raise DataError(f"{folder}: no open_clip_config.json in this CLIP folder" if folder.is_dir() else
                                f"{folder}: CLIP folder not found")
            if pretrained:  # a folder holds its own weights
                warnings.warn(f"CLIP folder {folder}: pretrained={pretrained!r} is ignored (the folder's own "
                              "weights are used; pass --clip-pretrained '' to say so)", stacklevel=2)
            name, pretrained = f"local-dir:{folder}", None
        else:
            spec = hub.open_clip_files(name, pretrained or "")  # refuses unknown names and tags
            cache_only = hub.ensure_available(spec) if spec is not None else False
        self.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            with hub.cache_only(cache_only):
                model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
        except (RuntimeError, OSError, ValueError) as e:
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise DataError(f"could not load CLIP {cfg.model!r} (pretrained={cfg.pretrained!r}): {first}. "
                            f"Offline? {hub.DOWNLOAD_HINT}") from None
        if cfg.precision not in ("auto", "fp16", "fp32"):
            raise ValueError(f"CLIP precision {cfg.precision!r}: expected 'auto', 'fp16' or 'fp32'")
        half = cfg.precision == "fp16" or (cfg.precision == "auto" and self.device.type == "cuda")
        self.dtype = torch.float16 if half else torch.float32
        self.model = model.eval().to(self.device, self.dtype)
        self.num_workers = cfg.num_workers if cfg.num_workers is not None else default_workers(self.device)
        self.preprocess = preprocess
        # resize and crop on the GPU (hw3lib.pil_resize, Pillow's integers) instead of in the decoding threads
        self.resize_on_device = self.device.type == "cuda"
        self.tokenizer = open_clip.get_tokenizer(name)
        self._embedded: dict[tuple, torch.Tensor] = {}  # image embeddings of recent image lists (score_pairs)

    def image_batches(self, records: list[Record]):
        """Preprocessed image batches in record order, on the model's device in its dtype: decoded ahead in
        ``num_workers`` threads, and on a GPU resized and cropped there with Pillow's integer arithmetic
        (:mod:`hw3lib.image_batches`). Decoding starts on the call, so the caller can encode the captions
        meanwhile."""
        return image_batches(records, self.preprocess, self.cfg.batch_size, self.device, self.dtype, self.num_workers,
                             self.resize_on_device)

    @torch.no_grad()
    def embed_images(self, records: list[Record], batches=None) -> torch.Tensor:
        """L2-normalised image embeddings, (N, D), in record order (``batches``: from :meth:`image_batches`)."""
        out = []
        for pixel_values in (batches if batches is not None else self.image_batches(records)):
            emb = self.model.encode_image(pixel_values).float()
            out.append(emb / emb.norm(dim=-1, keepdim=True))
        return torch.cat(out)

    @torch.no_grad()
    def embed_texts(self, captions: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings, (N, D); captions longer than the context are truncated (as clip does).

        A caption that holds ``<|endoftext|>`` ends there, as in the course's ``clip.tokenize``: OpenAI's tokenizer
        reads it (in any case) as the end token, whose position the text embedding is read at, while open_clip's
        spells it out as text. The words before it are encoded alike, so the embeddings are the same."""
        captions = [_END_OF_TEXT.split(c, maxsplit=1)[0] for c in captions]
        out = []
        for i in range(0, len(captions), self.cfg.batch_size):
            ids = self.tokenizer(captions[i : i + self.cfg.batch_size]).to(self.device)
            emb = self.model.encode_text(ids).float()
            out.append(emb / emb.norm(dim=-1, keepdim=True))
        return torch.cat(out)

    def score_pairs(self, records: list[Record], captions: list[str]) -> np.ndarray:
        """CLIPScore of each (image, caption) pair: ``2.5 * max(cos, 0)``.

        The image embeddings of the last few image lists are kept (keyed by each file's path, size and modification
        time): notebook 02 scores the same val images after every epoch and for every row of its attempts table,
        and only the captions change."""
        if len(records) != len(captions):
            raise ValueError(f"{len(records)} images but {len(captions)} captions")
        key = _files_key(records)
        images = self._embedded.get(key) if key is not None else None
        batches = self.image_batches(records) if images is None else None  # decoding starts now, while the
        texts = self.embed_texts(captions)  # captions are encoded
        if images is None:
            images = self.embed_images(records, batches)
            if key is not None:
                self._embedded = {**dict(list(self._embedded.items())[-3:]), key: images}  # the last four lists
        cos = (images * texts).sum(-1)
        return (2.5 * cos.clamp(min=0)).cpu().numpy()


def _files_key(records: list[Record]) -> tuple | None:
    """What identifies the images of ``records`` on disk, or None when one cannot be read (decoding then names it)."""
    try:
        return tuple((str(r.image_path), st.st_size, st.st_mtime_ns) for r in records
                     for st in (os.stat(r.image_path),))
    except OSError:
        return None


def clip_score(scorer: ClipScorer, predictions: dict[str, str], image_dir: str | Path,
               ) -> tuple[float, dict[str, float]]:
    """Mean CLIPScore of ``predictions`` (``{file id: caption}``) over the images in ``image_dir``."""
    from .data import list_images

    by_id = {r.file_id: r for r in list_images(image_dir)}
    missing = [k for k in predictions if k not in by_id]
    if missing:
        raise DataError(f"{image_dir}: no image for {len(missing)} prediction key(s), e.g. {missing[:3]}")
    keys = list(predictions)
    scores = scorer.score_pairs([by_id[k] for k in keys], [predictions[k] for k in keys])
    return float(scores.mean()), {k: float(s) for k, s in zip(keys, scores)}


def token_agreement(reference: dict[str, list[int]], other: dict[str, list[int]]) -> dict:
    """How closely ``other``'s token sequences follow ``reference``'s, key by key (e.g. the captions of a 4-bit model
    against bf16's, tokenised): ``exact``, the share of keys whose sequences are equal; ``prefix``, the mean of
    (tokens before the first difference) / (the longer sequence's length), 1.0 for equal ones, so that a caption that
    stops early or runs on counts as differing where it does; ``first_difference``, the mean position of the first
    difference among the sequences that differ (None where none do)."""
    if set(reference) != set(other):
        raise ValueError(f"token_agreement: the two sides caption different images "
                         f"({len(set(reference) ^ set(other))} keys on one side only)")
    if not reference:
        raise ValueError("token_agreement: nothing to compare")
    shares, firsts = [], []
    for key, ref in reference.items():
        oth = other[key]
        longer = max(len(ref), len(oth))
        same = next((i for i, (a, b) in enumerate(zip(ref, oth)) if a != b), min(len(ref), len(oth)))
        shares.append(1.0 if longer == 0 else same / longer)
        if same < longer:
            firsts.append(same)
    return {"exact": sum(s == 1.0 for s in shares) / len(shares), "prefix": float(np.mean(shares)),
            "first_difference": float(np.mean(firsts)) if firsts else None}


def evaluate(pred_path: str | Path, annotation_path: str | Path, images_dir: str | Path,
             clip: ClipScorer | ClipConfig | None = None) -> dict:
    """The course's evaluate.py: CIDEr and CLIPScore of a predictions file, plus per-image scores."""
    predictions = read_predictions(pred_path)
    references = load_annotations(annotation_path)
    check_keys(predictions, references, pred_name=str(pred_path), ref_name=str(annotation_path))
    scorer = clip if isinstance(clip, ClipScorer) else ClipScorer(clip or ClipConfig())  # fails before any work
    cider_job = cider_in_background(predictions, references)  # another process: CIDEr runs while CLIP encodes
    clip_mean, per_clip = clip_score(scorer, predictions, images_dir)
    score, per_cider = cider_job.result()
    return {"cider": score, "clipscore": clip_mean, "num_images": len(predictions),
            "per_image": {k: {"cider": per_cider[k], "clipscore": per_clip[k]} for k in predictions}}


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the ROC curve = P(a positive scores above a negative), ties counted half (Mann-Whitney U)."""
    pos, neg = np.asarray(positive, dtype=np.float64), np.asarray(negative, dtype=np.float64)
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def clip_check(scorer: ClipScorer, records: list[Record], seed: int = 0) -> dict:
    """Does the CLIP model prefer each image's own caption (its first reference) to another image's?

    Returns ``auc``, ``mean_true``, ``mean_shuffled`` and the two score arrays (``true``, ``shuffled``).
    """
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(records))
    other = np.empty_like(perm)
    other[perm] = np.roll(perm, 1)  # a derangement: every image gets some other image's caption
    own = [r.references[0] for r in records]
    img = scorer.embed_images(records)
    txt = scorer.embed_texts(own)
    true = (2.5 * (img * txt).sum(-1).clamp(min=0)).cpu().numpy()
    shuffled = (2.5 * (img * txt[torch.from_numpy(other).to(txt.device)]).sum(-1).clamp(min=0)).cpu().numpy()
    return {"auc": auc(true, shuffled), "mean_true": float(true.mean()), "mean_shuffled": float(shuffled.mean()),
            "true": true, "shuffled": shuffled}


@dataclass
class SplitScores:
    """A captioner's captions of a split, scored as :func:`evaluate` scores a predictions file."""

    predictions: dict[str, str]
    cider: float
    clipscore: float
    per_cider: dict[str, float]
    per_clip: dict[str, float]


def score_split(model, encoder, transform, records: list[Record], gen, scorer: ClipScorer | None, image_dir,
                batch_size: int = 64, features: torch.Tensor | None = None, device: str | None = None) -> SplitScores:
    """Caption every image of ``records`` with ``model`` (decoding ``gen``) and score the captions: CIDEr-D over the
    split and CLIPScore (NaN without a ``scorer``). ``features``: the encoder's, when already extracted (several
    adapters of one encoder share them). Notebook 03 scores the main adapter with it, notebook 02 its LoRA attempts,
    so their numbers are comparable."""
    from .captioner import caption_features, extract_features

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if features is None:
        features = extract_features(encoder, transform, records, model.cfg.encoder, batch_size, device)
    model.to(device)
    with torch.no_grad():
        captions = caption_features(model, features, gen, batch_size, device)
    predictions = {r.file_id: c for r, c in zip(records, captions)}
    score, per_cider = cider(predictions, {r.file_id: list(r.references) for r in records})
    clip_mean, per_clip = clip_score(scorer, predictions, image_dir) if scorer is not None else (float("nan"), {})
    return SplitScores(predictions, score, clip_mean, per_cider, per_clip)


@dataclass
class Baseline:
    """A caption that ignores the image: the most common training caption, written under every image."""

    caption: str
    count: int  # how often it occurs among the training captions
    of: int  # the training captions
    cider: float
    clipscore: float  # NaN without a scorer


def common_caption_baseline(train_records: list[Record], records: list[Record], scorer: ClipScorer | None,
                            image_dir) -> Baseline:
    """:class:`Baseline` on ``records``: what looking at the image buys is the gap to it."""
    from collections import Counter

    captions = [c for r in train_records for c in r.references]
    if not captions:
        raise ValueError("no training captions: the baseline needs the training split's references")
    caption, count = Counter(captions).most_common(1)[0]
    same = {r.file_id: caption for r in records}
    score = cider(same, {r.file_id: list(r.references) for r in records})[0]
    clip_mean = clip_score(scorer, same, image_dir)[0] if scorer is not None else float("nan")
    return Baseline(caption, count, len(captions), score, clip_mean)
