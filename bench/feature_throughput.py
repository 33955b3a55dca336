"""The captioner's encoder features over N COCO-like JPEGs: the image pipeline before and after hw3lib.image_batches.

    python bench/feature_throughput.py [--images 2000] [--device cpu|cuda] [--workers 16] [--encoder NAME]
                                       [--json OUT.json]

Two ways of feeding the frozen ViT the same pixels, in one process, on the same files (written on the spot by the
rehearsal's COCO-like generator: COCO's sizes, a few grey and CMYK images):

* ``loader``: what ``extract_features`` did before: a ``DataLoader`` with ``--workers`` worker processes, each
  decoding with Pillow and running timm's whole transform (bicubic resize, crop, ToTensor, Normalize);
* ``threads``: :func:`hw3lib.image_batches.image_batches` with ``--workers`` threads, which only decode on a GPU
  (torchvision's libjpeg-turbo) while the GPU resizes as Pillow does; on the CPU they also resize (Pillow).

Also timed: ``decode`` alone (torchvision's decoder in the same threads, no resize), the host's share of the
``threads`` path on a GPU; on a CPU-only machine it shows what a GPU would take off the cores. For each: the seconds of
the image pipeline alone (every batch on the device), then of ``extract_features`` with the
encoder (``--encoder``, timm name with random weights: weights do not change speed; default the course's ViT-L/14).
The runs alternate, ``--repeats`` times each, and the medians are reported, with their ratio and a check that both
paths gave the same features.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hw3lib.captioner import EncoderConfig, create_encoder, encode_images  # noqa: E402
from hw3lib.data import ImageDataset, list_images  # noqa: E402
from hw3lib.image_batches import image_batches  # noqa: E402
from hw3lib.pil_resize import decode_rgb  # noqa: E402
from hw3lib.rehearsal.coco import write_split  # noqa: E402


def loader_batches(records, transform, batch_size, device, workers):
    """The DataLoader path that extract_features used before image_batches (worker processes, Pillow)."""
    loader = torch.utils.data.DataLoader(ImageDataset(records, transform), batch_size=batch_size,
                                         num_workers=workers, pin_memory=device.type == "cuda")
    return (x.to(device, non_blocking=True) for x, _ in loader)


def features(encoder, batches, cfg, device) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for x in batches:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out.append(encode_images(encoder, x, cfg).half().cpu())
    return torch.cat(out)


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workers", type=int, default=4, help="worker processes (loader) and threads (threads)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--encoder", default="vit_large_patch14_clip_224.openai_ft_in12k_in1k")
    ap.add_argument("--no-encoder", action="store_true", help="time the image pipeline only")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        write_split(Path(tmp) / "images", None, args.images, np.random.default_rng(0), set(), log=lambda *_: None,
                    workers=args.workers)
        records = list_images(Path(tmp) / "images")
        print(f"{len(records)} COCO-like JPEGs written in {time.time() - t0:.1f}s", flush=True)
        cfg = EncoderConfig(name=args.encoder, random_weights=True)
        encoder, transform = create_encoder(cfg)
        encoder.to(device)
        paths = {"loader": lambda: loader_batches(records, transform, args.batch_size, device, args.workers),
                 "threads": lambda: image_batches(records, transform, args.batch_size, device,
                                                  num_workers=args.workers)}
        seconds = {f"{name}_{part}": [] for name in paths for part in ("images", "features")}
        seconds["decode_images"] = []
        outputs = {}
        for _ in range(args.repeats):
            with ThreadPoolExecutor(max(1, args.workers)) as pool:
                seconds["decode_images"].append(timed(lambda: list(pool.map(decode_rgb, [r.image_path for r in
                                                                                      records])))[0])
            for name, batches in paths.items():
                seconds[f"{name}_images"].append(timed(lambda: sum(1 for _ in batches()))[0])
                if not args.no_encoder:
                    t, outputs[name] = timed(lambda: features(encoder, batches(), cfg, device))
                    seconds[f"{name}_features"].append(t)
                print(name, {k: round(v[-1], 2) for k, v in seconds.items() if k.startswith(name) and v},
                      flush=True)
    median = {k: statistics.median(v) for k, v in seconds.items() if v}
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "cpu_count": len(__import__("os").sched_getaffinity(0)), "torch": torch.__version__,
              "images": len(records), "workers": args.workers, "batch_size": args.batch_size,
              "encoder": args.encoder, "repeats": args.repeats, "seconds": seconds, "median_seconds": median,
              "images_per_s": {k: round(len(records) / v, 1) for k, v in median.items()},
              "speedup_images": round(median["loader_images"] / median["threads_images"], 2)}
    if not args.no_encoder:
        result["speedup_features"] = round(median["loader_features"] / median["threads_features"], 2)
        result["features_equal"] = bool(torch.equal(outputs["loader"], outputs["threads"]))
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
