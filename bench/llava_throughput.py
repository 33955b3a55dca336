"""LLaVA-1.5-7B captioning throughput on one GPU: the naive loop vs. the workbook's batched path.

    python bench/llava_throughput.py [--images 500] [--batch-sizes 32 64 128] [--beam-batches 32] [--json OUT.json]

Weights do not change speed, so the model is the llava-1.5-7b architecture with random weights (bf16, sdpa),
driven by the demo stand-in's processor rebuilt at 336 px. Every caption has exactly 20 new tokens
(min_new_tokens = max_new_tokens = 20). The images are COCO-size JPEGs (640 x 480) written on the spot; JPEG
decoding and preprocessing are inside the timings (DataLoader workers on the batched path).

Prints images/s of (a) one ``generate`` per image, as HW3 solutions do, (b) the batched path with greedy
decoding at each batch size, (c) beam search 3 with one prefill per image and its keys and values kept once per
image (the workbook's), with one prefill per image whose cache is repeated for the beams, and with transformers'
one prefill per beam, plus a roofline estimate from the model's config and the card.
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

from hw3lib.data import list_images, load_image  # noqa: E402
from hw3lib.llava import (DEFAULT_INSTRUCTION, LlavaGeneration, build_prompt, caption_records,  # noqa: E402
                          use_fast_kernels)
from hw3lib.rehearsal.weights import random_llava  # noqa: E402

PEAKS = {  # dense bf16 TFLOP/s, HBM TB/s (SXM parts)
    "H100": (989.0, 3.35),
    "H200": (989.0, 4.8),
}


def make_images(folder: Path, n: int, seed: int = 0) -> None:
    """``n`` 640 x 480 JPEGs: smooth random colour fields (photo-like file sizes), quality 90."""
    def one(i: int) -> None:
        rng = np.random.default_rng(seed + i)
        small = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((640, 480), Image.BICUBIC)
        noise = rng.normal(0, 12, size=(480, 640, 3))
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8))
        img.save(folder / f"{i:012d}.jpg", quality=90)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(n)))


def roofline(model, prompt_tokens: int, new_tokens: int, batch: int, card: str) -> dict:
    """Prefill FLOPs per image and bytes per decode step -> the best images/s the card allows."""
    tc, vc = model.config.text_config, model.config.vision_config
    lm_params = sum(p.numel() for p in model.model.language_model.parameters()) + model.lm_head.weight.numel()
    vt_params = sum(p.numel() for p in model.model.vision_tower.parameters())
    n_vis = (vc.image_size // vc.patch_size) ** 2 + 1
    attn = 4 * tc.num_hidden_layers * tc.hidden_size * prompt_tokens ** 2 / 2  # causal QK^T + AV
    vis_attn = 4 * vc.num_hidden_layers * vc.hidden_size * n_vis ** 2
    prefill = 2 * lm_params * prompt_tokens + attn + 2 * vt_params * n_vis + vis_attn
    kv_per_token = 2 * tc.num_hidden_layers * tc.num_key_value_heads * (tc.hidden_size // tc.num_attention_heads) * 2
    weight_bytes = 2 * (lm_params)
    ctx = prompt_tokens + new_tokens / 2
    step_bytes = weight_bytes + batch * ctx * kv_per_token
    step_flops = 2 * lm_params * batch
    peak_tflops, peak_tbs = PEAKS.get(card, (989.0, 3.35))
    t_prefill = batch * prefill / (peak_tflops * 1e12)
    t_decode = new_tokens * max(step_bytes / (peak_tbs * 1e12), step_flops / (peak_tflops * 1e12))
    return {"prefill_tflop_per_image": prefill / 1e12, "kv_bytes_per_token": kv_per_token,
            "decode_step_gb": step_bytes / 1e9, "roofline_images_per_s": batch / (t_prefill + t_decode),
            "prefill_share": t_prefill / (t_prefill + t_decode), "peak": {"tflops": peak_tflops, "tb_s": peak_tbs}}


@torch.inference_mode()
def naive_loop(model, processor, paths: list[Path], gen: LlavaGeneration, instruction: str) -> float:
    """One image at a time: open, preprocess, generate, decode -- what HW3 solutions do."""
    prompt = build_prompt(processor, instruction)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for p in paths:
        enc = processor(images=load_image(p), text=prompt, return_tensors="pt").to(model.device)
        enc["pixel_values"] = enc["pixel_values"].to(model.dtype)
        out = model.generate(**enc, **gen.generate_kwargs(), pad_token_id=processor.tokenizer.pad_token_id)
        processor.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    torch.cuda.synchronize()
    return len(paths) / (time.perf_counter() - t0)


def batched(model, processor, records, gen, batch_size: int, workers: int, instruction: str,
            captions: dict | None = None) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = caption_records(model, processor, records, instruction, gen, batch_size=batch_size, num_workers=workers,
                          progress=False)
    torch.cuda.synchronize()
    if captions is not None:
        captions.update(out)
    return len(records) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--naive-images", type=int, default=48)
    ap.add_argument("--batch-sizes", type=int, nargs="*", default=[64, 128], help="greedy (none: skip greedy)")
    ap.add_argument("--caches", nargs="+", default=["dynamic", "static"], help="KV caches to compare")
    ap.add_argument("--beam-batches", type=int, nargs="+", default=[32])
    ap.add_argument("--beam-paths", nargs="+", default=["prompt-once", "shared", "per-beam"],
                    help="prompt-once: one prefill per image, its keys and values kept once per image "
                         "(hw3lib.llava.generate, the default); shared: one prefill per image, the cache repeated "
                         "for the beams; per-beam: transformers' generate, which runs the prompt once per beam")
    ap.add_argument("--beam-images", type=int, default=256)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--processor", default=str(ROOT / "data/demo/models/llava"))
    ap.add_argument("--image-dir", default="", help="write the JPEGs here (default: a temporary folder)")
    ap.add_argument("--liger", action="store_true", help="Liger's kernels in the language model (use_fast_kernels)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    instruction = DEFAULT_INSTRUCTION

    name = torch.cuda.get_device_name()
    card = next((k for k in PEAKS if k in name), name)
    print(f"device: {name}; torch {torch.__version__}", flush=True)
    tmp = Path(args.image_dir) if args.image_dir else Path(tempfile.mkdtemp(prefix="llava_bench_"))
    tmp.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    make_images(tmp, args.images)
    records = list_images(tmp)
    print(f"{len(records)} JPEGs 640x480 in {time.time() - t0:.1f}s", flush=True)

    t0 = time.time()
    model, processor = random_llava(args.processor, device="cuda")
    if args.liger and not use_fast_kernels(model):
        raise SystemExit("--liger: liger-kernel is not installed")
    params = sum(p.numel() for p in model.parameters())
    print(f"llava-1.5-7b architecture, random bf16 weights: {params / 1e9:.2f} B parameters "
          f"({time.time() - t0:.1f}s to build)", flush=True)
    gen = LlavaGeneration(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    enc = processor(images=load_image(records[0].image_path), text=build_prompt(processor, instruction),
                    return_tensors="pt")
    prompt_tokens = enc["input_ids"].shape[1]
    print(f"prompt: {prompt_tokens} tokens (576 image tokens)", flush=True)

    results: dict = {"device": name, "torch": torch.__version__, "images": len(records), "liger": args.liger,
                     "prompt_tokens": prompt_tokens, "new_tokens": args.new_tokens, "runs": []}
    caption_records(model, processor, records[:8], instruction, gen, batch_size=8, progress=False)  # warm-up
    naive = naive_loop(model, processor, [r.image_path for r in records[: args.naive_images]], gen, instruction) \
        if args.naive_images else float("nan")
    results["runs"].append({"path": "naive loop (1 image per generate)", "batch": 1, "images": args.naive_images,
                            "images_per_s": naive})
    print(f"naive loop: {naive:.2f} images/s ({args.naive_images} images)", flush=True)
    for cache in args.caches:
        for bs in args.batch_sizes:
            g = LlavaGeneration(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, cache=cache)
            torch.cuda.reset_peak_memory_stats()
            rate = batched(model, processor, records, g, bs, args.workers, instruction)
            peak = torch.cuda.max_memory_allocated() / 2**30
            results["runs"].append({"path": "batched greedy", "cache": cache, "batch": bs, "images": len(records),
                                    "images_per_s": rate, "peak_gib": peak, "speedup_vs_naive": rate / naive,
                                    "roofline": roofline(model, prompt_tokens, args.new_tokens, bs, card)})
            print(f"batched greedy, {cache} cache, batch {bs}: {rate:.1f} images/s ({rate / naive:.1f}x naive), "
                  f"peak {peak:.1f} GiB; roofline {results['runs'][-1]['roofline']['roofline_images_per_s']:.1f}",
                  flush=True)
    import hw3lib.llava.captioning as llava_module  # caption_records calls its module's generate

    workbook = llava_module.generate

    def shared(model, enc, generation, pad_token_id):  # one prefill, the cache repeated for the beams
        return workbook(model, enc, generation, pad_token_id, prompt_once=False)

    def per_beam(model, enc, generation, pad_token_id):  # transformers' own: the prompt once per beam
        return model.generate(**enc, **generation.generate_kwargs(), pad_token_id=pad_token_id)

    paths = {"prompt-once": workbook, "shared": shared, "per-beam": per_beam}
    beam_captions: dict[tuple, dict] = {}
    for path in args.beam_paths:
        llava_module.generate = paths[path]
        # the workbook's paths hand generate their own cache; transformers' path tries each cache
        for cache in (["dynamic"] if path != "per-beam" else args.caches):
            for bs in args.beam_batches:
                beam = LlavaGeneration(num_beams=3, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                       cache=cache)
                torch.cuda.reset_peak_memory_stats()
                caps = beam_captions.setdefault((path, cache, bs), {})
                rate = batched(model, processor, records[: args.beam_images], beam, bs, args.workers, instruction,
                               caps)
                results["runs"].append({"path": f"batched beam 3, prefill {path}", "cache": cache, "batch": bs,
                                        "images": args.beam_images, "images_per_s": rate,
                                        "peak_gib": torch.cuda.max_memory_allocated() / 2**30})
                print(f"batched beam 3, prefill {path}, {cache} cache, batch {bs}: {rate:.1f} images/s, peak "
                      f"{results['runs'][-1]['peak_gib']:.1f} GiB", flush=True)
    # bf16 with random weights: near-flat logits, so last-bit differences flip some tokens between paths (and
    # between two runs of one path); the CPU tests check equality in fp32
    keys = list(beam_captions)
    results["beam_agreement"] = [
        {"a": list(a), "b": list(b), "of": len(beam_captions[a]),
         "equal": sum(beam_captions[a][k] == beam_captions[b].get(k) for k in beam_captions[a])}
        for i, a in enumerate(keys) for b in keys[i + 1:]]
    for row in results["beam_agreement"]:
        print(f"beam captions equal, {row['a']} vs {row['b']}: {row['equal']} / {row['of']}", flush=True)
    llava_module.generate = workbook
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
