"""The captioning of a P1 sweep on several GPUs: one process per GPU under ``torchrun``, started by
:func:`hw3lib.llava.sweep` (``gpus > 1``), which scores the captions afterwards in its own process.

    python -m torch.distributed.run --standalone --nproc-per-node N -m hw3lib.sweep_worker SPEC.json

``SPEC.json``: ``model``, ``load_in_4bit``, ``fast_kernels``, ``images`` (paths, in order), ``batch_size``,
``num_workers``, ``first_sentence``, ``settings`` (a list of ``{"instruction", "generation", "predictions"}``) and
``results`` (where the main process writes each setting's seconds and counts). Each process loads the model once on
its own GPU; every setting is one :func:`~hw3lib.llava.caption_folder` call, sharded by batches, resumable.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def main(spec_path: str) -> int:
    from .data import Record, write_json_atomic
    from .distributed import setup
    from .llava import LlavaGeneration, caption_folder, load_llava

    spec = json.loads(Path(spec_path).read_text())
    d = setup()
    records = [Record(Path(p), Path(p).stem, ()) for p in spec["images"]]
    model, processor = load_llava(spec["model"], device=d.device(None), load_in_4bit=spec["load_in_4bit"],
                                  fast_kernels=spec.get("fast_kernels", False))
    results = []
    for s in spec["settings"]:
        run = caption_folder(model, processor, records, s["predictions"], s["instruction"],
                             LlavaGeneration(**s["generation"]), spec["batch_size"], spec["num_workers"],
                             spec["first_sentence"], progress=d.main, model_name=spec["model"])
        results.append({"predictions": s["predictions"], "seconds": run.seconds, "computed": run.computed,
                        "reused": run.reused, "processes": d.world_size})
        if d.main:
            write_json_atomic(spec["results"], results)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
