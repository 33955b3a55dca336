"""Notebook 01's sweep: caption the same images once per (instruction, generation config) and score each setting.

Three steps. **Plan**: one setting per pair, with the files it leaves (``<instruction>__<generation>.json``, the
course's predictions format, and a row file beside it); a setting whose files match is reused. **Caption** what is
left: in this process, or under ``torchrun`` over several GPUs, where this very module's :func:`main` runs in
every process (each loads the model on its GPU and takes every N-th batch of each setting). **Score** in this
process: CIDEr, CLIPScore, the mean length, and any extra score.

    python -m torch.distributed.run --standalone --nproc-per-node N -m hw3lib.llava.prompt_sweep SPEC.json
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..data import Record, write_json_atomic
from .captioning import CaptionRun, caption_folder, caption_settings, seed_partial
from .loading import LlavaLoad
from .settings import LlavaGeneration


@dataclass
class Setting:
    """One (instruction, generation config) pair of a sweep, and the files it leaves."""

    instruction_name: str
    instruction: str
    generation_name: str
    generation: LlavaGeneration
    predictions: Path  # {file id: caption}
    row_file: Path  # the scored row, with the settings that made it
    settings: dict  # what makes a finished setting reusable: model, instruction, generation, images

    def finished_row(self) -> dict | None:
        """The scored row of an earlier run with the very same settings, else None."""
        if self.row_file.is_file() and self.predictions.is_file():
            row = json.loads(self.row_file.read_text())
            if row.get("settings") == self.settings:
                return row
        return None


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:40]


def plan(records: list[Record], instructions: dict[str, str], generations: dict[str, LlavaGeneration],
         out_dir: str | Path, load: LlavaLoad, first_sentence: bool = False) -> list[Setting]:
    """Every (instruction, generation) pair, in order, with its files under ``out_dir``."""
    out = []
    for iname, instruction in instructions.items():
        for gname, gen in generations.items():
            stem = Path(out_dir) / f"{_slug(iname)}__{_slug(gname)}"
            settings = {"model": load.key(), "instruction": instruction, "generation": asdict(gen),
                        "first_sentence": first_sentence, "images": [r.file_id for r in records]}
            out.append(Setting(iname, instruction, gname, gen, stem.with_suffix(".json"),
                               stem.with_suffix(".row.json"), settings))
    return out


def sweep(model, processor, records: list[Record], instructions: dict[str, str],
          generations: dict[str, LlavaGeneration], out_dir: str | Path, references: dict[str, list[str]],
          scorer=None, extra_scores: dict | None = None, batch_size: int = 16, num_workers: int = 0,
          first_sentence: bool = False, load: LlavaLoad | None = None, progress: bool = True,
          gpus: int = 1, greedy_batch_size: int = 0) -> list[dict]:
    """Caption ``records`` once per (instruction, generation) pair and score each setting; returns the rows.

    Rows: ``instruction``, ``generation``, ``cider``, ``clipscore`` (when a :class:`~hw3lib.metrics.ClipScorer` is
    given), ``mean_length`` (words), ``seconds``, ``images_per_s``, ``predictions``, and one column per
    ``extra_scores`` entry: ``{column: function of the predictions dict -> float}`` (the demo adds
    ``caption_accuracy`` from the shapes world's ground truth). A re-run with the same settings reuses them.

    ``batch_size``: images per ``generate`` call; ``greedy_batch_size`` (0: the same), the images per call of the
    settings without beam search (greedy, sampling). A beam search of ``b`` beams keeps ``b`` rows of KV cache per
    image, one beam keeps one: in the memory of a beam-3 batch a greedy setting can take about three times as many
    images, and a GPU does more with each step it reads the weights for (docs/benchmarks.md, issue 26).

    ``load``: how ``model`` was loaded (it names the model in the settings). ``gpus > 1``: every setting still to
    do is captioned first, in one ``torchrun`` over that many GPUs whose processes each load ``load`` on their own
    GPU; ``model`` may then be None.
    """
    load = load or LlavaLoad()
    settings = plan(records, instructions, generations, out_dir, load, first_sentence)
    finished = {s.predictions: s.finished_row() for s in settings}  # read once
    todo = [s for s in settings if finished[s.predictions] is None]
    if gpus > 1 and todo:
        runs = _caption_on_gpus(todo, records, Path(out_dir), load, gpus, batch_size, num_workers, first_sentence,
                                greedy_batch_size)
    else:
        runs = {}
    rows = []
    for s in settings:
        row = finished[s.predictions]
        if row is None:
            run = runs.get(s.predictions) or caption_folder(
                model, processor, records, s.predictions, s.instruction, s.generation,
                setting_batch_size(s.generation, batch_size, greedy_batch_size), num_workers, first_sentence,
                progress, load.model)
            row = score_row(s, run, references, scorer, extra_scores,
                            records[0].image_path.parent if records else Path(out_dir))
            row.update(_gpu_memory_now())
            write_json_atomic(s.row_file, row)
        rows.append(row)
    return rows


def setting_batch_size(generation: LlavaGeneration, batch_size: int, greedy_batch_size: int = 0) -> int:
    """The images per ``generate`` call of one setting: ``greedy_batch_size`` for one beam when it is set (> 0),
    else ``batch_size``."""
    return greedy_batch_size if generation.num_beams == 1 and greedy_batch_size > 0 else batch_size


def _gpu_memory_now() -> dict:
    """What PyTorch holds on the GPU once a setting is done, in use and cached: if it grows from setting to setting
    on a small card, something of an earlier setting stayed (the rows of a sweep tell which)."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    return {"gpu_allocated_gib_after": round(torch.cuda.memory_allocated() / 2**30, 2),
            "gpu_reserved_gib_after": round(torch.cuda.memory_reserved() / 2**30, 2)}


