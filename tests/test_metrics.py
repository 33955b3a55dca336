import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocoevalcap.cider.cider import Cider

import hw3lib.cider as cider_module
import hw3lib.image_batches as image_batches
import hw3lib.metrics as metrics
from hw3lib.data import DataError, load_image, load_split
from hw3lib.metrics import auc, cider, clip_score, evaluate, token_agreement


@pytest.fixture(scope="module")
def val(world):
    return load_split(world / "p2_data/val.json", world / "p2_data/images/val")[:60]


def _predictions(val):
    # a mix of good and wrong captions so that CIDEr is neither 0 nor the maximum
    return {r.file_id: (r.references[0] if i % 3 else "a purple star and a yellow circle") for i, r in enumerate(val)}


@pytest.mark.skipif(not metrics.java_available(), reason="needs java")
def test_cider_equals_pycocoevalcap(val):
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    pred = _predictions(val)
    refs = {r.file_id: list(r.references[1:]) for r in val}
    ours, per_image = cider(pred, refs)
    # pycocoevalcap on its own, as the course's evaluate.py calls it
    tok = PTBTokenizer()
    res = tok.tokenize({k: [{"caption": pred[k]}] for k in refs})
    gts = tok.tokenize({k: [{"caption": c} for c in refs[k]] for k in refs})
    theirs, theirs_per = Cider().compute_score(gts, res)
    assert ours == theirs  # to the last digit
    assert np.allclose(list(per_image.values()), theirs_per)
    assert 0.1 < ours < 10


