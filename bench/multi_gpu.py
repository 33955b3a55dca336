"""The same commands on one GPU and on several, through torchrun (accelerate launch sets the same variables).

    python bench/multi_gpu.py [--gpus 2] [--images 2000] [--train-images 2000] [--json OUT.json]

* **LLaVA captioning**: ``hw3 llava-caption`` over COCO-size JPEGs (640 x 480, written on the spot) with the
  llava-1.5-7b architecture in random bf16 weights (``--random-weights``: weights do not change speed), greedy,
  exactly 20 new tokens per image, batch 128, static cache; once on GPU 0 alone, once under
  ``torchrun --nproc-per-node N``. The rate is the command's own (images / seconds inside ``caption_folder``,
  model loading excluded); the wall time of each command is recorded too. The two JSON files must be equal.
* **Captioner training**: ``hw3 train`` on a fake p2_data (the course's layout, 5 captions an image) with a random
  course-size GPT-2 and a random timm encoder, LoRA r = 32 on every linear layer, 64 captions a step; once on one
  GPU, once under torchrun. Per-epoch losses and seconds come from the runs' ``last.pt`` histories.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from llava_throughput import make_images  # noqa: E402
from train_throughput import make_data  # noqa: E402


def run(cmd: list[str], gpus: str, log: Path) -> tuple[float, str]:
    t0 = time.time()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpus, "OMP_NUM_THREADS": "4"}
    with open(log, "w") as f:
        p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=f, text=True)
    if p.returncode:
        print(log.read_text()[-4000:])
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return time.time() - t0, p.stdout


def launch(n: int, launcher: str = "torchrun") -> list[str]:
    target = ["-m", "hw3lib"]
    if n == 1:
        return [sys.executable, *target]
    if launcher == "accelerate":
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={n}",
                "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", *target]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *target]


def llava_part(tmp: Path, n_images: int, gpus: int, batch: int, cache: str = "static",
               runs: tuple[str, ...] = ("1", "N", "N-accelerate"), deterministic: bool = False) -> dict:
    """``runs``: "1" (GPU 0 alone), "N" (torchrun over ``gpus``), "N-accelerate"; a run named twice runs twice
    (run-to-run agreement). Every JSON is compared with the first run's."""
    images = tmp / "images"
    images.mkdir(exist_ok=True)
    t0 = time.time()
    make_images(images, n_images)
    print(f"{n_images} JPEGs in {time.time() - t0:.1f}s", flush=True)
    out = {"cache": cache}
    first = None
    for i, spec in enumerate(runs):
        n = 1 if spec == "1" else gpus
        launcher = "accelerate" if spec.endswith("accelerate") else "torchrun"
        key = f"run{i + 1}_{n}gpu" + ("_accelerate" if n > 1 and launcher == "accelerate" else "")
        pred = tmp / f"llava_{key}.json"
        cmd = launch(n, launcher) + ["llava-caption", str(images), str(pred), "--random-weights", "--processor",
                                     str(ROOT / "data/demo/models/llava"), "--batch-size", str(batch),
                                     "--num-workers", "8", "--max-new-tokens", "20", "--min-new-tokens", "20",
                                     "--cache", cache] + (["--deterministic"] if deterministic else [])
        try:
            wall, stdout = run(cmd, ",".join(map(str, range(n))), tmp / f"llava_{key}.log")
        except SystemExit as e:
            out[key] = {"error": str(e)}
            continue
        m = re.search(r"(\d+) new in ([\d.]+)s", stdout)
        seconds = float(m.group(2))
        out[key] = {"gpus": n, "images": int(m.group(1)), "seconds": seconds,
                    "images_per_s": int(m.group(1)) / seconds, "command_wall_s": round(wall, 1)}
        if first is None:
            first = pred
        else:
            a, b = json.loads(first.read_text()), json.loads(pred.read_text())
            out[key]["json_equal_to_run1"] = pred.read_bytes() == first.read_bytes()
            out[key]["captions_equal_to_run1"] = sum(a[k] == b.get(k) for k in a)
        print(f"llava {key}: {out[key]}", flush=True)
    return out


def train_part(tmp: Path, n_train: int, gpus: int, encoder: str, epochs: int) -> dict:
    from hw3lib.decoder import Decoder, DecoderConfig, save_checkpoint

    root = tmp / "hw3_data"
    p2 = make_data(root, n_train, 64)
    torch.manual_seed(0)
    save_checkpoint(Decoder(DecoderConfig()), p2 / "decoder_model.bin")
    src = json.loads((ROOT / "data/demo/models/decoder/encoder.json").read_text())
    eot = src.pop("<|endoftext|>")
    src.update({f"<|unused{i}|>": i for i in range(eot, 50256)})
    src["<|endoftext|>"] = 50256
    (p2 / "encoder.json").write_text(json.dumps(src))
    (p2 / "vocab.bpe").write_bytes((ROOT / "data/demo/models/decoder/vocab.bpe").read_bytes())
    out = {"encoder": encoder, "images": n_train, "epochs": epochs}
    for n in (1, gpus):
        run_dir = tmp / f"train_{n}gpu"
        cmd = launch(n) + ["train", "--data-root", str(root), "--out", str(run_dir), "--encoder", encoder,
                           "--random-weights", "--epochs", str(epochs), "--batch-size", "64", "--lora-r", "32",
                           "--lora-alpha", "64", "--lora-targets", "c_attn", "attn.c_proj", "c_fc", "mlp.c_proj",
                           "--lora-dropout", "0", "--eval-images", "32", "--max-new-tokens", "10",
                           "--num-workers", "8", "--seed", "0"]
        wall, _ = run(cmd, ",".join(map(str, range(n))), tmp / f"train_{n}.log")
        history = torch.load(run_dir / "last.pt", weights_only=False)["history"]
        out[f"{n}gpu"] = {"command_wall_s": round(wall, 1), "history": history}
        print(f"train {n} GPU: wall {wall:.1f}s, {[(h['loss'], h['seconds']) for h in history]}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--train-images", type=int, default=2000, help="0: skip the training part")
    ap.add_argument("--encoder", default="vit_large_patch14_clip_224")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--cache", default="static", choices=["dynamic", "static"])
    ap.add_argument("--llava-runs", nargs="+", default=["1", "N", "N-accelerate"],
                    help='"1": one GPU; "N": torchrun over --gpus; "N-accelerate": accelerate launch')
    ap.add_argument("--deterministic", action="store_true", help="hw3 llava-caption --deterministic in every run")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="multi_gpu_"))
    results = {"device": torch.cuda.get_device_name(0), "gpus": args.gpus, "torch": torch.__version__,
               "deterministic": args.deterministic}
    if args.images:
        results["llava"] = llava_part(tmp, args.images, args.gpus, args.batch_size, args.cache,
                                      tuple(args.llava_runs), args.deterministic)
        print(json.dumps(results["llava"]), flush=True)
    if args.train_images:
        results["train"] = train_part(tmp, args.train_images, args.gpus, args.encoder, args.epochs)
    print(json.dumps({k: v for k, v in results.items()}, indent=1, default=str)[:3000])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
