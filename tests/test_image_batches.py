"""hw3lib.image_batches: the threaded and the on-device paths give the serial path's tensors, bit for bit."""
import numpy as np
import pytest
import torch
from PIL import Image

from hw3lib.data import DataError, Record
from hw3lib.image_batches import device_resize, image_batches, split_preprocess


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """COCO-like JPEGs: landscape, portrait, odd sizes, one grey, one progressive, one PNG."""
    folder, rng = tmp_path_factory.mktemp("jpegs"), np.random.default_rng(0)
    records = []
    for n, (h, w, kind) in enumerate([(480, 640, "RGB"), (640, 427, "RGB"), (375, 500, "L"), (333, 500, "RGB"),
                                      (480, 640, "RGB"), (612, 612, "progressive"), (240, 320, "png"),
                                      (427, 640, "RGB")]):
        smooth = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(smooth).resize((w, h), Image.BILINEAR)
        path = folder / f"{n:012d}.{'png' if kind == 'png' else 'jpg'}"
        if kind == "png":
            image.save(path)
        else:
            image = image.convert("L") if kind == "L" else image
            image.save(path, quality=90, progressive=kind == "progressive")
        records.append(Record(path, path.stem, ()))
    return records


def _vit_l14_transform():
    """The course-size encoder's preprocessing (vit_large_patch14_clip_224.openai_ft_in12k_in1k), no weights."""
    import timm
    from timm.data import create_transform, resolve_data_config

    cfg = timm.models.get_pretrained_cfg("vit_large_patch14_clip_224.openai_ft_in12k_in1k").to_dict()
    return create_transform(**resolve_data_config(pretrained_cfg=cfg), is_training=False)


def test_threads_and_the_device_resize_give_the_serial_tensors(jpegs):
    transform = _vit_l14_transform()
    assert split_preprocess(transform) is not None and device_resize(split_preprocess(transform)[0]) == (224, 224)
    serial = torch.cat(list(image_batches(jpegs, transform, 3, "cpu")))
    assert serial.shape == (len(jpegs), 3, 224, 224)
    assert torch.equal(serial, torch.stack([transform(Image.open(r.image_path).convert("RGB")) for r in jpegs]))
    for resize_on_device in (False, True):  # True: the GPU's path, here on the CPU
        threaded = list(image_batches(jpegs, transform, 3, "cpu", num_workers=2, resize_on_device=resize_on_device))
        assert [len(b) for b in threaded] == [3, 3, 2] and all(b.is_contiguous() for b in threaded)
        assert torch.equal(torch.cat(threaded), serial), resize_on_device


def test_another_transform_runs_whole_in_the_threads_and_a_bad_file_is_named(jpegs, tmp_path):
    from torchvision import transforms as T

    odd = T.Compose([T.Resize((50, 70)), T.ToTensor()])  # no Normalize: not the usual form
    assert split_preprocess(odd) is None
    assert torch.equal(torch.cat(list(image_batches(jpegs, odd, 4, "cpu", num_workers=2))),
                       torch.cat(list(image_batches(jpegs, odd, 4, "cpu"))))
    bad = tmp_path / "000000000099.jpg"
    bad.write_bytes(jpegs[0].image_path.read_bytes()[:300])
    broken = [*jpegs[:5], Record(bad, bad.stem, ())]
    with pytest.raises(DataError, match="000000000099.jpg: corrupt or truncated"):
        list(image_batches(broken, _vit_l14_transform(), 4, "cpu", num_workers=2, resize_on_device=True))


def test_extract_features_in_threads_equals_the_serial_features(jpegs, models_dir):
    from hw3lib.captioner import EncoderConfig, create_encoder, extract_features

    cfg = EncoderConfig(name=str(models_dir / "vit"), pool=2)
    encoder, transform = create_encoder(cfg)
    serial = extract_features(encoder, transform, jpegs, cfg, batch_size=3, num_workers=0)
    threaded = extract_features(encoder, transform, jpegs, cfg, batch_size=3, num_workers=2)
    assert serial.dtype == torch.float16 and serial.shape[0] == len(jpegs)
    assert torch.equal(serial, threaded)


def test_an_image_whose_read_stalls_is_named_within_the_bound(jpegs, monkeypatch):
    import threading
    import time

    import hw3lib.image_batches as ib

    release, real = threading.Event(), ib.load_image

    def load(path):
        if path == jpegs[5].image_path:
            release.wait(30)  # a read that does not come back (until the test lets it go)
        return real(path)

    monkeypatch.setattr(ib, "load_image", load)
    monkeypatch.setattr(ib, "DECODE_TIMEOUT_S", 0.5)
    start = time.monotonic()
    with pytest.raises(DataError, match=r"000000000005\.jpg: not read after 0\.5 s"):
        list(image_batches(jpegs, _vit_l14_transform(), 4, "cpu", num_workers=2, resize_on_device=False))
    assert time.monotonic() - start < 10  # neither the wait nor the threads' shutdown waited for the stalled read
    release.set()


def test_a_stalled_read_does_not_keep_the_process_from_ending(jpegs):
    """The decoding threads are daemons: after a stall's one-line error the process ends, instead of waiting at
    exit for a read that may never come back."""
    import subprocess
    import sys
    import time

    script = f"""
import threading, hw3lib.image_batches as ib
from hw3lib.data import DataError, Record
from pathlib import Path
real = ib.load_image
ib.load_image = lambda p: threading.Event().wait(120) if p.name.endswith("5.jpg") else real(p)
ib.DECODE_TIMEOUT_S = 0.5
from torchvision import transforms as T
records = [Record(Path(p), Path(p).stem, ()) for p in {[str(r.image_path) for r in jpegs[:6]]!r}]
try:
    usual = T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
    list(ib.image_batches(records, usual, 2, "cpu", num_workers=2, resize_on_device=False))
except DataError as e:
    print("caught", e)
"""
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "caught" in done.stdout and "not read after 0.5 s" in done.stdout, done.stdout + done.stderr
    assert time.monotonic() - start < 30  # not the 120 s of the stuck read


def test_a_read_that_times_out_by_itself_is_its_own_error_not_a_stall(jpegs, monkeypatch):
    import hw3lib.image_batches as ib

    def load(path):
        raise TimeoutError(f"{path}: the file server did not answer")

    monkeypatch.setattr(ib, "load_image", load)
    with pytest.raises(TimeoutError, match="the file server did not answer"):
        list(image_batches(jpegs, _vit_l14_transform(), 4, "cpu", num_workers=2, resize_on_device=False))
