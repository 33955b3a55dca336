"""The committed stand-ins load through the real loaders and really learned the world."""
import numpy as np
import torch

from hw3lib.captioner import EncoderConfig, create_encoder, encoder_grid
from hw3lib.data import load_split
from hw3lib.demo.standins import _patch_targets
from hw3lib.demo.world import load_masks, load_objects
from hw3lib.metrics import clip_check
from hw3lib.captioner import extract_features


def _patch_features(world, split, n):
    encoder, transform = create_encoder(EncoderConfig(name=str(world.parent / "models/vit"), use_cls=False))
    records = load_split(world / f"p2_data/{split}.json", world / f"p2_data/images/{split}")[:n]
    feats = extract_features(encoder, transform, records, EncoderConfig(use_cls=False)).float()  # (n, 144, D)
    masks = load_masks(world / f"p2_data/{split}_masks.npz")
    objects = load_objects(world / f"p2_data/{split}_objects.json")
    col, shp, _ = _patch_targets([masks[r.file_id] for r in records], [objects[r.file_id] for r in records], 8)
    assert encoder_grid(encoder) == (12, 12) and feats.shape[1] == 144
    return torch.nn.functional.normalize(feats.flatten(0, 1), dim=-1), col.flatten(), shp.flatten()


def test_vit_patch_tokens_know_colour_and_shape_where_the_object_is(world):
    """Nearest class-mean of patch tokens (no trained head): the object under each patch is readable."""
    f_tr, c_tr, s_tr = _patch_features(world, "train", 300)
    f_va, c_va, s_va = _patch_features(world, "val", 100)
    for labels_tr, labels_va, floor in [(c_tr, c_va, 0.9), (s_tr, s_va, 0.8)]:
        classes = labels_tr.unique()
        means = torch.nn.functional.normalize(torch.stack([f_tr[labels_tr == k].mean(0) for k in classes]), dim=-1)
        pred = classes[(f_va @ means.T).argmax(-1)]
        on_objects = labels_va > 0
        acc = (pred[on_objects] == labels_va[on_objects]).float().mean().item()
        assert acc >= floor, acc
        background = (pred[~on_objects] == 0).float().mean().item()
        assert background >= 0.9, background


def test_clip_prefers_the_own_caption(world, clip_scorer):
    val = load_split(world / "p2_data/val.json", world / "p2_data/images/val")
    check = clip_check(clip_scorer, val, seed=0)
    assert check["auc"] >= 0.9 and check["mean_true"] > check["mean_shuffled"]
    assert np.isfinite(check["true"]).all()