def score_row(s: Setting, run: CaptionRun, references: dict[str, list[str]], scorer, extra_scores: dict | None,
              image_dir: Path) -> dict:
    """The row of one captioned setting: its names, its scores, its speed and its files."""
    from ..metrics import cider, clip_score

    pred = run.captions
    row = {"name": f"{s.instruction_name} / {s.generation_name}", "instruction_name": s.instruction_name,
           "instruction": s.instruction, "generation": s.generation_name, "generation_config": asdict(s.generation),
           "cider": cider(pred, {k: references[k] for k in pred})[0],
           "mean_length": float(np.mean([len(c.split()) for c in pred.values()])),
           "seconds": round(run.seconds, 2),
           "images_per_s": round(run.computed / run.seconds, 2) if run.computed else None,
           "predictions": str(s.predictions)}
    if scorer is not None:
        row["clipscore"] = clip_score(scorer, pred, image_dir)[0]
    for column, score in (extra_scores or {}).items():
        row[column] = score(pred)
    row["settings"] = s.settings
    return row


def _caption_on_gpus(todo: list[Setting], records: list[Record], out_dir: Path, load: LlavaLoad, gpus: int,
                     batch_size: int, num_workers: int, first_sentence: bool,
                     greedy_batch_size: int = 0) -> dict[Path, CaptionRun]:
    """Caption ``todo`` under torchrun over ``gpus`` processes, each running :func:`main`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    spec_path, results_path = out_dir / "sweep_spec.json", out_dir / "sweep_results.json"
    spec = {"load": asdict(load), "images": [str(r.image_path) for r in records],
            "num_workers": num_workers, "first_sentence": first_sentence, "results": str(results_path),
            "settings": [{"instruction": s.instruction, "generation": asdict(s.generation),
                          "batch_size": setting_batch_size(s.generation, batch_size, greedy_batch_size),
                          "predictions": str(s.predictions)} for s in todo]}
    write_json_atomic(spec_path, spec)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}", "-m", __name__,
           str(spec_path)]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode:
        tail = "\n".join(done.stdout.strip().splitlines()[-40:])
        raise RuntimeError(f"the sweep's captioning on {gpus} GPUs failed ({' '.join(cmd)}):\n{tail}")
    runs = {}
    for r in json.loads(results_path.read_text()):
        captions = json.loads(Path(r["predictions"]).read_text())
        runs[Path(r["predictions"])] = CaptionRun(captions, r["reused"], r["computed"], r["seconds"])
    spec_path.unlink()
    results_path.unlink()
    return runs


def main(spec_path: str) -> int:
    """One process of :func:`_caption_on_gpus`: load the model on this process's GPU, then caption every setting of
    the spec, sharded by batches (:func:`~hw3lib.llava.captioning.caption_folder` under a launcher), resumable."""
    from ..distributed import setup

    spec = json.loads(Path(spec_path).read_text())
    dist = setup()
    records = [Record(Path(p), Path(p).stem, ()) for p in spec["images"]]
    load = LlavaLoad(**{**spec["load"], "device": str(dist.device(None))})
    model, processor = load.load()
    results = []
    for s in spec["settings"]:
        run = caption_folder(model, processor, records, s["predictions"], s["instruction"],
                             LlavaGeneration(**s["generation"]), s["batch_size"], spec["num_workers"],
                             spec["first_sentence"], progress=dist.main, model_name=load.model)
        results.append({"predictions": s["predictions"], "seconds": run.seconds, "computed": run.computed,
                        "reused": run.reused, "processes": dist.world_size})
        if dist.main:
            write_json_atomic(spec["results"], results)
    return 0


def best_setting(rows: list[dict]) -> dict:
    """The row with the highest CIDEr, the course's primary metric."""
    return max(rows, key=lambda r: r["cider"])


