"""hw3lib.pil_resize against Pillow itself: CLIP's Resize(224, bicubic) + CenterCrop(224), bit for bit."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from hw3lib.pil_resize import coefficients, group_resize_center_crop, resize_center_crop

SHAPES = [(480, 640), (427, 640), (640, 480), (375, 500), (224, 224), (224, 300), (300, 224), (100, 80),
          (37, 500), (1200, 229), (225, 226), (333, 333), (2000, 3000)]


def _image(h, w, seed):
    rng = np.random.default_rng(seed)
    smooth = np.asarray(Image.fromarray(rng.integers(0, 256, (max(h // 40, 2), max(w // 40, 2), 3), dtype=np.uint8))
                        .resize((w, h), Image.BICUBIC), dtype=np.int16)
    noisy = smooth + rng.integers(-60, 61, (h, w, 3))  # sharp edges and saturated pixels exercise the clipping
    noisy[rng.random((h, w)) < 0.01] = 255
    return np.clip(noisy, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("h,w", SHAPES)
def test_resize_center_crop_is_pillows_bit_for_bit(h, w):
    pil = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224)])
    image = _image(h, w, seed=h * 7 + w)
    want = np.asarray(pil(Image.fromarray(image)))
    got = resize_center_crop(torch.from_numpy(image)[None], 224, 224)[0].numpy()
    assert got.shape == want.shape == (224, 224, 3)
    assert np.array_equal(got, want), f"{h}x{w}: {np.count_nonzero(got != want)} values differ"


def test_a_group_of_mixed_shapes_keeps_the_order_and_splits_by_budget():
    images = [_image(h, w, seed=i) for i, (h, w) in enumerate([(480, 640), (427, 640), (480, 640), (300, 224)] * 2)]
    pil = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224)])
    want = np.stack([np.asarray(pil(Image.fromarray(im))) for im in images])
    got = group_resize_center_crop([torch.from_numpy(im) for im in images], 224, 224, torch.device("cpu"),
                                   budget_bytes=8 * 480 * 640 * 3)
    assert np.array_equal(got.numpy(), want)


def test_coefficients_sum_to_one_in_fixed_point():
    for n_in, n_out in [(640, 298), (480, 224), (80, 224)]:
        sums = coefficients(n_in, n_out).sum(1)
        assert np.all(np.abs(sums - (1 << 22)) <= 8), (n_in, n_out, sums.min(), sums.max())


def test_random_shapes_including_both_pass_orders():
    """Recent Pillow runs its vertical pass first when the height shrinks by more than twice the width's pixels."""
    rng = np.random.default_rng(3)
    pil = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224)])
    for h, w in rng.integers(150, 1400, (12, 2)):
        image = _image(int(h), int(w), seed=int(h + w))
        got = resize_center_crop(torch.from_numpy(image)[None], 224, 224)[0].numpy()
        assert np.array_equal(got, np.asarray(pil(Image.fromarray(image)))), (h, w)


def test_decode_rgb_gives_load_images_pixels_and_its_errors(tmp_path):
    """JPEGs through torchvision (colour 4:2:0 / 4:4:4, progressive, grey), the rest through Pillow (CMYK, PNG, a
    PNG named .jpg); a truncated JPEG is load_image's DataError naming the file."""
    from hw3lib.data import DataError, load_image
    from hw3lib.pil_resize import decode_rgb, jpeg_decoders_agree

    assert jpeg_decoders_agree()
    colour = Image.fromarray(_image(123, 211, seed=5))
    files = {"a.jpg": (colour, dict(quality=90)), "b.jpeg": (colour, dict(quality=70, subsampling=0)),
             "c.JPG": (colour, dict(quality=85, progressive=True)), "d.jpg": (colour.convert("L"), {}),
             "e.jpg": (colour.convert("CMYK"), {}), "f.png": (colour, {})}
    for name, (image, kw) in files.items():
        image.save(tmp_path / name, format="PNG" if name.endswith("png") else "JPEG", **kw)
    (tmp_path / "g.jpg").write_bytes((tmp_path / "f.png").read_bytes())  # a PNG under a JPEG name
    for name in [*files, "g.jpg"]:
        got = decode_rgb(tmp_path / name)
        assert got.dtype == torch.uint8 and got.is_contiguous()
        assert np.array_equal(got.numpy(), np.asarray(load_image(tmp_path / name))), name
    (tmp_path / "h.jpg").write_bytes((tmp_path / "a.jpg").read_bytes()[:-300])
    with pytest.raises(DataError, match="h.jpg: corrupt or truncated"):
        decode_rgb(tmp_path / "h.jpg")
    with pytest.raises(DataError, match="i.jpg: image file not found"):
        decode_rgb(tmp_path / "i.jpg")


def test_without_torchvisions_decoder_pillow_decodes(tmp_path, monkeypatch):
    """Where torchvision.io has no decode_jpeg any more (deprecated from 0.29), JPEGs go through Pillow."""
    import torchvision.io

    from hw3lib import pil_resize
    from hw3lib.data import load_image

    monkeypatch.delattr(torchvision.io, "decode_jpeg")
    pil_resize.jpeg_decoders_agree.cache_clear()
    try:
        assert not pil_resize.jpeg_decoders_agree()
        Image.fromarray(_image(50, 70, seed=1)).save(tmp_path / "a.jpg")
        got = pil_resize.decode_rgb(tmp_path / "a.jpg")
        assert np.array_equal(got.numpy(), np.asarray(load_image(tmp_path / "a.jpg")))
    finally:
        pil_resize.jpeg_decoders_agree.cache_clear()
