"""Pillow's bicubic resize of 8-bit images, bit for bit, as two integer matrix products on any torch device.

CLIP's preprocessing (``Resize(224, bicubic)`` then ``CenterCrop(224)`` on a PIL image) costs about 3 ms of CPU per
COCO image, twice the JPEG decoding; over 2,000 images it is most of what CLIPScore waits for. Pillow resamples in
two separable passes (which one first depends on its version and the shapes: :func:`vertical_first`) with
fixed-point coefficients (22 fraction bits), rounds half up after each pass and clips to 0..255. Those are integer
sums, so float64 matrix products reproduce them exactly (every partial sum stays far below 2**53), on the GPU as
well as on the CPU. Only the output pixels that survive the center crop are computed. ``tests/test_pil_resize.py``
compares the result with Pillow's on images of many shapes.

The coefficients follow Pillow's ``Resample.c`` (``precompute_coeffs``, ``normalize_coeffs_8bpc``, the bicubic
filter with a = -0.5 and support 2), computed in Python floats, which are C doubles. On the CPU Pillow itself is
faster; this is for the GPU.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed point for 8-bit images
_HALF, _ONE = float(1 << (PRECISION_BITS - 1)), float(1 << PRECISION_BITS)


def _bicubic(x: float, a: float = -0.5) -> float:
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


@lru_cache(maxsize=256)
def coefficients(in_size: int, out_size: int) -> np.ndarray:
    """Pillow's integer coefficients for one axis, as a dense ``(out_size, in_size)`` int64 matrix."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    ss = 1.0 / filterscale
    out = np.zeros((out_size, in_size), dtype=np.int64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        w = [_bicubic((x + xmin - center + 0.5) * ss) for x in range(xmax)]
        ww = sum(w)  # Pillow adds in the same order
        for x, k in enumerate(w):
            k = k / ww if ww != 0.0 else k
            out[xx, xmin + x] = int(-0.5 + k * _ONE) if k < 0 else int(0.5 + k * _ONE)  # C's cast truncates
    return out


def resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    """torchvision's ``Resize(size)`` output for an int ``size``: the short side becomes ``size``."""
    short, long = (height, width) if height <= width else (width, height)
    if short == size:
        return height, width
    new_long = int(size * long / short)
    return (size, new_long) if height <= width else (new_long, size)


@lru_cache(maxsize=256)
def _matrix(in_size: int, out_size: int, first: int, count: int, device: torch.device) -> torch.Tensor:
    """Rows ``first .. first + count`` of the coefficient matrix, transposed, float64, on ``device``."""
    m = coefficients(in_size, out_size)[first:first + count]
    return torch.from_numpy(m.T.astype(np.float64)).to(device)


def _round(x: torch.Tensor) -> torch.Tensor:
    return torch.floor((x + _HALF) / _ONE).clamp_(0, 255)  # Pillow's clip8 of a sum that started at 1/2


def vertical_first(h: int, w: int, oh: int, ow: int) -> bool:
    """Which pass Pillow runs first. Recent Pillow runs the vertical one first when the height shrinks by more than
    twice as many pixels as the width; older Pillow always starts with the horizontal one.
    :func:`pillow_orders_passes` finds out which of the two the installed Pillow does."""
    return pillow_orders_passes() and (h - oh) > 0 and (h - oh) > (w - ow) * 2


@lru_cache(maxsize=1)
def pillow_orders_passes() -> bool:
    """Does the installed Pillow choose the order of its passes? Answered by resizing a small image whose result
    depends on the order. Raises ``RuntimeError`` if neither order gives Pillow's pixels."""
    from PIL import Image

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (60, 13, 3), dtype=np.uint8)  # 60 x 13 -> 20 x 11: the height shrinks most
    want = np.asarray(Image.fromarray(image).resize((11, 20), Image.BICUBIC))
    x = torch.from_numpy(image)[None].to(torch.float64)
    for ordered in (True, False):
        got = _passes(x, 60, 13, 20, 11, 0, 0, 20, 11, ordered).to(torch.uint8)[0].numpy()
        if np.array_equal(got, want):
            return ordered
    raise RuntimeError("this Pillow's bicubic resize is neither of the two known pass orders")


def _passes(x, h, w, oh, ow, top, left, crop_h, crop_w, v_first: bool) -> torch.Tensor:
    """The two passes over float64 ``x`` (N, H, W, C), producing output rows ``top ..`` and columns ``left ..``."""
    def horizontal(x):
        if ow == w:  # Pillow skips a pass whose size does not change (the crop is then a plain slice)
            return x[:, :, left:left + crop_w]
        return _round(torch.einsum("nhwc,wv->nhvc", x, _matrix(w, ow, left, crop_w, x.device)))

    def vertical(x):
        if oh == h:
            return x[:, top:top + crop_h]
        return _round(torch.einsum("nhwc,hu->nuwc", x, _matrix(h, oh, top, crop_h, x.device)))

    return horizontal(vertical(x)) if v_first else vertical(horizontal(x))


