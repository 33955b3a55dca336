"""Where a captioner training step's time goes: eager against compiled, on cached features.

    python bench/profile_train.py [--steps 100] [--modes eager default reduce-overhead] [--profile default]

The step of ``hw3 train`` at the hw3 profile's sizes, without the encoder: random visual features of
``vit_gigantic_patch14_clip_224``'s shape (257 tokens x 1,664) on the GPU, a random course-size GPT-2 with LoRA
r = 32 on every linear, 64 captions of 9-15 random tokens per step, 5 captions per image. Each mode runs
``--steps`` steps after ``--warmup`` (the compile happens there) and prints milliseconds per step; ``--profile``
adds torch.profiler's table over 10 steps of one mode.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hw3lib.captioner import Captioner, CaptionerConfig, EncoderConfig  # noqa: E402
from hw3lib.decoder import Decoder, DecoderConfig, LoraConfig  # noqa: E402
from hw3lib.tokenizer import BPETokenizer  # noqa: E402
from hw3lib.train import TrainConfig, _block_weights_in_bf16, _step, caption_loss  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--modes", nargs="+", default=["eager", "default", "reduce-overhead"])
    ap.add_argument("--profile", default="", help="a mode to profile over 10 steps")
    ap.add_argument("--images", type=int, default=2000, help="13 images a step: enough for the steps asked")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test of the script")
    args = ap.parse_args()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    print(f"device: {torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}; torch {torch.__version__}",
          flush=True)
    tok_dir = ROOT / "data/demo/models/decoder"
    tokenizer = BPETokenizer(tok_dir / "encoder.json", tok_dir / "vocab.bpe")
    lora = LoraConfig(r=32, alpha=64, targets=("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"))
    feats = torch.randn(args.images, 257, 1664, device=dev, dtype=torch.bfloat16)
    rng = np.random.default_rng(0)
    tokens = [[list(rng.integers(0, 1000, size=int(rng.integers(9, 16)))) for _ in range(5)]
              for _ in range(args.images)]
    order = rng.permutation(args.images)
    plan = [[(int(i), j) for i in order[s:s + 13] for j in range(5)][:64] for s in range(0, args.images - 13, 13)]
    sizes = (13, 64, 16)
    for mode in args.modes:
        torch.manual_seed(0)
        cfg = CaptionerConfig(encoder=EncoderConfig(name="vit_gigantic_patch14_clip_224"), lora=lora)
        model = Captioner(cfg, 1664, Decoder(DecoderConfig(), lora), tokenizer).to(dev)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, fused=dev.type == "cuda")
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        loss_fn = caption_loss(model, dev.type == "cuda", None if mode == "eager" else sizes,
                               None if mode in ("eager", "default") else mode)

        def step(batch):
            images = sorted({i for i, _ in batch})
            local = {i: n for n, i in enumerate(images)}
            ids, targets = model.batch_tokens([tokens[i][j] for i, j in batch])
            index = torch.tensor([local[i] for i, _ in batch], device=dev)
            loss = loss_fn(feats[images], index, ids.to(dev), targets.to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            _step(opt, sched, params, TrainConfig())
            return loss.detach().clone()  # a CUDA graph reuses its output's memory

        model.train()
        with _block_weights_in_bf16(model, dev.type == "cuda"):
            t0 = time.perf_counter()
            for b in plan[: args.warmup]:
                step(b)
            sync()
            warm = time.perf_counter() - t0
            t0 = time.perf_counter()
            losses = [step(b) for b in plan[args.warmup: args.warmup + args.steps]]
            sync()
            per = (time.perf_counter() - t0) / len(losses)
            print(f"{mode}: {1000 * per:.1f} ms/step over {len(losses)} steps (warm-up {warm:.1f}s); "
                  f"mean loss {torch.stack(losses).float().mean().item():.4f}", flush=True)
            if mode == args.profile:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for b in plan[args.warmup + args.steps: args.warmup + args.steps + 10]:
                        step(b)
                    sync()
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25,
                                                max_name_column_width=70))
                print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12,
                                                max_name_column_width=70))


if __name__ == "__main__":
    main()
