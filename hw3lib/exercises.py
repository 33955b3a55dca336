"""Exercises that check themselves. A notebook's code exercise is a stub the student fills in; the cell after it
calls :func:`check` with the exercise's name and the student's function, which runs it on test cases against a
reference (the library's own code, or the library that the course uses) and prints one line: correct, not written
yet, or what is wrong on which input. It never raises: a notebook run by ``hw3 run`` goes on with the stub in place.

Each exercise's hint and solution are in the notebook, in collapsed ``<details>`` blocks; ``tests/test_exercises.py``
runs every solution through its check.
"""
from __future__ import annotations

import traceback
from typing import Callable

import numpy as np

CHECKS: dict[str, Callable] = {}


def exercise(name: str):
    """Register ``checker(answer) -> None`` (correct) or a one-line description of the first wrong case."""
    def register(checker):
        CHECKS[name] = checker
        return checker
    return register


def is_correct(name: str, answer, show: bool = True, **context) -> bool:
    """Run exercise ``name``'s checker on ``answer`` (with the notebook's ``context``, where the exercise needs the
    run's data); print one line (when ``show``) and return whether it is right."""
    if name not in CHECKS:
        raise KeyError(f"no exercise {name!r}; known: {', '.join(sorted(CHECKS))}")
    try:
        problem = CHECKS[name](answer, **context)
    except NotImplementedError:
        problem = "not written yet: replace the `raise NotImplementedError` with your code"
    except Exception as e:  # noqa: BLE001 -- the student's code failed: say where, in one line
        frame = traceback.extract_tb(e.__traceback__)[-1]
        problem = f"your code raised {type(e).__name__}: {e} (line {frame.lineno}: {frame.line})"
    if show:
        print(f"{name}: correct" if problem is None else f"{name}: {problem}")
    return problem is None


def check(name: str, answer, **context) -> None:
    """What a notebook's check cell calls: :func:`is_correct`, printing its one line and showing nothing else."""
    is_correct(name, answer, **context)


def _close(a, b, atol: float = 1e-5) -> bool:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return a.shape == b.shape and bool(np.allclose(a, b, atol=atol))


# ------------------------------------------------------------------------------------------------- 00: CLIPScore
@exercise("clipscore")
def _clipscore(answer) -> str | None:
    """``answer(cos)``: CLIPScore of an array of cosine similarities, ``2.5 * max(cos, 0)``."""
    for cos in (np.array([0.3, 0.25]), np.array([-0.1, 0.0, 0.31]), np.linspace(-1, 1, 9)):
        want = 2.5 * np.maximum(cos, 0)
        got = answer(cos.copy())
        if not _close(got, want):
            return f"for cos {np.round(cos, 3).tolist()} expected {np.round(want, 4).tolist()}, got {got}"
    return None


@exercise("auc")
def _auc(answer) -> str | None:
    """``answer(own, other)``: the probability that an image's own caption scores above another image's, over all
    (own, other) pairs, a tie counting half: the AUC of notebook 00's CLIP check."""
    from .metrics import auc

    rng = np.random.default_rng(0)
    for own, other in ((np.array([0.9, 0.8]), np.array([0.1, 0.2, 0.85])), (np.array([0.5]), np.array([0.5])),
                       (rng.random(30), rng.random(20))):
        want, got = auc(own, other), answer(own.copy(), other.copy())
        if not _close(got, want, atol=1e-9):
            return f"for own {np.round(own[:4], 2).tolist()}..., other {np.round(other[:4], 2).tolist()}...: " \
                   f"expected {want:.4f}, got {got} (ties count half)"
    return None


@exercise("most_common_caption")
def _most_common_caption(answer) -> str | None:
    """``answer(references) -> (caption, count)``: the caption written most often over all images' references
    (``{image id: [captions]}``), as notebook 03's baseline uses it."""
    from collections import Counter

    cases = ({"a": ["x", "y"], "b": ["y", "z"], "c": ["y"]}, {"a": ["one"]}, {"a": ["p", "q"], "b": ["q", "q"]})
    for refs in cases:
        want = Counter(c for cs in refs.values() for c in cs).most_common(1)[0]
        got = tuple(answer({k: list(v) for k, v in refs.items()}))
        if got != want:
            return f"for {refs}: expected {want}, got {got}"
    return None


