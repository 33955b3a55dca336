"""Do CLIPScore's fast image path and Pillow's give the same pixels on a real folder of images?

    python bench/clip_paths_agree.py IMAGES_DIR [--clip-model ViT-B-32-quickgelu] [--clip-pretrained openai]

On a GPU, ``ClipScorer.image_batches`` decodes JPEGs with torchvision where it matches Pillow, and resizes and
crops on the GPU with Pillow's integer arithmetic (``hw3lib.pil_resize``). This script builds every batch of the
folder both ways (the fast path, and Pillow doing all of it in the threads) and compares them bit for bit; the
rehearsal's hw3_data has COCO's sizes, grey and CMYK JPEGs and an EXIF-rotated one.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hw3lib import pil_resize  # noqa: E402
from hw3lib.data import list_images  # noqa: E402
from hw3lib.metrics import ClipConfig, ClipScorer  # noqa: E402


def batches(scorer: ClipScorer, records, fast: bool) -> tuple[list[torch.Tensor], float]:
    scorer.resize_on_device = fast
    agree = pil_resize.jpeg_decoders_agree
    if not fast:
        pil_resize.jpeg_decoders_agree = lambda: False
    try:
        t = time.perf_counter()
        out = [b.clone() for b in scorer.image_batches(records)]
        torch.cuda.synchronize() if scorer.device.type == "cuda" else None
        return out, time.perf_counter() - t
    finally:
        pil_resize.jpeg_decoders_agree = agree


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images")
    ap.add_argument("--clip-model", default="ViT-B-32-quickgelu")
    ap.add_argument("--clip-pretrained", default="openai")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    records = list_images(args.images)
    scorer = ClipScorer(ClipConfig(model=args.clip_model, pretrained=args.clip_pretrained or None))
    fast, t_fast = batches(scorer, records, True)
    slow, t_slow = batches(scorer, records, False)
    sizes: dict[str, int] = {}
    for r in records:
        from PIL import Image

        with Image.open(r.image_path) as im:
            key = f"{im.mode} {im.size[0]}x{im.size[1]}"
        sizes[key] = sizes.get(key, 0) + 1
    equal = sum(torch.equal(a, b) for a, b in zip(fast, slow))
    images_equal = sum(bool(torch.equal(x, y)) for a, b in zip(fast, slow) for x, y in zip(a, b))
    out = {"device": str(scorer.device), "images": len(records), "batches": len(fast), "batches_equal": equal,
           "images_equal": images_equal, "fast_s": t_fast, "pillow_s": t_slow,
           "jpeg_decoders_agree": pil_resize.jpeg_decoders_agree(),
           "modes_and_sizes": dict(sorted(sizes.items(), key=lambda kv: -kv[1]))}
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