def resize_center_crop(pixels: torch.Tensor, size: int, crop: int) -> torch.Tensor:
    """``CenterCrop(crop)(Resize(size, BICUBIC)(image))`` of same-shape RGB images, as Pillow computes it.

    ``pixels``: uint8 ``(N, H, W, C)`` on any device; returns uint8 ``(N, crop, crop, C)`` on that device."""
    n, h, w, c = pixels.shape
    oh, ow = resized_size(h, w, size)
    if crop > oh or crop > ow:
        raise ValueError(f"center crop {crop} is larger than the resized image {oh}x{ow}")
    top, left = int(round((oh - crop) / 2.0)), int(round((ow - crop) / 2.0))
    x = _passes(pixels.to(torch.float64), h, w, oh, ow, top, left, crop, crop, vertical_first(h, w, oh, ow))
    return x.to(torch.uint8)


def group_resize_center_crop(images: list[torch.Tensor], size: int, crop: int, device: torch.device,
                             budget_bytes: int = 1 << 29) -> torch.Tensor:
    """:func:`resize_center_crop` of uint8 ``(H, W, C)`` images of any shapes (on the host, pinned for an
    asynchronous copy, or already on ``device``), in their order: ``(N, crop, crop, C)`` uint8 on ``device``.
    Images of one shape go through together, as many at a time as fit ``budget_bytes`` of float64."""
    out = torch.empty((len(images), crop, crop, images[0].shape[2]), dtype=torch.uint8, device=device)
    by_shape: dict[tuple, list[int]] = {}
    for i, im in enumerate(images):
        by_shape.setdefault(tuple(im.shape), []).append(i)
    for shape, index in by_shape.items():
        step = max(1, budget_bytes // (8 * math.prod(shape)))
        for s in range(0, len(index), step):
            part = index[s:s + step]
            x = torch.stack([images[i].to(device, non_blocking=True) for i in part])
            out[torch.tensor(part, device=device)] = resize_center_crop(x, size, crop)
    return out


# ---------------------------------------------------------------------------------------------------- decoding
def decode_rgb(path) -> torch.Tensor:
    """An image file as uint8 ``(H, W, 3)`` RGB, the pixels :func:`hw3lib.data.load_image` gives.

    A colour or grey JPEG is decoded by torchvision's libjpeg-turbo straight into a tensor, one call without the
    GIL (Pillow decodes, then copies to an array through ``tobytes``); it gives Pillow's pixels where
    :func:`jpeg_decoders_agree` says so. Anything else (other formats, CMYK, a file torchvision cannot read)
    goes through ``load_image``, which names a missing or corrupt file in a ``DataError``."""
    from .data import load_image

    if str(path).lower().endswith((".jpg", ".jpeg")) and jpeg_decoders_agree():
        from torchvision.io import ImageReadMode, decode_jpeg, read_file

        try:
            x = decode_jpeg(read_file(str(path)), mode=ImageReadMode.UNCHANGED)
        except RuntimeError:
            x = None
        if x is not None and x.shape[0] in (1, 3):
            return x.expand(3, -1, -1).permute(1, 2, 0).contiguous()
    return torch.from_numpy(np.array(load_image(path)))


@lru_cache(maxsize=1)
def jpeg_decoders_agree() -> bool:
    """Do torchvision and Pillow decode JPEGs to the same pixels here (colour with 4:2:0 and 4:4:4 chroma, grey,
    progressive)? Both use libjpeg-turbo's exact integer IDCT, but they are separate builds."""
    import io

    from PIL import Image

    try:  # deprecated from torchvision 0.29 (TorchCodec takes over): where they are gone, Pillow decodes
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return False
    rng = np.random.default_rng(0)
    colour = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    for image, kw in ((colour, dict(quality=90)), (colour, dict(quality=75, subsampling=0)),
                      (colour, dict(quality=80, progressive=True)), (colour.convert("L"), dict(quality=90))):
        buf = io.BytesIO()
        image.save(buf, format="JPEG", **kw)
        data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
        try:
            ours = decode_jpeg(data, mode=ImageReadMode.UNCHANGED).expand(3, -1, -1).permute(1, 2, 0).numpy()
        except RuntimeError:
            return False
        buf.seek(0)
        if not np.array_equal(ours, np.asarray(Image.open(buf).convert("RGB"))):
            return False
    return True
