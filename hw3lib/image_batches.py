"""Preprocessed image batches in record order: decoded ahead in threads, and on a GPU resized there as Pillow does.

Two models read the images of a split: CLIP for CLIPScore (:class:`hw3lib.metrics.ClipScorer`) and the captioner's
frozen ViT (:func:`hw3lib.captioner.extract_features`, 10,000 training images at the course's size). Both
preprocess the same way, ``Resize(size, bicubic)``, ``CenterCrop(crop)``, ``ToTensor()``, ``Normalize(mean, std)``
(open_clip's transform and timm's), and both used to spend most of their time there, on the CPU: Pillow decodes a
COCO JPEG in about 5 ms and resizes it in about 3 ms more.

With ``num_workers`` > 0, threads decode a few batches ahead (torchvision's libjpeg-turbo and Pillow release the GIL;
threads start at once, where worker processes take a second to start and pickle every tensor back). They hand over
uint8 pixels; ``ToTensor`` and ``Normalize`` (the same float operations) then run on the device, so that no thread
runs torch kernels, whose own thread pools would fight over the cores. With ``resize_on_device`` the threads only
decode: the resize and the crop run on the device with Pillow's integer arithmetic (:mod:`hw3lib.pil_resize`,
bit-equal). Without workers, or for a transform of another form, every image goes through ``preprocess`` as it is.
Every path gives the same tensors (``tests/test_image_batches.py``).
"""
from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch

from . import pil_resize
from .data import DataError, ImageDataset, Record, load_image

DECODE_TIMEOUT_S = 300.0  # one image's decode; past it the file's read has stalled (a network file system, a bad disk)


def default_workers(device: torch.device | str) -> int:
    """Decoding threads when none are asked for: up to 16 on a GPU (the device waits for the CPU), none on the CPU
    (the model's own threads use the cores)."""
    return min(16, os.cpu_count() or 1) if torch.device(device).type == "cuda" else 0