# ------------------------------------------------------------------------------------------------- 01: LLaVA's prompt
@exercise("first_sentence")
def _first_sentence(answer) -> str | None:
    """``answer(text)``: the answer's first sentence, up to its full stop (or ! or ?) followed by a space or the end;
    whitespace collapsed. What ``llava_first_sentence = True`` keeps."""
    from .llava import postprocess

    for text in ("A red circle. It is large.", "A red circle", "  Two shapes!  And more ", "Mr.X is 3.5 m tall. Yes",
                 "What is it? A star."):
        want, got = postprocess(text, first_sentence=True), answer(text)
        if got != want:
            return f"for {text!r}: expected {want!r}, got {got!r}"
    return None


@exercise("left_pad")
def _left_pad(answer) -> str | None:
    """``answer(sequences, pad_id) -> (input_ids, attention_mask)``: a batch of token-id lists padded on the left to
    the longest, as two tensors; the mask is 1 on real tokens."""
    import torch

    for seqs in ([[5, 6, 7], [8]], [[1, 2], [3, 4]], [[9], [4, 5, 6, 7], [2, 3]]):
        width = max(map(len, seqs))
        want_ids = torch.tensor([[0] * (width - len(q)) + q for q in seqs])
        want_mask = torch.tensor([[0] * (width - len(q)) + [1] * len(q) for q in seqs])
        ids, mask = answer([list(q) for q in seqs], 0)
        if not (torch.equal(torch.as_tensor(ids), want_ids) and torch.equal(torch.as_tensor(mask), want_mask)):
            return f"for {seqs}: expected ids {want_ids.tolist()} and mask {want_mask.tolist()}, got " \
                   f"{torch.as_tensor(ids).tolist()} and {torch.as_tensor(mask).tolist()}"
    return None


@exercise("image_positions")
def _image_positions(answer) -> str | None:
    """``answer(input_ids, image_token_id) -> (start, stop)``: the run of image placeholders in one prompt."""
    import torch

    from .llava import image_token_span

    rng = np.random.default_rng(0)
    for n_before, n_image, n_after in ((3, 4, 5), (1, 576, 9), (0, 2, 1)):
        ids = torch.tensor([*rng.integers(5, 100, n_before), *[32000] * n_image, *rng.integers(5, 100, n_after)])
        want = image_token_span(ids, 32000)
        got = answer(ids, 32000)
        if tuple(int(v) for v in got) != want:
            return f"for {n_before} tokens, {n_image} image tokens, {n_after} tokens: expected {want}, got {got}"
    return None


# ------------------------------------------------------------------------------------------------- 02: LoRA
@exercise("merge_lora")
def _merge_lora(answer) -> str | None:
    """``answer(W, A, B, alpha, r)``: the merged weight ``W + (alpha / r) B A``, with which a plain linear layer
    computes what the LoRA layer does (no extra matmul at inference); equal to what loralib merges in ``eval()``."""
    import loralib
    import torch

    torch.manual_seed(0)
    for r, alpha in ((4, 8), (8, 32)):
        layer = loralib.Linear(12, 10, r=r, lora_alpha=alpha, merge_weights=True)
        with torch.no_grad():
            layer.lora_B.normal_()
        W, A, B = (t.detach().clone() for t in (layer.weight, layer.lora_A, layer.lora_B))
        layer.eval()  # loralib merges the update into weight here
        got = answer(W.clone(), A, B, alpha, r)
        if not _close(torch.as_tensor(got).detach(), layer.weight.detach(), atol=1e-5):
            return f"r={r}, alpha={alpha}: not loralib's merged weight (shape {tuple(W.shape)}; scale alpha / r?)"
    return None


