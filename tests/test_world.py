import json

import numpy as np
import pytest
from PIL import Image

from hw3lib.data import load_split
from hw3lib.demo.world import (COLORS, SHAPES, WorldConfig, build_world, load_masks, load_objects, object_set,
                               parse_caption, world_is_built)

TINY = WorldConfig(seed=3, num_train=12, num_val=6, num_p1=4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("w"), TINY)


def test_layout_is_the_hw3_layout(tiny):
    for rel in ["p1_data/val.json", "p2_data/train.json", "p2_data/val.json", "p1_data/images/val",
                "p2_data/images/train", "p2_data/images/val", "p3_data/images"]:
        assert (tiny / rel).exists(), rel
    data = json.loads((tiny / "p2_data/train.json").read_text())
    assert set(data) == {"images", "annotations"}
    assert len(data["images"]) == 12 and len(data["annotations"]) == 12 * 5
    for img in data["images"]:
        assert len(img["file_name"]) == len("000000001086.jpg") and img["file_name"][:12].isdigit()
        assert int(img["file_name"][:12]) == img["id"]
    assert len(list((tiny / "p3_data/images").glob("*.jpg"))) == 5
    splits = ("p2_data/train", "p2_data/val", "p1_data/val")
    ids = [json.loads((tiny / f"{p}.json").read_text())["images"] for p in splits]
    all_ids = [i["id"] for split in ids for i in split]
    assert len(all_ids) == len(set(all_ids)), "an image id appears in two splits"


def test_same_seed_same_world(tiny, tmp_path):
    again = build_world(tmp_path, TINY)
    for rel in ["p2_data/train.json", "p2_data/val_objects.json", "p1_data/val.json"]:
        assert (tiny / rel).read_bytes() == (again / rel).read_bytes()
    name = sorted((tiny / "p2_data/images/val").iterdir())[0].name
    a = np.asarray(Image.open(tiny / "p2_data/images/val" / name))
    b = np.asarray(Image.open(again / "p2_data/images/val" / name))
    assert np.array_equal(a, b)
    assert world_is_built(tiny, TINY) and not world_is_built(tiny, WorldConfig(seed=4))


def test_five_distinct_captions_that_name_exactly_the_objects(tiny):
    objects = load_objects(tiny / "p2_data/train_objects.json")
    for rec in load_split(tiny / "p2_data/train.json", tiny / "p2_data/images/train"):
        assert len(rec.references) == 5 and len(set(rec.references)) == 5
        truth = object_set(objects[rec.file_id])
        assert 1 <= len(objects[rec.file_id]) <= 3
        for caption in rec.references:
            assert parse_caption(caption) == truth, caption


def test_masks_match_boxes_and_colours(tiny):
    objects = load_objects(tiny / "p2_data/val_objects.json")
    masks = load_masks(tiny / "p2_data/val_masks.npz")
    for file_id, objs in objects.items():
        lab = masks[file_id]
        img = np.asarray(Image.open(tiny / "p2_data/images/val" / f"{file_id}.jpg"), dtype=np.float32)
        for k, obj in enumerate(objs, start=1):
            ys, xs = np.nonzero(lab == k)
            assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == obj["box"]
            # the pixels under the mask have the object's colour (to within the jitter, noise and JPEG)
            inner = img[lab == k].mean(0)
            assert np.abs(inner - np.array(COLORS[obj["color"]])).max() < 45, (file_id, obj, inner)


def test_parser():
    assert parse_caption("A small red circle and a large blue square.") == {("red", "circle"), ("blue", "square")}
    assert parse_caption("two red circles") == {("red", "circle")}
    assert parse_caption("a circle that is red") == frozenset()
    assert parse_caption("Three shapes: a green star, a purple triangle and an orange square") == {
        ("green", "star"), ("purple", "triangle"), ("orange", "square")}
    assert all(s in SHAPES for _, s in parse_caption("a yellow star and a yellow triangle"))


def test_demo_world_is_big_enough(world):
    assert len(load_split(world / "p2_data/train.json", world / "p2_data/images/train")) >= 3000
    assert len(load_split(world / "p2_data/val.json", world / "p2_data/images/val")) >= 300


def test_world_scores_only_on_the_shapes_world(world, tmp_path):
    from hw3lib.data import hw3_split
    from hw3lib.demo.world import accuracy_report, ground_truth, world_scores

    truth = ground_truth(world / "p2_data")
    refs = {r.file_id: r.references[0] for r in hw3_split(world, "p2_data")[:20]}  # a reference names the scene
    assert world_scores(world / "p2_data")["caption_accuracy"](refs) == 1.0
    wrong = {k: "a red circle" for k in refs}
    rows, lines = accuracy_report(wrong, truth, n_wrong=3)
    assert sum(r["images"] for r in rows) == 20 and len(lines) == 3 and "the scene holds" in lines[0]
    assert ground_truth(tmp_path) is None and world_scores(tmp_path) == {}  # the course's data: no extra column
