import json

import numpy as np
import pytest
from PIL import Image

from hw3lib.data import (DataError, check_keys, list_images, load_annotations, load_image, load_split,
                         read_predictions)


def _coco(tmp_path, images, annotations, name="ann.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def test_split_records(world):
    records = load_split(world / "p2_data/val.json", world / "p2_data/images/val")
    assert records[0].image_path.is_file() and len(records[0].references) == 5
    assert records[0].file_id == records[0].image_path.stem


@pytest.mark.parametrize("payload, words", [
    ([1, 2], "not a COCO captions file"),
    ({"images": []}, "not a COCO captions file"),
    ({"images": [{"id": 1}], "annotations": []},
     "images[0] needs an 'id' (number or string) and a string 'file_name'"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1}]}, "annotations[0] needs"),
])
def test_malformed_annotation_files(tmp_path, payload, words):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(DataError, match="bad.json") as e:
        load_annotations(path)
    assert words in str(e.value)


def test_not_json(tmp_path):
    path = tmp_path / "val.json"
    path.write_text("{'images': ")
    with pytest.raises(DataError, match=r"val\.json: not valid JSON"):
        load_annotations(path)
    with pytest.raises(DataError, match="missing.json: file not found"):
        load_annotations(tmp_path / "missing.json")


def test_unknown_image_id_and_image_without_caption(tmp_path):
    imgs = [{"id": 1, "file_name": "000000000001.jpg"}, {"id": 2, "file_name": "000000000002.jpg"}]
    path = _coco(tmp_path, imgs, [{"image_id": 1, "caption": "a", "id": 1}, {"image_id": 7, "caption": "b", "id": 2}])
    with pytest.raises(DataError, match=r"ann\.json: annotations\[1\] refers to image_id 7"):
        load_annotations(path)
    path = _coco(tmp_path, imgs, [{"image_id": 1, "caption": "a", "id": 1}])
    with pytest.raises(DataError, match=r"ann\.json: 1 image\(s\) have no caption, e.g. \['000000000002'\]"):
        load_annotations(path)


def test_missing_image(tmp_path):
    (tmp_path / "images").mkdir()
    path = _coco(tmp_path, [{"id": 1, "file_name": "000000000001.jpg"}], [{"image_id": 1, "caption": "a", "id": 1}])
    with pytest.raises(DataError, match=r"000000000001\.jpg: image listed in .*ann\.json not found"):
        load_split(path, tmp_path / "images")
    with pytest.raises(DataError, match="nope: image folder not found"):
        load_split(path, tmp_path / "nope")
    with pytest.raises(DataError, match="images: no images"):
        list_images(tmp_path / "images")


def test_corrupt_truncated_and_non_images(tmp_path, world):
    src = next((world / "p2_data/images/val").iterdir()).read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(src[: len(src) // 2])
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(DataError, match=r"trunc\.jpg: corrupt or truncated image"):
        load_image(tmp_path / "trunc.jpg")
    with pytest.raises(DataError, match=r"text\.jpg: not an image file"):
        load_image(tmp_path / "text.jpg")
    with pytest.raises(DataError, match=r"gone\.jpg: image file not found"):
        load_image(tmp_path / "gone.jpg")


def test_odd_images_become_rgb(tmp_path):
    grad = np.tile(np.linspace(0, 1, 32), (24, 1))
    cases = {
        "gray.png": Image.fromarray((grad * 255).astype(np.uint8)),
        "rgba.png": Image.fromarray(np.dstack([(grad * 255).astype(np.uint8)] * 3 + [np.full((24, 32), 0, np.uint8)])),
        "palette.png": Image.fromarray((grad * 255).astype(np.uint8)).convert("P"),
        "deep.png": Image.fromarray((grad * 65535).astype(np.uint16)),
        "cmyk.jpg": Image.new("CMYK", (32, 24), (0, 255, 0, 0)),
    }
    assert [cases[n].mode for n in ("gray.png", "rgba.png", "palette.png", "deep.png")] == ["L", "RGBA", "P", "I;16"]
    for name, im in cases.items():
        im.save(tmp_path / name)
        rgb = load_image(tmp_path / name)
        assert rgb.mode == "RGB" and rgb.size == (32, 24), name
    deep = np.asarray(load_image(tmp_path / "deep.png"))
    assert deep[0, 0, 0] == 0 and deep[0, -1, 0] == 255 and 100 < deep[0, 16, 0] < 160  # rescaled, not clipped
    assert np.asarray(load_image(tmp_path / "rgba.png")).min() == 255  # fully transparent -> white background


def test_predictions_files(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps({"000000000001": "a cat", "000000000002": 3}))
    with pytest.raises(DataError, match=r"p\.json: every caption must be a string; 1 are not"):
        read_predictions(tmp_path / "p.json")
    (tmp_path / "l.json").write_text(json.dumps(["a cat"]))
    with pytest.raises(DataError, match=r"l\.json: predictions must be a JSON object"):
        read_predictions(tmp_path / "l.json")
    refs = {"000000000001": ["x"], "000000000002": ["y"]}
    with pytest.raises(DataError) as e:
        check_keys({"000000000001": "a", "000000000001.jpg": "b"}, refs, "pred.json", "val.json")
    msg = str(e.value)
    assert "pred.json" in msg and "1 missing (e.g. ['000000000002'])" in msg
    assert "1 extra (e.g. ['000000000001.jpg'])" in msg