@exercise("attempt_parameters")
def _attempt_parameters(answer, rows: list[dict]) -> str | None:
    """``answer``: attempt 1's trainable-parameter count, worked out by hand before looking at the table (``rows``:
    notebook 02's attempts table)."""
    want = next(r["trainable params"] for r in rows if r["run"] == "attempt 1")
    if not isinstance(answer, int) or isinstance(answer, bool):
        return f"write the count as a whole number (got {answer!r})"
    if answer == 0:
        return "not worked out yet: set my_count to your number"
    if answer != want:
        return f"{answer:,} is not the count; compare each target's A and B shapes at the new rank, and remember " \
               "the projection"
    return None


@exercise("warmup_cosine")
def _warmup_cosine(answer) -> str | None:
    """``answer(step, total, warmup)``: the learning-rate factor, rising linearly to 1 over ``warmup`` steps (step 0
    gives 1 / warmup), then a cosine down to 0 at ``total``."""
    from .train import warmup_cosine

    for step, total, warmup in ((0, 100, 10), (9, 100, 10), (10, 100, 10), (55, 100, 10), (100, 100, 10),
                                (3, 50, 0), (49, 50, 5)):
        want, got = warmup_cosine(step, total, warmup), answer(step, total, warmup)
        if not _close(got, want, atol=1e-9):
            return f"at step {step} of {total} (warm-up {warmup}): expected {want:.4f}, got {got}"
    return None


# ------------------------------------------------------------------------------------------------- 03: CIDEr
@exercise("idf")
def _idf(answer) -> str | None:
    """``answer(document_frequency, num_images)``: CIDEr's inverse document frequency, ``log(N / max(1, df))``."""
    import math

    for df, n in ((1, 300), (300, 300), (0, 10), (37, 5000)):
        want, got = math.log(n) - math.log(max(1.0, df)), answer(df, n)
        if not _close(got, want, atol=1e-9):
            return f"for df {df} of {n} images: expected {want:.4f}, got {got}"
    return None


@exercise("length_penalty")
def _length_penalty(answer) -> str | None:
    """``answer(candidate_length, reference_length, sigma=6.0)``: CIDEr-D's Gaussian length penalty."""
    import math

    for c, r in ((10, 10), (12, 10), (35, 10), (3, 11)):
        want = math.exp(-((c - r) ** 2) / (2 * 6.0**2))
        got = answer(c, r)
        if not _close(got, want, atol=1e-9):
            return f"for lengths {c} and {r}: expected {want:.6g}, got {got}"
    return None


@exercise("beat_the_baseline")
def _beat_the_baseline(answer, references: dict, baseline: float) -> str | None:
    """``answer``: one caption (a string) that, written under every validation image, scores a higher CIDEr than
    the most common training caption does (``baseline``)."""
    from .cider import cider

    if not isinstance(answer, str) or not answer.strip():
        return f"write one caption, a non-empty string (got {answer!r})"
    score, _ = cider({k: answer for k in references}, references)
    if score <= baseline:
        return f"{answer!r} scores CIDEr {score:.3f}, not above the baseline's {baseline:.3f}"
    return None


# ------------------------------------------------------------------------------------------------- 04: words
@exercise("word_maps")
def _word_maps(answer) -> str | None:
    """``answer(token_strings, maps) -> (words, word_maps)``: merge sub-word tokens into words (a token that starts
    with a space starts a word), each word's map the mean of its tokens' maps."""
    from .attention import words_and_maps

    rng = np.random.default_rng(0)
    for tokens in ([" a", " red", " circ", "le"], ["A", " blue", " sq", "u", "are", "."], [" one"]):
        maps = rng.random((len(tokens), 2, 2))
        want_words, want_maps = words_and_maps(tokens, maps, lambda g, t=tokens: "".join(t[i] for i in g))
        words, got = answer(tokens, maps.copy())
        if [w.strip() for w in words] != want_words:
            return f"for tokens {tokens}: expected words {want_words}, got {list(words)}"
        if not _close(got, want_maps):
            return f"for tokens {tokens}: the words are right, their maps are not the mean of their tokens' maps"
    return None