def test_cider_without_java_warns_once_and_agrees(val, monkeypatch):
    pred = _predictions(val)
    refs = {r.file_id: list(r.references[1:]) for r in val}
    with_java = cider(pred, refs)[0] if metrics.java_available() else None
    monkeypatch.setattr(cider_module.shutil, "which", lambda name: None)
    monkeypatch.setattr(cider_module, "_warned_no_java", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        no_java = cider(pred, refs)[0]
        cider(pred, refs)
    assert sum("java not found" in str(w.message) for w in caught) == 1
    if with_java is not None:
        assert no_java == with_java


def test_cider_in_forked_slices_is_pycocoevalcaps_to_the_bit(val, monkeypatch):
    """workers > 1: the slices are tokenised and scored in forked processes, with the whole set's document
    frequencies; corpus and per-image scores equal pycocoevalcap's whole-set run exactly (uneven slices too)."""
    refs = {r.file_id: list(r.references) for r in val}
    pred = {k: v[0] if i % 3 else v[1] + " and more" for i, (k, v) in enumerate(refs.items())}
    keys = list(refs)  # a caption ending in "b." just before each slice boundary: its period depends on the next
    for i in range(1, len(keys)):  # caption, in the next slice ("The ...": split off; "two ...": kept)
        pred[keys[i - 1]] += " with the letter b."
        refs[keys[i - 1]].append(refs[keys[i - 1]][0] + " with the letter b")  # "b" matters, "b." does not
        pred[keys[i]] = ("The " if i % 2 else "two ") + pred[keys[i]]
    monkeypatch.setattr(cider_module.shutil, "which", lambda name: None)  # the Python port, in the workers
    monkeypatch.setattr(cider_module, "_warned_no_java", True)
    serial = cider(pred, refs)
    for workers in (2, 7):
        assert cider(pred, refs, workers=workers) == serial
    assert cider_module._shared == {}


def test_cider_key_checks(val):
    refs = {r.file_id: list(r.references) for r in val[:3]}
    pred = {k: "x" for k in list(refs)[:2]} | {"000000000000": "y"}
    with pytest.raises(DataError, match=r"1 missing .*1 extra \(e.g. \['000000000000'\]\)"):
        cider(pred, refs)


def test_clipscore_equals_a_brute_force_loop(val, clip_scorer):
    pred = _predictions(val)
    mean, per_image = clip_score(clip_scorer, pred, val[0].image_path.parent)
    ref = []
    model, pre, tok = clip_scorer.model, clip_scorer.preprocess, clip_scorer.tokenizer
    with torch.no_grad():  # one image at a time, as evaluate.py does
        for r in val:
            img = model.encode_image(pre(load_image(r.image_path)).unsqueeze(0))
            txt = model.encode_text(tok([pred[r.file_id]]))
            img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
            cos = torch.nn.functional.cosine_similarity(img, txt).item()
            ref.append(2.5 * max(cos, 0))
    assert np.allclose([per_image[r.file_id] for r in val], ref, atol=1e-5)
    assert abs(mean - np.mean(ref)) < 1e-5


def test_clipscore_decoding_threads_give_the_serial_scores_and_name_a_corrupt_image(val, clip_scorer, tmp_path,
                                                                                     monkeypatch):
    """ClipConfig.num_workers > 0 decodes in threads, a few batches ahead, in record order: the same scores as the
    serial path (batches of 7 so that the last one is short), and a corrupt image is a DataError naming it."""
    import shutil
    from dataclasses import replace

    captions = [r.references[0] for r in val]
    monkeypatch.setattr(clip_scorer.cfg, "batch_size", 7)
    monkeypatch.setattr(clip_scorer, "_embedded", {})  # each path below embeds the images itself
    serial = clip_scorer.score_pairs(val, captions)
    monkeypatch.setattr(clip_scorer, "num_workers", 3)
    assert image_batches.split_preprocess(clip_scorer.preprocess) is not None  # uint8 pixels, normalised on the device
    monkeypatch.setattr(clip_scorer, "_embedded", {})
    assert np.array_equal(clip_scorer.score_pairs(val, captions), serial)
    # the GPU's path on the CPU: threads only decode, hw3lib.pil_resize resizes and crops (Pillow's integers)
    assert image_batches.device_resize(image_batches.split_preprocess(clip_scorer.preprocess)[0]) is not None
    monkeypatch.setattr(clip_scorer, "resize_on_device", True)
    monkeypatch.setattr(clip_scorer, "_embedded", {})
    assert np.array_equal(clip_scorer.score_pairs(val, captions), serial)
    broken = list(val[:20])
    bad = tmp_path / broken[9].image_path.name
    shutil.copy(broken[9].image_path, bad)
    bad.write_bytes(bad.read_bytes()[:200])
    broken[9] = replace(broken[9], image_path=bad)
    with pytest.raises(DataError, match=f"{bad.name}: corrupt or truncated"):
        clip_scorer.score_pairs(broken, captions[:20])


def test_the_images_of_a_list_scored_before_are_not_decoded_again(val, clip_scorer, tmp_path, monkeypatch):
    """Notebook 02 scores the same val images after every epoch and for every attempt: the second call with the same
    files embeds no image (the scores equal a fresh scorer's), a file changed on disk is embedded again."""
    import os
    import shutil
    from dataclasses import replace

    from hw3lib.metrics import ClipScorer

    records = [replace(r, image_path=Path(shutil.copy(r.image_path, tmp_path))) for r in val[:10]]
    decoded = []
    real = clip_scorer.image_batches
    monkeypatch.setattr(clip_scorer, "image_batches", lambda recs: decoded.append(len(recs)) or real(recs))
    first = clip_scorer.score_pairs(records, [r.references[0] for r in records])
    again = clip_scorer.score_pairs(records, [r.references[1] for r in records])  # other captions, same images
    assert decoded == [10]
    assert np.array_equal(again, ClipScorer(clip_scorer.cfg).score_pairs(records, [r.references[1] for r in records]))
    assert not np.array_equal(first, again)
    os.utime(records[3].image_path, ns=(1, 1))  # the file changed (as the disk sees it)
    clip_scorer.score_pairs(records, [r.references[0] for r in records])
    assert decoded == [10, 10]


def test_clipscore_truncates_long_captions(val, clip_scorer):
    """CLIP reads 77 tokens: what a caption says after them changes nothing (and raises nothing); before, it does."""
    long = " ".join(["a red circle"] * 40)  # 120 words, past 77 tokens
    same = [val[0], val[0]]
    scores = clip_scorer.score_pairs(same, [long, long + " and a blue square on a green background"])
    assert np.isfinite(scores).all() and scores[0] == scores[1]
    short = clip_scorer.score_pairs(same, ["a red circle", "a red circle and a blue square"])
    assert short[0] != short[1]


def test_evaluate_end_to_end(world, val, clip_scorer, tmp_path):
    full = load_split(world / "p2_data/val.json", world / "p2_data/images/val")
    pred = {r.file_id: r.references[0] for r in full}
    (tmp_path / "pred.json").write_text(json.dumps(pred))
    result = evaluate(tmp_path / "pred.json", world / "p2_data/val.json", world / "p2_data/images/val", clip_scorer)
    assert result["num_images"] == len(full) and set(result["per_image"]) == set(pred)
    assert result["cider"] > 1.0 and 0 < result["clipscore"] <= 2.5


def test_auc():
    assert auc(np.array([2.0, 3.0]), np.array([1.0, 0.0])) == 1.0
    assert auc(np.array([1.0]), np.array([1.0])) == 0.5
    assert auc(np.array([0.0, 2.0]), np.array([1.0])) == 0.5


def test_cider_in_background_equals_cider(val):
    """evaluate() runs CIDEr in a process of its own while CLIP encodes: the same numbers, errors as one line."""
    pred = _predictions(val)
    refs = {r.file_id: list(r.references[1:]) for r in val}
    assert cider_module.cider_in_background(pred, refs).result() == cider(pred, refs)
    with pytest.raises(DataError, match="missing"):
        cider_module.cider_in_background({"x": "y"}, refs)


def test_a_caption_ends_at_end_of_text_as_in_the_courses_clip(clip_scorer):
    """OpenAI's clip.tokenize (the course's) reads "<|endoftext|>" in a caption as the end token, where the text
    embedding is taken: the caption ends there. open_clip's tokenizer spells it out as text."""
    import torch

    cut, plain = clip_scorer.embed_texts(["a red circle <|endoftext|> and a blue square", "a red circle"])
    upper = clip_scorer.embed_texts(["a red circle <|ENDOFTEXT|>"])[0]
    assert torch.allclose(cut, plain, atol=1e-6) and torch.allclose(upper, plain, atol=1e-6)
    spelt = clip_scorer.model.encode_text(clip_scorer.tokenizer(["a red circle <|endoftext|> and a blue square"]))
    assert not torch.allclose(torch.nn.functional.normalize(spelt.float(), dim=-1)[0], plain, atol=1e-3)


def test_the_common_caption_baseline_is_the_most_frequent_training_caption_under_every_image(world, val, clip_scorer):
    from hw3lib.data import hw3_split

    train = hw3_split(world, "p2_data", "train")
    captions = [c for r in train for c in r.references]
    counts = {c: captions.count(c) for c in set(captions)}
    top = max(counts.values())
    base = metrics.common_caption_baseline(train, val, clip_scorer, world / "p2_data/images/val")
    assert counts[base.caption] == top == base.count and base.of == len(captions)
    same = {r.file_id: base.caption for r in val}
    assert base.cider == cider(same, {r.file_id: list(r.references) for r in val})[0]
    assert base.clipscore == pytest.approx(clip_score(clip_scorer, same, world / "p2_data/images/val")[0])
    assert np.isnan(metrics.common_caption_baseline(train, val, None, world).clipscore)
    with pytest.raises(ValueError, match="no training captions"):
        metrics.common_caption_baseline([], val, None, world)


def test_token_agreement_against_a_plain_loop():
    rng = np.random.default_rng(0)
    reference, other = {}, {}
    for i in range(200):  # short sequences over 4 tokens: equal ones, a late difference, one stopping early ...
        ref = rng.integers(0, 4, rng.integers(0, 6)).tolist()
        oth = list(ref)
        if rng.random() < 0.6 and oth:
            oth[rng.integers(len(oth))] = int(rng.integers(0, 4))
        if rng.random() < 0.3:
            oth = oth[: rng.integers(len(oth) + 1)] if rng.random() < 0.5 else oth + [1]
        reference[f"k{i}"], other[f"k{i}"] = ref, oth
    shares, firsts = [], []
    for k in reference:
        a, b = reference[k], other[k]
        n = 0
        while n < len(a) and n < len(b) and a[n] == b[n]:
            n += 1
        longer = max(len(a), len(b))
        shares.append(n / longer if longer else 1.0)
        if a != b:
            firsts.append(n)
    got = token_agreement(reference, other)
    assert got["exact"] == pytest.approx(sum(reference[k] == other[k] for k in reference) / 200)
    assert got["prefix"] == pytest.approx(np.mean(shares)) and got["first_difference"] == pytest.approx(np.mean(firsts))
    assert 0.2 < got["exact"] < 0.9  # the draw mixes equal and differing pairs
    assert token_agreement({"a": [1, 2, 3]}, {"a": [1, 2]}) == {"exact": 0.0, "prefix": 2 / 3, "first_difference": 2}
    assert token_agreement({"a": [5]}, {"a": [5]})["first_difference"] is None
    with pytest.raises(ValueError, match="different images"):
        token_agreement({"a": [1]}, {"b": [1]})
