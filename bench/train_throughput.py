"""P2 captioner training throughput on one GPU: one epoch with the feature cache vs. without.

    python bench/train_throughput.py [--images 10000] [--encoder vit_gigantic_patch14_clip_224] [--json OUT.json]
        [--compile-runs off on on] [--skip-probes]

Weights do not change speed: the encoder is the timm architecture with random weights, the decoder a random
course-size GPT-2 (12 x 768, vocabulary 50,257) saved as ``decoder_model.bin``, with LoRA r = 32 on every linear
layer (c_attn, attn.c_proj, c_fc, mlp.c_proj). The data is a fake ``hw3_data/p2_data`` in the course's layout:
COCO-size JPEGs (640 x 480) with 5 captions each, written on the spot.

Three timings, in one run, through ``hw3lib.train.train``:
* **cache**: the encoder runs once per image (DataLoader workers decode), then the epoch trains on cached features,
  with the eager step and the compiled one (``--compile-runs``);
* **no cache**: the encoder runs inside every training step (images decoded in the step);
* **per caption** (the HW3 solutions' way): every caption is its own sample, so the encoder runs 5 times per
  image and the decoder re-reads the visual prefix for each caption.
The last two are timed over ``--probe-steps`` steps and scaled to the epoch (printed as such).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hw3lib.captioner import CaptionerConfig, EncoderConfig, build, checked_trainable_count  # noqa: E402
from hw3lib.data import Record, load_split, write_json_atomic  # noqa: E402
from hw3lib.decoder import Decoder, DecoderConfig, LoraConfig, save_checkpoint  # noqa: E402
from hw3lib.train import TrainConfig, train  # noqa: E402

WORDS = ("a man woman dog cat red blue green large small sitting standing on in next to the with table street "
         "grass field bus train plate pizza bench water boat sky tree building people two three of").split()


class _Stop(Exception):
    pass


def make_data(root: Path, n_train: int, n_val: int, seed: int = 0) -> Path:
    """A fake hw3_data/p2_data: 640 x 480 JPEGs, 5 captions of 8-14 words each, the course's JSON layout."""
    p2 = root / "p2_data"
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        folder = p2 / "images" / split
        folder.mkdir(parents=True, exist_ok=True)

        def one(i: int, folder=folder) -> None:
            r = np.random.default_rng(seed + i)
            small = r.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
            Image.fromarray(small).resize((640, 480), Image.BICUBIC).save(folder / f"{i:012d}.jpg", quality=90)

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(one, range(n)))
        images = [{"id": i, "file_name": f"{i:012d}.jpg"} for i in range(n)]
        anns = [{"image_id": i, "id": 5 * i + j,
                 "caption": " ".join(rng.choice(WORDS, size=int(rng.integers(8, 15))))} for i in range(n)
                for j in range(5)]
        write_json_atomic(p2 / f"{split}.json", {"images": images, "annotations": anns})
    return p2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--val-images", type=int, default=100)
    ap.add_argument("--encoder", default="vit_gigantic_patch14_clip_224")
    ap.add_argument("--batch-size", type=int, default=64, help="captions per step (the uncached probes)")
    ap.add_argument("--cache-batch-sizes", type=int, nargs="+", default=[64, 256],
                    help="captions per step for the cached epoch, one full epoch each")
    ap.add_argument("--compile-runs", nargs="+", default=["off", "on", "on"], choices=["off", "on", "blocks"],
                    help="the cached epoch once per entry, with the compiled step on or off (TrainConfig.compile), "
                         "or only the decoder's blocks compiled (compile_scope 'blocks'); "
                         "the first 'on' compiles, a later one finds the compiled code in inductor's cache")
    ap.add_argument("--skip-probes", action="store_true", help="only the cached epochs")
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--probe-steps", type=int, default=40, help="steps timed for the two uncached paths")
    ap.add_argument("--tokenizer", default=str(ROOT / "data/demo/models/decoder"),
                    help="folder with encoder.json + vocab.bpe (the stand-in's, padded to 50,257 ids)")
    ap.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke test of the script)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    device = args.device
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="train_bench_"))
    t0 = time.time()
    p2 = make_data(tmp, args.images, args.val_images)
    print(f"{args.images} + {args.val_images} JPEGs 640x480 with 5 captions each in {time.time() - t0:.1f}s",
          flush=True)
    torch.manual_seed(0)
    save_checkpoint(Decoder(DecoderConfig()), p2 / "decoder_model.bin")  # random course-size GPT-2
    # the stand-in's BPE, padded with unused entries to GPT-2's 50,257 ids (<|endoftext|> last, as in GPT-2), so
    # that the tokenizer and the course-size decoder belong together; the padding ids never occur in the captions
    src = json.loads((Path(args.tokenizer) / "encoder.json").read_text())
    eot = src.pop("<|endoftext|>")
    assert sorted(src.values()) == list(range(eot))
    src.update({f"<|unused{i}|>": i for i in range(eot, 50256)})
    src["<|endoftext|>"] = 50256
    (p2 / "encoder.json").write_text(json.dumps(src))
    (p2 / "vocab.bpe").write_bytes((Path(args.tokenizer) / "vocab.bpe").read_bytes())
    tok = p2
    cfg = CaptionerConfig(encoder=EncoderConfig(name=args.encoder, random_weights=True),
                          decoder_checkpoint=str(p2 / "decoder_model.bin"), encoder_json=str(tok / "encoder.json"),
                          vocab_bpe=str(tok / "vocab.bpe"),
                          lora=LoraConfig(r=32, alpha=64, targets=("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj")))
    train_recs = load_split(p2 / "train.json", p2 / "images" / "train")
    val_recs = load_split(p2 / "val.json", p2 / "images" / "val")
    results: dict = {"device": name, "torch": torch.__version__, "encoder": args.encoder, "images": len(train_recs),
                     "captions": 5 * len(train_recs), "batch_size": args.batch_size}

    t0 = time.time()
    model, encoder, transform = build(cfg)  # the encoder is built once and shared by the three runs
    encoder.to(device)
    results["trainable_params"] = checked_trainable_count(model)
    results["encoder_params"] = sum(p.numel() for p in encoder.parameters())
    print(f"built in {time.time() - t0:.1f}s; encoder {args.encoder}: {results['encoder_params'] / 1e9:.2f} B "
          f"parameters (frozen); trainable {results['trainable_params']:,}", flush=True)
    del model

    def fresh():
        return build(cfg, with_encoder=False, encoder_dim=encoder.num_features)[0], encoder, transform

    # 1. with the cache: feature extraction + one epoch, end to end, at each batch size (captions per step)
    results["cache"] = {}
    results["cache_runs"] = []
    for bs in args.cache_batch_sizes:
        for run, mode in enumerate(args.compile_runs):
            model = fresh()[0]
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            tcfg = TrainConfig(num_epochs=1, batch_size=bs, eval_images=args.val_images, feature_cache="memory",
                               num_workers=args.workers, eval_batch_size=128, compile=mode != "off",
                               compile_scope="blocks" if mode == "blocks" else "step")
            steps = []
            t0 = time.time()
            logs = []
            result = train(model, encoder, transform, train_recs, val_recs, tcfg, tmp / f"run_cache{bs}_{run}",
                           resume=False, device=device, on_step=lambda e, s: steps.append(time.time()),
                           log=lambda m: (logs.append(m), print(m, flush=True)))
            total = time.time() - t0
            train_s = steps[-1] - steps[0]
            row = {"batch": bs, "compile": mode, "run": run, "epoch_seconds_total": total, "steps": len(steps),
                   "features_setup_and_first_step_seconds": steps[0] - t0,
                   "train_loop_seconds_after_first_step": train_s, "seconds_per_step": train_s / (len(steps) - 1),
                   "first_step_and_val_seconds": result.history[-1]["seconds"] - train_s,
                   "loss": result.history[-1]["loss"],
                   "captions_per_s": 5 * len(train_recs) / total, "log": logs,
                   "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None}
            results["cache_runs"].append(row)
            results["cache"].setdefault(str(bs), row)
            print(f"cache, batch {bs}, compile {mode} (run {run + 1}): one epoch {total:.1f}s end to end (features, "
                  f"setup and first step {steps[0] - t0:.1f}s, then {len(steps) - 1} steps {train_s:.1f}s = "
                  f"{1000 * row['seconds_per_step']:.1f} ms/step, validation {args.val_images} images); loss "
                  f"{row['loss']:.5f}; peak {row['peak_gib']} GiB", flush=True)
            del model
    if args.skip_probes:
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
        return
    total = results["cache"][str(args.batch_size)]["epoch_seconds_total"] if str(args.batch_size) in \
        results["cache"] else next(iter(results["cache"].values()))["epoch_seconds_total"]

    # 2. no cache: the encoder inside every step (probe, scaled to the epoch)
    def probe(label: str, records: list[Record]) -> dict:
        model, encoder, transform = fresh()
        times = []

        def on_step(e, s):
            times.append(time.time())
            if len(times) > args.probe_steps:
                raise _Stop

        tc = TrainConfig(num_epochs=1, batch_size=args.batch_size, eval_images=8, feature_cache="off",
                         num_workers=args.workers)
        try:
            train(model, encoder, transform, records, val_recs, tc, tmp / f"run_{label}", resume=False,
                  device=device, on_step=on_step)
        except _Stop:
            pass
        per_step = (times[-1] - times[0]) / (len(times) - 1)
        n_steps = -(-sum(len(r.references) for r in records) // args.batch_size)
        out = {"seconds_per_step": per_step, "steps_per_epoch": n_steps, "epoch_seconds_scaled": per_step * n_steps,
               "probe_steps": len(times) - 1}
        print(f"{label}: {per_step:.3f}s per step over {len(times) - 1} steps -> {per_step * n_steps:.0f}s per "
              f"epoch ({n_steps} steps; scaled)", flush=True)
        return out

    results["no_cache"] = probe("no_cache", train_recs)
    # 3. per caption: one record per (image, caption), as HW3 solutions iterate
    per_caption = [Record(r.image_path, f"{r.file_id}_{j}", (c,)) for r in train_recs for j, c in
                   enumerate(r.references)]
    results["per_caption"] = probe("per_caption", per_caption)
    results["speedup_cache_vs_no_cache"] = results["no_cache"]["epoch_seconds_scaled"] / total
    results["speedup_cache_vs_per_caption"] = results["per_caption"]["epoch_seconds_scaled"] / total
    print(f"cache vs no cache: {results['speedup_cache_vs_no_cache']:.1f}x; vs per caption: "
          f"{results['speedup_cache_vs_per_caption']:.1f}x", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
