"""Where batched greedy captioning's time goes, with and without Liger's Triton kernels and CUDA-graphed steps
(llava-1.5-7b architecture, random bf16 weights, COCO-size JPEGs, 20 new tokens, static KV cache).

    python bench/profile_greedy.py [--batch 128] [--images 512] [--workers 8] [--json OUT.json] [--profile OUT.txt]

For each kernel set ("eager": transformers' modules; "liger": ``hw3lib.llava.use_fast_kernels``) and KV cache
("static"; "static+graphs": the one-token steps replayed from a CUDA graph) it times, on one preprocessed batch: the
prefill alone (a forward pass with ``logits_to_keep=1``), ``generate`` with 1 and with 20 new tokens (their
difference is the decoding), then ``caption_records`` end to end over ``--images`` JPEGs with DataLoader workers,
and counts the captions equal to the first cache's. ``--profile`` writes torch.profiler's table of one 20-token
``generate`` per kernel set.

The small cards' settings: ``--model`` loads saved weights instead (a folder, or a hub id from the Hugging Face
cache, e.g. the rehearsal's random llava-1.5-7b: ``HF_HOME=REH/hf_home``), ``--load-in-4bit`` quantises its language
model with bitsandbytes as ``configs/hw3-12gb.yaml`` does, and ``HW3_GPU_CAP_GIB=10.5`` caps PyTorch's allocator as
on a 12 GB card (:func:`hw3lib.distributed.apply_gpu_cap`). For example, where the 12 GB setting's time goes:

    HF_HOME=REH/hf_home HF_HUB_OFFLINE=1 HW3_GPU_CAP_GIB=10.5 python bench/profile_greedy.py \
        --model llava-hf/llava-1.5-7b-hf --load-in-4bit --kernels eager --caches dynamic --batch 8 --images 128 \
        --profile OUT.txt --json OUT.json
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import hw3lib.llava as llava  # noqa: E402
from hw3lib.data import list_images, load_image  # noqa: E402
from hw3lib.distributed import apply_gpu_cap  # noqa: E402
from hw3lib.rehearsal import answers  # noqa: E402
from hw3lib.rehearsal.weights import random_llava  # noqa: E402
from llava_throughput import make_images  # noqa: E402


def timed(fn, repeats: int = 3) -> float:
    """The median wall time of ``fn`` (synchronised), after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--kernels", nargs="+", default=["eager", "liger"])
    ap.add_argument("--caches", nargs="+", default=["static", "static+graphs"],
                    help="static+graphs: greedy steps replayed from a CUDA graph (hw3lib.llava.decoding)")
    ap.add_argument("--json", default="")
    ap.add_argument("--profile", default="")
    ap.add_argument("--model", default="", help="saved weights (folder or cached hub id); default: random weights")
    ap.add_argument("--load-in-4bit", action="store_true", help="with --model: bitsandbytes 4-bit language model")
    args = ap.parse_args()
    cap = apply_gpu_cap()  # HW3_GPU_CAP_GIB: a smaller card
    name = torch.cuda.get_device_name()
    print(f"device: {name}; torch {torch.__version__}; cap {cap} GiB", flush=True)
    tmp = Path(tempfile.mkdtemp())
    make_images(tmp, args.images)
    records = list_images(tmp)
    if args.model:
        model, processor = llava.load_llava(args.model, "cuda", load_in_4bit=args.load_in_4bit)
        if hasattr(model.config, answers.MARKER):  # the rehearsal's LLaVA would end its answers after 8-20 tokens:
            delattr(model.config, answers.MARKER)  # here every caption has its 20 tokens, as the timings assume
    else:
        model, processor = random_llava(ROOT / "data/demo/models/llava", device="cuda")
    prompt = llava.build_prompt(processor, llava.DEFAULT_INSTRUCTION)
    enc = processor(images=[load_image(r.image_path) for r in records[: args.batch]],
                    text=[prompt] * args.batch, padding=True, return_tensors="pt")
    enc = {k: v.cuda() for k, v in enc.items()}
    enc["pixel_values"] = enc["pixel_values"].to(model.dtype)
    pad = processor.tokenizer.pad_token_id
    out = {"device": name, "torch": torch.__version__, "batch": args.batch, "images": args.images,
           "prompt_tokens": enc["input_ids"].shape[1], "model": args.model or "random",
           "load_in_4bit": args.load_in_4bit, "gpu_cap_gib": cap, "runs": []}
    report = []
    captions: dict = {}
    for kernels in args.kernels:
        if kernels == "liger" and not llava.use_fast_kernels(model):
            print("liger: not available here", flush=True)
            continue
        for cache in args.caches:
            row = {"kernels": kernels, "cache": cache}
            with torch.inference_mode():
                row["prefill_s"] = timed(lambda: model(**enc, logits_to_keep=1))
                for n in (1, 20):
                    g = llava.LlavaGeneration(max_new_tokens=n, min_new_tokens=n, cache=cache)
                    row[f"generate_{n}_s"] = timed(lambda: llava.generate(model, enc, g, pad))
            row["decode_19_steps_s"] = row["generate_20_s"] - row["generate_1_s"]
            g = llava.LlavaGeneration(max_new_tokens=20, min_new_tokens=20, cache=cache)
            llava.caption_records(model, processor, records[:8], generation=g, batch_size=8, progress=False)
            torch.cuda.synchronize()
            t = time.perf_counter()
            caps = llava.caption_records(model, processor, records, generation=g, batch_size=args.batch,
                                         num_workers=args.workers, progress=False)
            torch.cuda.synchronize()
            row["end_to_end_s"] = time.perf_counter() - t
            row["images_per_s"] = len(records) / row["end_to_end_s"]
            row["gpu_bound_images_per_s"] = args.batch / row["generate_20_s"]
            first = captions.setdefault(kernels, caps)  # bf16 near-ties flip some tokens between kernel paths
            row["captions_equal_to_first_cache"] = sum(caps[k] == first[k] for k in caps)
            out["runs"].append(row)
            print(json.dumps(row), flush=True)
            if args.profile:
                from torch.profiler import ProfilerActivity, profile

                with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    llava.generate(model, enc, g, pad)
                    torch.cuda.synchronize()
                report.append(f"== {kernels}, {cache}: one generate, batch {args.batch}, 20 new tokens\n" +
                              prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=22,
                                                        max_name_column_width=70))
    if args.profile:
        Path(args.profile).write_text("\n\n".join(report))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