def image_batches(records: list[Record], preprocess, batch_size: int, device: torch.device | str,
                  dtype: torch.dtype = torch.float32, num_workers: int = 0,
                  resize_on_device: bool | None = None) -> Iterator[torch.Tensor]:
    """``preprocess(image)`` of every record, stacked in batches of ``batch_size``, on ``device`` in ``dtype``.

    ``resize_on_device``: None resizes on the device when it is a GPU. Decoding starts on the call, not on the first
    ``next``, so the caller can do other work meanwhile (CLIPScore encodes the captions)."""
    device = torch.device(device)
    dataset, bs = ImageDataset(records, preprocess), batch_size
    starts = range(0, len(records), bs)

    def ready(x: torch.Tensor) -> torch.Tensor:
        return x.to(device, dtype, non_blocking=True)

    if num_workers <= 0:
        return (ready(torch.stack([dataset[i][0] for i in range(s, min(s + bs, len(records)))])) for s in starts)
    split = split_preprocess(preprocess)
    if resize_on_device is None:
        resize_on_device = device.type == "cuda"
    on_device = device_resize(split[0]) if split is not None and resize_on_device else None
    if split is None:  # not the usual transform: the whole of it in the threads
        def load(i):
            return dataset[i][0]
    else:
        on_host, mean, std = split
        mean, std = (torch.tensor(v, dtype=torch.float32, device=device)[:, None, None] for v in (mean, std))

        def load(i):
            if on_device:  # decoded here, resized and cropped on the device (bit-equal to Pillow's)
                return pil_resize.decode_rgb(records[i].image_path)
            return torch.from_numpy(np.array(on_host(load_image(records[i].image_path))))

    def finish(items):
        if split is None:
            return ready(torch.stack(items))
        if on_device:
            pixels = pil_resize.group_resize_center_crop(items, *on_device, device)
        else:
            pixels = torch.stack(items).to(device, non_blocking=True)  # (B, H, W, 3) uint8
        x = pixels.permute(0, 3, 1, 2).contiguous().to(torch.float32).div(255)  # ToTensor (NCHW in memory too)
        return x.sub_(mean).div_(std).to(dtype)  # Normalize

    pool = _DaemonPool(num_workers)
    ahead = max(2, 2 * num_workers // bs + 2)  # batches in flight
    pending = [[pool.submit(load, i) for i in range(s, min(s + bs, len(records)))] for s in starts[:ahead]]

    def batches():
        try:
            for n in range(len(starts)):
                if n + ahead < len(starts):
                    s = starts[n + ahead]
                    pending.append([pool.submit(load, i) for i in range(s, min(s + bs, len(records)))])
                yield finish([_decoded(f, records[starts[n] + k]) for k, f in enumerate(pending[n])])
                pending[n] = None
        finally:
            pool.shutdown(wait=False, cancel_futures=True)  # daemon threads: a stalled read's is not waited for

    return batches()


def _decoded(future, record: Record):
    """A thread's decoded image, waited for at most ``DECODE_TIMEOUT_S`` (every wait has a bound). A read that fails
    with a timeout of its own (``TimeoutError``) is that error, not a stall."""
    from concurrent.futures import wait

    if not wait([future], timeout=DECODE_TIMEOUT_S).done:
        raise DataError(f"{record.image_path}: not read after {DECODE_TIMEOUT_S:g} s (a stalled disk or network file "
                          "system?)")
    return future.result()


class _DaemonPool:
    """``ThreadPoolExecutor``'s ``submit`` and ``shutdown`` on daemon threads: Python joins an executor's threads when
    it exits, so one read that never returns would keep the process from ending after it said so."""

    def __init__(self, workers: int):
        import queue
        import threading

        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, daemon=True, name=f"image-decode-{i}")
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    def submit(self, fn, *args):
        from concurrent.futures import Future

        future = Future()
        self._tasks.put((future, fn, args))
        return future

    def _work(self) -> None:
        while (task := self._tasks.get()) is not None:
            future, fn, args = task
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as e:  # handed to the caller that waits on it
                    future.set_exception(e)

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        import queue

        if cancel_futures:
            while True:
                try:
                    task = self._tasks.get_nowait()
                except queue.Empty:
                    break
                if task is not None:
                    task[0].cancel()
        for _ in self._threads:
            self._tasks.put(None)
        if wait:
            for t in self._threads:
                t.join()


def device_resize(on_host) -> tuple[int, int] | None:
    """``(size, crop)`` when ``on_host`` is ``Resize(size, bicubic)`` + ``CenterCrop(crop)`` (+ open_clip's RGB
    conversion, a no-op on our RGB images), which :mod:`hw3lib.pil_resize` computes on the GPU as Pillow does."""
    from torchvision import transforms as T

    steps = list(getattr(on_host, "transforms", []))
    if steps and type(steps[-1]).__name__ == "MaybeConvertMode" and getattr(steps[-1], "mode", None) == "RGB":
        steps = steps[:-1]
    if len(steps) != 2 or type(steps[0]) is not T.Resize or type(steps[1]) is not T.CenterCrop:
        return None
    resize, crop = steps
    size = resize.size[0] if isinstance(resize.size, (list, tuple)) and len(resize.size) == 1 else resize.size
    if not isinstance(size, int) or resize.max_size is not None or \
            resize.interpolation != T.InterpolationMode.BICUBIC or len(set(crop.size)) != 1:
        return None
    try:
        pil_resize.pillow_orders_passes()
    except RuntimeError:
        return None
    return size, crop.size[0]


def split_preprocess(preprocess):
    """``(pil_steps, mean, std)`` when ``preprocess`` is the usual ``Compose([..., ToTensor(), Normalize(mean,
    std)])`` (open_clip's; timm's ``MaybeToTensor`` is a ``ToTensor``), else None."""
    from torchvision import transforms as T

    steps = getattr(preprocess, "transforms", None)
    if not steps or len(steps) < 2 or not isinstance(steps[-2], T.ToTensor) or type(steps[-1]) is not T.Normalize:
        return None
    return T.Compose(steps[:-2]), tuple(steps[-1].mean), tuple(steps[-1].std)
