"""A quantised LLaVA's captions against bf16's: how often they agree, how fast each is and what it holds on the GPU.

    python bench/quant_agreement.py --model MODEL --images DIR [--num-images 128] [--modes bf16 8bit 4bit]
        [--batch 8] [--max-new-tokens 20] [--cache static+graphs] [--json OUT.json]

MODEL is loaded once per mode, one after the other in this process: ``bf16`` (fp32 on a CPU), ``8bit``
(bitsandbytes' LLM.int8) and ``4bit`` (bitsandbytes' NF4, as ``configs/hw3-12gb.yaml`` loads it). Each mode captions
the same images greedily through the workbook's path (``caption_records``), and its captions, tokenised by the
model's tokenizer, are compared with the first mode's by :func:`hw3lib.metrics.token_agreement`: the share of
equal captions, the mean share of tokens before the first difference, and where that difference comes.

Two models answer different questions:
- the demo's LLaVA (``data/demo/models/llava``, trained on the shapes world, with its p1 images): its captions mean
  something, so their agreement says what the quantisation changes;
- the rehearsal's llava-1.5-7b (``HF_HOME=REH/hf_home``, ``--model llava-hf/llava-1.5-7b-hf``, with
  ``REH/hw3_data/p1_data/images/val``): the real sizes, for speed and memory. Its weights are random, its logits
  nearly flat, so any rounding flips tokens: its agreement is a floor, not what a trained model would show.
  Its answers run to ``--max-new-tokens`` (the rehearsal's early end is switched off, as in profile_greedy.py).

``HW3_GPU_CAP_GIB=10.5`` caps PyTorch's allocator as on a 12 GB card.
"""
import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hw3lib.llava as llava  # noqa: E402
import hw3lib.llava.decoding as decoding  # noqa: E402
from hw3lib.data import list_images  # noqa: E402
from hw3lib.distributed import apply_gpu_cap  # noqa: E402
from hw3lib.metrics import token_agreement  # noqa: E402
from hw3lib.rehearsal import answers  # noqa: E402

MODES = {"bf16": {}, "8bit": {"load_in_8bit": True}, "4bit": {"load_in_4bit": True}}


def caption(mode: str, args, records) -> tuple[dict, dict[str, list[int]]]:
    """One mode's row (load and caption seconds, images/s, peak memory) and its captions as token ids."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    model, processor = llava.load_llava(args.model, **MODES[mode])
    if hasattr(model.config, answers.MARKER):  # the rehearsal's LLaVA: every answer gets its --max-new-tokens
        delattr(model.config, answers.MARKER)
    row = {"mode": mode, "load_s": round(time.perf_counter() - t, 2)}
    decoding._capture_failed = False  # an earlier mode's failed capture (LLM.int8's outliers?) is not this one's
    gen = llava.LlavaGeneration(max_new_tokens=args.max_new_tokens, cache=args.cache)
    llava.caption_records(model, processor, records[: args.batch], generation=gen, batch_size=args.batch,
                          progress=False)  # warm-up: CUDA's start (the timed call captures its graph
    # again, once, as each of notebook 01's settings does)
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    caps = llava.caption_records(model, processor, records, generation=gen, batch_size=args.batch,
                                 num_workers=args.workers, progress=False)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    row["caption_s"], row["images_per_s"] = round(seconds, 2), round(len(records) / seconds, 2)
    row["graphs"] = (cuda and "graphs" in args.cache and decoding.graphs_supported(model, gen)
                     and not decoding._capture_failed)  # the steps from a CUDA graph, or one by one
    if cuda:
        row["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    tok = processor.tokenizer
    ids = {k: tok(c, add_special_tokens=False)["input_ids"] for k, c in caps.items()}
    row["examples"] = [caps[r.file_id] for r in records[:3]]
    del model, processor
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row, ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "data/demo/models/llava"))
    ap.add_argument("--images", default=str(ROOT / "data/demo/hw3_data/p1_data/images/val"))
    ap.add_argument("--num-images", type=int, default=128)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--cache", default="static+graphs", help="the greedy path: static+graphs, static or '' (dynamic)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    cap = apply_gpu_cap()  # HW3_GPU_CAP_GIB: a smaller card
    records = list_images(args.images)[: args.num_images]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    model = Path(args.model).resolve()
    shown = str(model.relative_to(ROOT)) if model.is_relative_to(ROOT) else args.model  # no machine's path in the JSON
    out = {"device": device, "torch": torch.__version__, "model": shown, "images": len(records),
           "batch": args.batch, "max_new_tokens": args.max_new_tokens, "cache": args.cache, "gpu_cap_gib": cap,
           "against": args.modes[0], "runs": []}
    print(f"device: {device}; torch {torch.__version__}; cap {cap} GiB; {len(records)} images", flush=True)
    first = None
    for mode in args.modes:
        row, ids = caption(mode, args, records)
        first = first or ids
        row.update(token_agreement(first, ids))
        out["runs"].append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