@exercise("to_grid")
def _to_grid(answer) -> str | None:
    """``answer(row, rows, cols, has_cls)``: one query's attention over the visual positions (CLS first when
    ``has_cls``) as a (rows, cols) map of the patches, row-major, the CLS position left out."""
    rng = np.random.default_rng(0)
    for rows, cols, has_cls in ((2, 3, True), (4, 4, False), (6, 6, True)):
        row = rng.random(rows * cols + int(has_cls))
        want = row[int(has_cls):].reshape(rows, cols)
        got = np.asarray(answer(row.copy(), rows, cols, has_cls))
        if not _close(got, want):
            return f"for a {rows} x {cols} grid (CLS {'first' if has_cls else 'absent'}): not the row-major " \
                   f"patch map (got shape {got.shape})"
    return None


@exercise("peak_patch")
def _peak_patch(answer) -> str | None:
    """``answer(grid_map) -> (row, col)``: the patch where a (rows, cols) map peaks: what pointing accuracy tests."""
    rng = np.random.default_rng(3)
    for shape in ((3, 4), (6, 6), (24, 24)):
        m = rng.random(shape)
        want = tuple(int(v) for v in np.unravel_index(np.argmax(m), shape))
        got = tuple(int(v) for v in answer(m.copy()))
        if got != want:
            return f"for a {shape[0]} x {shape[1]} map: expected (row, col) {want}, got {got}"
    return None


# ------------------------------------------------------------------------------------------------- 05: extremes
@exercise("zscore")
def _zscore(answer) -> str | None:
    """``answer(value, scores)``: how many standard deviations ``value`` lies from the mean of ``scores`` (NumPy's
    population standard deviation, as notebook 05's facts use)."""
    rng = np.random.default_rng(4)
    for scores in (np.array([1.0, 2.0, 3.0]), rng.random(40)):
        for value in (scores.max(), scores.min()):
            want, got = (value - scores.mean()) / scores.std(), answer(value, scores.copy())
            if not _close(got, want, atol=1e-9):
                return f"for {value:.3f} among {len(scores)} scores: expected {want:.4f}, got {got}"
    return None


@exercise("clipscore_rank_of_best_cider")
def _clipscore_rank_of_best_cider(answer) -> str | None:
    """``answer(per_image) -> rank``: where the image with the highest CIDEr stands by CLIPScore (1 = the highest
    CLIPScore)."""
    rng = np.random.default_rng(2)
    for n in (3, 10, 50):
        per_image = {f"{i:012d}": {"caption": "x", "clipscore": float(s), "cider": float(c)}
                     for i, (s, c) in enumerate(zip(rng.random(n), rng.random(n)))}
        best = max(per_image, key=lambda k: per_image[k]["cider"])
        want = 1 + sum(v["clipscore"] > per_image[best]["clipscore"] for v in per_image.values())
        got = answer(per_image)
        if got != want:
            return f"for {n} images: expected rank {want}, got {got} (1 is the highest CLIPScore)"
    return None


@exercise("top_and_last")
def _top_and_last(answer) -> str | None:
    """``answer(per_image) -> (top, last)``: the image ids with the highest and the lowest CLIPScore, from
    ``{image id: {"caption", "clipscore", "cider"}}`` (notebook 03's ``p2_val_per_image.json``)."""
    rng = np.random.default_rng(1)
    for n in (2, 5, 40):
        per_image = {f"{i:012d}": {"caption": "x", "clipscore": float(s), "cider": float(c)}
                     for i, (s, c) in enumerate(zip(rng.random(n), rng.random(n)))}
        ranked = sorted(per_image, key=lambda k: per_image[k]["clipscore"])
        want = (ranked[-1], ranked[0])
        got = tuple(answer(per_image))
        if got != want:
            return f"for {n} images: expected {want}, got {got} (by CLIPScore, not CIDEr?)"
    return None
