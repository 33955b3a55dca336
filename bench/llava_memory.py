"""Where notebook 01's GPU memory goes, setting by setting: its sweep's captioning (every instruction x generation
config of a config, in the notebook's order) on the first ``--images`` p1 images, then the first setting on the next
``--then`` images (as ``best_on_all`` does), with PyTorch's memory read after every batch.

    HF_HOME=REH/hf_home HF_HUB_OFFLINE=1 HW3_GPU_CAP_GIB=22 python bench/llava_memory.py -f configs/hw3-24gb.yaml \
        --data REH/hw3_data --images 100 --then 100 --json OUT.json

Each batch's row: the setting, the batch's images, PyTorch's allocated and reserved GiB after it, the peak allocated
during it, and the allocator's cached-but-unusable bytes (``inactive_split``: fragmentation). After each setting the
segments are summed by memory pool: the default pool, and each CUDA graph's private pool, with what is in use in
each (with ``--empty-cache``, also after ``gc.collect(); torch.cuda.empty_cache()``: what stays then is held).
On an out-of-memory error the same summary is written, with the error's line. ``--cache`` replaces the config's
``llava_cache`` (e.g. ``static`` or ``""``) to compare the paths under one cap. The warnings (a failed CUDA-graph
capture says so in one) are kept too.
"""
import argparse
import gc
import json
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hw3lib.data import hw3_split  # noqa: E402
from hw3lib.distributed import apply_gpu_cap  # noqa: E402
from hw3lib.llava import LlavaGeneration, LlavaLoad, caption_records, setting_batch_size  # noqa: E402
from hw3lib.workbook import WorkbookConfig  # noqa: E402

GIB = 2**30


def pools() -> list[dict]:
    """The allocator's segments summed by memory pool: (0, 0) is the default pool, any other a CUDA graph's."""
    if not torch.cuda.is_available():
        return []
    by = defaultdict(lambda: {"segments": 0, "reserved_gib": 0.0, "active_gib": 0.0})
    for seg in torch.cuda.memory._snapshot()["segments"]:
        p = by[str(tuple(seg.get("segment_pool_id", (0, 0))))]
        p["segments"] += 1
        p["reserved_gib"] += seg["total_size"] / GIB
        p["active_gib"] += seg["active_size"] / GIB
    return [{"pool": k, **{n: round(v, 3) if isinstance(v, float) else v for n, v in p.items()}}
            for k, p in sorted(by.items(), key=lambda kv: -kv[1]["reserved_gib"])]


def memory() -> dict:
    if not torch.cuda.is_available():
        return {}
    s = torch.cuda.memory_stats()
    return {"allocated_gib": round(torch.cuda.memory_allocated() / GIB, 3),
            "reserved_gib": round(torch.cuda.memory_reserved() / GIB, 3),
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 3),
            "inactive_split_gib": round(s.get("inactive_split_bytes.all.current", 0) / GIB, 3),
            "alloc_retries": s.get("num_alloc_retries", 0), "ooms": s.get("num_ooms", 0)}


def notebook_parameters(config: str) -> dict:
    """Notebook 01's parameters as ``hw3 run -f config`` gives them: its defaults, then the config's values."""
    import ast

    import papermill

    declared = papermill.inspect_notebook(str(ROOT / "notebooks/01_llava_prompts.ipynb"))
    values = {name: ast.literal_eval(info["default"]) for name, info in declared.items()}
    return {**values, **{k: v for k, v in WorkbookConfig.load(config).parameters.items() if k in values}}


