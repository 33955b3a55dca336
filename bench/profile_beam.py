"""Where beam search's time goes: torch.profiler over one batch of ``hw3lib.llava.caption_records`` with 3 beams
(llava-1.5-7b architecture, random bf16 weights, COCO-size JPEGs, 20 new tokens), after a warm-up batch.

    python bench/profile_beam.py [--batch 32] [--path prompt-once|shared|per-beam]
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import hw3lib.llava as llava  # noqa: E402
import hw3lib.llava.captioning as captioning  # noqa: E402
from hw3lib.data import list_images  # noqa: E402
from hw3lib.rehearsal.weights import random_llava  # noqa: E402
from llava_throughput import make_images  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--path", default="prompt-once", choices=["prompt-once", "shared", "per-beam"])
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    make_images(tmp, 2 * args.batch)
    recs = list_images(tmp)
    model, processor = random_llava(ROOT / "data/demo/models/llava", device="cuda")
    if args.path == "shared":
        workbook = captioning.generate  # what caption_records calls
        captioning.generate = lambda m, enc, g, pad: workbook(m, enc, g, pad, prompt_once=False)
    if args.path == "per-beam":
        captioning.generate = lambda m, enc, g, pad: m.generate(**enc, **g.generate_kwargs(), pad_token_id=pad)
    gen = llava.LlavaGeneration(num_beams=3, max_new_tokens=20, min_new_tokens=20)
    llava.caption_records(model, processor, recs[: args.batch], generation=gen, batch_size=args.batch, progress=False)
    torch.cuda.synchronize()
    spent = {"generate": 0.0}
    plain_generate = model.generate

    def timed_generate(*a, **kw):  # the wall time inside model.generate (decoding), apart from the prefill
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = plain_generate(*a, **kw)
        torch.cuda.synchronize()
        spent["generate"] += time.perf_counter() - t
        return out

    model.generate = timed_generate
    for what, g in (("beam 3", gen), ("greedy, static cache", llava.LlavaGeneration(
            max_new_tokens=20, min_new_tokens=20, cache="static"))):
        spent["generate"] = 0.0
        t0 = time.perf_counter()
        llava.caption_records(model, processor, recs[args.batch:], generation=g, batch_size=args.batch,
                              progress=False)
        torch.cuda.synchronize()
        total = time.perf_counter() - t0
        print(f"{what}, batch {args.batch}: {total:.2f} s, of which {spent['generate']:.2f} s in model.generate "
              f"({args.batch / total:.1f} images/s)", flush=True)
    model.generate = plain_generate
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        llava.caption_records(model, processor, recs[args.batch :], generation=gen, batch_size=args.batch,
                              progress=False)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    print(f"{args.path}: one batch of {args.batch} images, 3 beams: {wall:.2f} s wall (under the profiler)")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
