"""Evaluation throughput: CIDEr-D + CLIPScore over N captions, end to end (the course's evaluate.py).

    python bench/eval_throughput.py [--captions 2000] [--device cpu|cuda] [--json OUT.json]

On a GPU, CLIP runs in fp16 (as the course's ``clip.load``) with images decoded in threads, while CIDEr-D runs in a
process of its own beside it (:func:`hw3lib.metrics.evaluate`). The run also scores the same pairs in
fp32 and reports the difference of the means: on the random-weight B/32 here, and on the demo's trained stand-in
CLIP over its 300 p2 val images when ``--demo-clip`` names it.

CLIPScore uses the CLIP ViT-B/32 architecture (open_clip ``ViT-B-32-quickgelu``) with random weights: weights do
not change speed. The data are COCO-size JPEGs (640 x 480) with 5 references each and one prediction per image,
written on the spot. Timed: reading the files, CIDEr-D (pycocoevalcap's PTB tokenizer: Java when installed) and
CLIPScore (image decoding, preprocessing, both encoders), through :func:`hw3lib.metrics.evaluate`.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hw3lib.data import load_annotations, write_json_atomic  # noqa: E402
from hw3lib.metrics import (ClipConfig, ClipScorer, cider, cider_in_background, clip_score, evaluate,  # noqa: E402
                            java_available)

sys.path.insert(0, str(ROOT / "bench"))
from train_throughput import WORDS, make_data  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--captions", type=int, default=2000)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--decode", choices=["threads", "processes"], default="threads",
                    help="threads: the workbook's; processes: DataLoader worker processes running the whole "
                         "preprocessing, the path before (for a comparison in one run)")
    ap.add_argument("--resize", choices=["device", "host"], default="device",
                    help="device: threads only decode, the resize and crop run on the GPU with Pillow's integers "
                         "(the workbook's on a GPU); host: Pillow resizes in the threads (the path before)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of evaluate (the median is reported)")
    ap.add_argument("--decoder", choices=["auto", "pillow"], default="auto",
                    help="auto: JPEGs through torchvision where it gives Pillow's pixels (the workbook's); pillow: "
                         "every image through Pillow")
    ap.add_argument("--skip-precision", action="store_true", help="skip the fp16 / fp32 comparison")
    ap.add_argument("--json", default="")
    ap.add_argument("--workers", type=int, default=None, help="decoding workers (default: ClipConfig's)")
    ap.add_argument("--precision", default="auto", help="auto (the course's: fp16 on a GPU), fp16 or fp32")
    ap.add_argument("--demo-clip", default="", help="the stand-in CLIP folder (data/demo/models/clip)")
    ap.add_argument("--demo-images", default="data/demo/hw3_data/p2_data", help="its p2_data folder")
    args = ap.parse_args()

    name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}; java: {java_available()}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="eval_bench_"))
    t0 = time.time()
    p2 = make_data(tmp, 0, args.captions)  # the val split only
    rng = np.random.default_rng(1)
    ids = [f"{i:012d}" for i in range(args.captions)]
    pred = {k: " ".join(rng.choice(WORDS, size=int(rng.integers(8, 15)))) for k in ids}
    write_json_atomic(tmp / "pred.json", pred)
    print(f"{args.captions} JPEGs 640x480, 5 references each, in {time.time() - t0:.1f}s", flush=True)

    torch.manual_seed(0)
    scorer = ClipScorer(ClipConfig(model="ViT-B-32-quickgelu", pretrained=None, device=args.device,
                                   batch_size=args.batch_size, num_workers=args.workers, precision=args.precision))
    scorer.resize_on_device = args.resize == "device" and args.device == "cuda"
    if args.decoder == "pillow":
        from hw3lib import pil_resize

        pil_resize.jpeg_decoders_agree = lambda: False
    if args.decode == "processes":
        scorer.image_batches = lambda records: _loader_batches(scorer, records)
    print(f"CLIP in {scorer.dtype}, {scorer.num_workers} decoding {args.decode}, resize on the "
          f"{'device' if scorer.resize_on_device else 'host'}", flush=True)
    evaluate(tmp / "pred.json", p2 / "val.json", p2 / "images" / "val", clip=scorer)  # warm: CUDA, page cache
    runs = []
    for _ in range(args.repeats):
        t0 = time.time()
        result = evaluate(tmp / "pred.json", p2 / "val.json", p2 / "images" / "val", clip=scorer)
        runs.append(time.time() - t0)
        print(f"evaluate: {runs[-1]:.2f}s", flush=True)
    seconds = float(np.median(runs))
    timed_dtype = scorer.dtype  # the comparison below switches the model between fp16 and fp32
    precision = {} if args.skip_precision else {"random_b32": _fp16_vs_fp32(scorer, pred, p2 / "images" / "val")}
    if args.demo_clip:
        demo = ClipScorer(ClipConfig(model=args.demo_clip, pretrained=None, device=args.device))
        refs = load_annotations(Path(args.demo_images) / "val.json")
        precision["demo_clip_first_reference"] = _fp16_vs_fp32(demo, {k: v[0] for k, v in refs.items()},
                                                                Path(args.demo_images) / "images" / "val")
    print(f"fp16 - fp32 of the mean CLIPScore: {precision}", flush=True)
    scorer.model.to(timed_dtype)
    scorer.dtype = timed_dtype
    # the two halves again, separately, for where the time goes
    t1 = time.time()
    cider(pred, load_annotations(p2 / "val.json"))
    t_cider = time.time() - t1
    t1 = time.time()
    cider_in_background(pred, load_annotations(p2 / "val.json")).result()
    t_cider_bg = time.time() - t1
    t1 = time.time()
    clip_score(scorer, pred, p2 / "images" / "val")
    t_clip = time.time() - t1
    from hw3lib.data import list_images

    records = list_images(p2 / "images" / "val")
    t1 = time.time()
    for _ in scorer.image_batches(records):  # decoding (+ resizing), no CLIP
        pass
    torch.cuda.synchronize() if args.device == "cuda" else None
    t_images = time.time() - t1
    t1 = time.time()
    scorer.embed_texts(list(pred.values()))
    t_texts = time.time() - t1
    out = {"device": name, "torch": torch.__version__, "java": java_available(), "captions": args.captions,
           "seconds": seconds, "seconds_runs": runs, "captions_per_s": args.captions / seconds,
           "cider_seconds": t_cider, "cider_background_seconds": t_cider_bg,
           "clipscore_seconds": t_clip,
           "image_batches_seconds": t_images, "embed_texts_seconds": t_texts, "cider": result["cider"],
           "clipscore": result["clipscore"],
           "clip_dtype": str(timed_dtype), "clip_workers": scorer.num_workers, "decode": args.decode,
           "resize_on_device": scorer.resize_on_device, "decoder": args.decoder,
           "fp16_vs_fp32": precision}
    print(f"evaluate: {args.captions} captions in {seconds:.2f}s, the median of {len(runs)} runs "
          f"({args.captions / seconds:.1f} captions/s), "
          f"CIDEr + CLIPScore end to end; separately CIDEr {t_cider:.2f}s in this process, "
          f"{t_cider_bg:.2f}s in its own with forked workers, CLIPScore {t_clip:.2f}s (image batches alone "
          f"{t_images:.2f}s, texts alone {t_texts:.2f}s)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


def _loader_batches(scorer: ClipScorer, records):
    """The path before: a DataLoader whose worker processes decode and run the whole preprocessing."""
    from hw3lib.data import ImageDataset

    loader = torch.utils.data.DataLoader(ImageDataset(records, scorer.preprocess), batch_size=scorer.cfg.batch_size,
                                         num_workers=scorer.num_workers, pin_memory=scorer.device.type == "cuda")
    return (x.to(scorer.device, scorer.dtype, non_blocking=True) for x, _ in loader)


def _fp16_vs_fp32(scorer: ClipScorer, pred: dict, image_dir: Path) -> dict:
    """The mean CLIPScore of the same pairs with the model in fp16 and in fp32, and the largest per-pair gap."""
    out = {}
    for dtype in (torch.float16, torch.float32):
        scorer.model.to(dtype)
        scorer.dtype = dtype
        out[str(dtype).removeprefix("torch.")] = clip_score(scorer, pred, image_dir)
    (m16, p16), (m32, p32) = out["float16"], out["float32"]
    return {"mean_fp16": m16, "mean_fp32": m32, "difference": m16 - m32,
            "max_pair_difference": max(abs(p16[k] - p32[k]) for k in p32), "pairs": len(p32)}


if __name__ == "__main__":
    main()
