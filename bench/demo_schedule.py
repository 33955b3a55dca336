"""How the demo's training schedule trades time for quality: train notebook 02's main configuration on the demo
world with the given schedule, then score the best epoch on the whole p2 val split (greedy).

    python bench/demo_schedule.py --epochs 6 --captions-per-image 2     # the demo config's schedule
    python bench/demo_schedule.py --epochs 6 --captions-per-image 1     # half the steps

Prints one line: training seconds (feature extraction included), val CIDEr, caption accuracy.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from hw3lib.captioner import CaptionerConfig, EncoderConfig, CaptionerGeneration, build, load_adapter, course_files
from hw3lib.data import hw3_split
from hw3lib.decoder import LoraConfig
from hw3lib.demo.world import world_scores
from hw3lib.metrics import score_split
from hw3lib.train import TrainConfig, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--captions-per-image", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.003)
    args = p.parse_args()
    root = Path("data/demo/hw3_data")
    torch.manual_seed(0)
    cfg = CaptionerConfig(encoder=EncoderConfig(name="data/demo/models/vit", pool=2),
                          lora=LoraConfig(r=16, alpha=32, targets=("c_attn", "c_fc")), **course_files(root))
    model, encoder, transform = build(cfg, seed=0)
    train_records, val = hw3_split(root, "p2_data", "train"), hw3_split(root, "p2_data")
    schedule = TrainConfig(num_epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                           captions_per_image=args.captions_per_image, eval_images=32, seed=0)
    with tempfile.TemporaryDirectory() as run:
        t0 = time.time()
        result = train(model, encoder, transform, train_records, val, schedule, Path(run), CaptionerGeneration(),
                       log=lambda *_: None)
        seconds = time.time() - t0
        best = load_adapter(result.best_path, with_encoder=False)[0]
    scores = score_split(best, encoder, transform, val, CaptionerGeneration(), None, root / "p2_data/images/val")
    accuracy = world_scores(root / "p2_data")["caption_accuracy"](scores.predictions)
    print(f"epochs {args.epochs}, {args.captions_per_image} references per image, batch {args.batch_size}, lr "
          f"{args.lr}: trained in {seconds:.0f} s, val CIDEr {scores.cider:.3f}, caption accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