def run_plan(plan, model, processor, instructions, generations, batch, workers, out, empty_cache: bool,
             greedy_batch: int = 0) -> None:
    """Caption each (instruction, generation, records) of ``plan`` in turn, reading the memory into ``out``."""
    try:
        for n, (iname, gname, recs) in enumerate(plan):
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            t0, k = time.time(), [0]

            def on_batch(captions, name=f"{iname} / {gname}" + (" (then)" if n == len(plan) - 1 else "")):
                k[0] += 1
                out["batches"].append({"setting": name, "batch": k[0], "images": len(captions), **memory()})

            size = setting_batch_size(generations[gname], batch, greedy_batch)  # as the notebook's sweep batches
            caption_records(model, processor, recs, instructions[iname], generations[gname], size, workers,
                            progress=False, on_batch=on_batch)
            row = {"setting": f"{iname} / {gname}", "images": len(recs), "seconds": round(time.time() - t0, 1),
                   **memory(), "pools": pools()}
            graph_pools = [p for p in row["pools"] if p["pool"] != "(0, 0)"]
            row["graph_pools"] = {"count": len(graph_pools),
                                  "reserved_gib": round(sum(p["reserved_gib"] for p in graph_pools), 3),
                                  "active_gib": round(sum(p["active_gib"] for p in graph_pools), 3)}
            if empty_cache and torch.cuda.is_available():  # what the allocator can give back: cache, dead graphs' pools
                gc.collect()
                torch.cuda.empty_cache()
                row["after_empty_cache"] = {**memory(), "pools": pools()}
            out["settings"].append(row)
            print(f"[memory] {json.dumps({k: v for k, v in row.items() if k != 'pools'})}; pools "
                  f"{row['pools'][:4]}", flush=True)
    except torch.OutOfMemoryError as e:
        out["oom"] = {"error": str(e).splitlines()[0], **memory(), "pools": pools()}
        print(f"[memory] out of memory: {json.dumps(out['oom'])}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-f", "--config", default="configs/hw3-24gb.yaml")
    ap.add_argument("--data", required=True, help="the hw3_data folder (hw3 rehearse writes one)")
    ap.add_argument("--images", type=int, default=100, help="images each setting captions (the sweep)")
    ap.add_argument("--then", type=int, default=100, help="then the first setting on this many further images")
    ap.add_argument("--cache", default=None, help="replaces the config's llava_cache")
    ap.add_argument("--empty-cache", action="store_true", help="gc.collect() and empty the allocator's cache after "
                    "each setting (the notebook does not), and read the memory again")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    cap = apply_gpu_cap()
    P = notebook_parameters(args.config)
    cache = P["llava_cache"] if args.cache is None else args.cache
    generations = {name: LlavaGeneration.from_dict({"cache": cache, **g} if cache else g)
                   for name, g in P["llava_generations"].items()}  # as notebook 01 builds them
    instructions = P["llava_instructions"]
    load = LlavaLoad(P["llava_model"], load_in_4bit=P["llava_load_in_4bit"], fast_kernels=P["llava_fast_kernels"])
    batch, workers = P["llava_batch_size"], P["llava_num_workers"]
    greedy_batch = P.get("llava_greedy_batch_size", 0)
    records = hw3_split(Path(args.data), "p1_data")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    out = {"device": device, "torch": torch.__version__, "config": args.config, "cap_gib": cap,
           "cache": cache, "batch": batch, "greedy_batch": greedy_batch,
           "images": args.images, "then": args.then, "batches": [], "settings": []}
    model, processor = load.load()
    out["after_load"] = memory()
    print(f"[memory] {out['device']}, cap {cap} GiB, cache {cache!r}, batch {batch}; loaded: {out['after_load']}",
          flush=True)
    plan = [(i, g, records[: args.images]) for i in instructions for g in generations]
    plan.append((next(iter(instructions)), next(iter(generations)),
                 records[args.images: args.images + args.then]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_plan(plan, model, processor, instructions, generations, batch, workers, out, args.empty_cache,
                 greedy_batch)
    out["warnings"] = sorted({str(w.message)[:300] for w in caught})
    print(f"[memory] warnings: {out['warnings']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 1 if "oom" in out else 0


if __name__ == "__main__":
    from hw3lib.data import DataError
    from hw3lib.workbook import ConfigError

    try:
        sys.exit(main())
    except (ConfigError, DataError, OSError) as e:  # a wrong config, data folder or model: one line
        sys.exit(f"llava_memory: {e}")
