"""The rehearsal of the real assignment: the hw3 profile exactly as ``configs/hw3.yaml`` states it, with random
weights at the real architectures stored in a Hugging Face cache under the real repo ids, and COCO-like data in the
real layout. It proves the student's path on a GPU machine before anyone downloads 20 GB (``hw3 rehearse``).

* :mod:`.hub_cache`: files into the hub cache's documented layout (also used by the tests).
* :mod:`.coco`: a COCO-like ``hw3_data/`` with COCO's quirks.
* :mod:`.weights`: random weights at the real architectures (LLaVA-1.5-7B, the timm encoder, CLIP ViT-B/32, the
  course's GPT-2 decoder).

``prepare`` writes both into one folder and returns the command that runs the hw3 profile against them.
"""
from __future__ import annotations

import time
from pathlib import Path

import yaml

from .coco import CocoLikeSizes, write_hw3_data


def prepare(out: str | Path, config: str | Path = "configs/hw3.yaml", sizes: CocoLikeSizes = CocoLikeSizes(),
            parts: tuple[str, ...] = ("data", "encoder", "clip", "llava"), device: str | None = None,
            llava_from: str | Path | None = None, log=print) -> dict:
    """Write ``out/hw3_data`` (data, and the decoder at the course's size) and ``out/hf_home`` (the models that
    ``config`` names, random, under their real ids). ``llava_from``: store this saved LLaVA (the demo stand-in) under
    the LLaVA id instead of the random 7B, for a dry run of the path on a CPU. Returns the paths and the seconds
    each part took."""
    import torch

    from . import weights

    out = Path(out)
    params = yaml.safe_load(Path(config).read_text())["parameters"]
    data_root, hf_home = out / "hw3_data", out / "hf_home"
    cache = hf_home / "hub"
    cache.mkdir(parents=True, exist_ok=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    seconds = {}
    if "data" in parts:
        t0 = time.time()
        log(f"[rehearse] COCO-like data -> {data_root}")
        write_hw3_data(data_root, sizes, log=log)
        weights.save_course_decoder(data_root / "p2_data", log=log)
        seconds["data"] = round(time.time() - t0, 1)
    for part, save in (("encoder", lambda: weights.save_timm(params["encoder"], cache, log=log)),
                       ("clip", lambda: weights.save_open_clip(params["clip_model"], params["clip_pretrained"],
                                                               cache, log=log)),
                       ("llava", lambda: _save_llava(params["llava_model"], cache, device, llava_from, log))):
        if part in parts:
            t0 = time.time()
            save()
            seconds[part] = round(time.time() - t0, 1)
    log(f"[rehearse] random weights at the real architectures are in {cache}")
    command = (f"HF_HOME={hf_home} HF_HUB_OFFLINE=1 ./run_all.sh -f {config} -p data_root {data_root}")
    log(f"[rehearse] done {seconds}; now run:\n  {command}")
    return {"data_root": str(data_root), "hf_home": str(hf_home), "seconds": seconds, "command": command}


def _save_llava(repo_id: str, cache: Path, device: str, llava_from: str | Path | None, log) -> None:
    from . import weights
    from .hub_cache import write_folder

    if llava_from:
        write_folder(repo_id, llava_from, cache)
        log(f"  LLaVA: {llava_from} as {repo_id}")
    else:
        weights.save_llava(repo_id, cache, device=device, log=log)