def best_on_all(best: dict, model, processor, records: list[Record], instructions: dict[str, str],
                generations: dict[str, LlavaGeneration], out_dir: str | Path, references: dict[str, list[str]],
                **how) -> dict:
    """The row of ``best``, a setting that a :func:`sweep` compared on the first images of ``records`` only, for all
    of ``records``: a sweep of that one setting into ``out_dir``, which keeps the captions ``best`` already made
    (the same model, instruction, generation and first-sentence rule) and captions only the other images.
    ``how``: :func:`sweep`'s keyword arguments."""
    name, gen = best["instruction_name"], best["generation"]
    load = how.get("load") or LlavaLoad()
    [s] = plan(records, {name: instructions[name]}, {gen: generations[gen]}, out_dir, load,
               how.get("first_sentence", False))
    same = {k: v for k, v in best["settings"].items() if k != "images"} == \
        {k: v for k, v in s.settings.items() if k != "images"}
    if same and s.finished_row() is None and Path(best["predictions"]).is_file():
        made = json.loads(Path(best["predictions"]).read_text())
        seed_partial(s.predictions, caption_settings(load.model, s.instruction, s.generation, s.settings[
            "first_sentence"]), {r.file_id: made[r.file_id] for r in records if r.file_id in made})
    [row] = sweep(model, processor, records, {name: instructions[name]}, {gen: generations[gen]}, out_dir,
                  references, **how)
    return row


def sweep_summary(rows: list[dict], model_name: str, num_images: int, best: dict | None = None,
                  best_images: int | None = None) -> dict:
    """What notebook 01 records: every row's settings and scores, and the best row by CIDEr with the path of its
    predictions. ``best``: that setting's row on ``best_images`` images, when the sweep compared the settings on
    fewer (``llava_sweep_images``) and the best then captioned them all."""
    keep = ["name", "instruction_name", "instruction", "generation", "generation_config", "cider", "clipscore",
            "mean_length", "caption_accuracy", "seconds", "images_per_s", "predictions", "gpu_allocated_gib_after",
            "gpu_reserved_gib_after"]
    best = best or best_setting(rows)
    return {"model": model_name, "num_images": num_images, "sweep": [{k: r[k] for k in keep if k in r} for r in rows],
            "best": {k: best[k] for k in keep if k in best}, "best_num_images": best_images or num_images}


def sweep_findings(rows: list[dict]) -> str:
    """What a sweep found, in sentences with its numbers (notebook 01's "This run"): the range of CIDEr and of
    CLIPScore with the settings at either end, the longest captions' CIDEr, and the best setting by CIDEr."""
    by_cider = sorted(rows, key=lambda r: r["cider"])
    by_clip = sorted(rows, key=lambda r: r.get("clipscore", 0))
    longest = max(rows, key=lambda r: r["mean_length"])
    best = best_setting(rows)
    return (f"**This run.** CIDEr runs from {by_cider[0]['cider']:.3f} (*{by_cider[0]['name']}*) to "
            f"{by_cider[-1]['cider']:.3f} (*{by_cider[-1]['name']}*); CLIPScore from "
            f"{by_clip[0].get('clipscore', 0):.3f} (*{by_clip[0]['name']}*) to {by_clip[-1].get('clipscore', 0):.3f} "
            f"(*{by_clip[-1]['name']}*). The longest captions (*{longest['name']}*, {longest['mean_length']:.1f} words "
            f"on average) score CIDEr {longest['cider']:.3f}. Best by CIDEr: *{best['instruction']}* with "
            f"{best['generation']}.")

if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
