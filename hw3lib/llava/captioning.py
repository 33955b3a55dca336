"""Captioning a folder with LLaVA in batches: the images decoded and preprocessed by DataLoader workers, the
prompts left-padded (a decoder-only model continues each prompt from its last position, so the prompts must end
together), and every finished batch appended to ``OUT.partial.jsonl``, so that a killed run resumes where it
stopped; the final JSON is written atomically."""
from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..data import DataError, ImageDataset, Record, atomic_path, list_images, write_json_atomic
from .decoding import generate
from .loading import device_of, model_key
from .settings import DEFAULT_INSTRUCTION, LlavaGeneration, build_prompt, postprocess


class _Collate:
    """Runs in the DataLoader workers: image preprocessing + tokenisation of one batch."""

    def __init__(self, processor, prompt: str, dtype: torch.dtype = torch.float32):
        self.processor, self.prompt, self.dtype = processor, prompt, dtype

    def __call__(self, batch):
        images, index = zip(*batch)
        inputs = dict(self.processor(images=list(images), text=[self.prompt] * len(images), padding=True,
                                     return_tensors="pt"))
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)  # the model's: half the bytes to pass on in bf16
        return inputs, list(index)


@torch.inference_mode()
def caption_records(model, processor, records: list[Record], instruction: str = DEFAULT_INSTRUCTION,
                    generation: LlavaGeneration = LlavaGeneration(), batch_size: int = 16, num_workers: int = 0,
                    first_sentence: bool = False, progress: bool = True, on_batch=None) -> dict[str, str]:
    """Caption ``records`` in batches; returns ``{file id: caption}``. ``on_batch(dict)`` gets each batch's
    captions as soon as they exist (the resumable writer uses it)."""
    from tqdm.auto import tqdm

    if not records:
        return {}
    device = device_of(model)
    dtype = next(model.parameters()).dtype
    prompt = build_prompt(processor, instruction)
    tok = processor.tokenizer
    if generation.do_sample:
        torch.manual_seed(generation.seed)
    out: dict[str, str] = {}
    reuse: dict = {}  # greedy from a CUDA graph: the graph and its cache, for the next batch of the same shape
    with tqdm(total=len(records), desc="llava captions", unit="img", disable=not progress) as bar:
        try:
            for inputs, index in _batches(records, processor, prompt, dtype, device, batch_size, num_workers):
                ids = generate(model, inputs, generation, tok.pad_token_id, reuse=reuse)
                texts = tok.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
                batch = {records[i].file_id: postprocess(t, first_sentence) for i, t in zip(index, texts)}
                out.update(batch)
                if on_batch is not None:
                    on_batch(batch)
                bar.update(len(index))
        finally:  # an error's traceback keeps this frame: the cache and graph must not stay on the card with it
            reuse.clear()
    return out


def _batches(records, processor, prompt, dtype, device, batch_size: int, num_workers: int):
    """Preprocessed batches of ``batch_size`` images on ``device``, with their record indices.

    With workers, each prepares a slice of a batch (the largest divisor of ``batch_size`` up to ``batch_size /
    num_workers`` images, so that a batch is never larger than asked), and the first batch is ready when its
    slices are, about ``num_workers`` times sooner than if one worker prepared it whole: the GPU does not wait at
    the start. Every prompt is the same text, so the slices' token ids have one length and are joined as they
    are."""
    most = -(-batch_size // num_workers) if num_workers > 0 else batch_size
    chunk = max(d for d in range(1, most + 1) if batch_size % d == 0)
    loader = torch.utils.data.DataLoader(ImageDataset(records), batch_size=chunk, num_workers=num_workers,
                                         collate_fn=_Collate(processor, prompt, dtype),
                                         pin_memory=device.type == "cuda", persistent_workers=False)
    parts, index = [], []

    def joined():
        inputs = {k: torch.cat([p[k] for p in parts]) if len(parts) > 1 else parts[0][k] for k in parts[0]}
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        return inputs, list(index)

    for inputs, idx in loader:
        parts.append({k: v.to(device, non_blocking=True) for k, v in inputs.items()})
        index.extend(idx)
        if len(index) >= batch_size:
            yield joined()
            parts, index = [], []
    if parts:
        yield joined()


@dataclass
class CaptionRun:
    captions: dict[str, str]
    reused: int  # captions found in the partial file of an earlier, interrupted run
    computed: int  # captions generated by this run
    seconds: float
    settings: dict = field(default_factory=dict)


def _read_partial(path: Path, settings: dict) -> dict[str, str]:
    """Captions of an interrupted run with the same settings; a torn last line is dropped."""
    if not path.is_file():
        return {}
    raw = path.read_bytes()
    if not raw.endswith(b"\n"):  # killed in the middle of a line: keep the complete lines only
        raw = raw[: raw.rfind(b"\n") + 1]
        path.write_bytes(raw)
    lines = raw.decode("utf-8").splitlines()
    try:
        header = json.loads(lines[0]) if lines else None
    except json.JSONDecodeError:
        header = None
    if header != {"settings": settings}:
        warnings.warn(f"{path}: left by a run with other settings; starting over", stacklevel=3)
        path.unlink()
        return {}
    done = {}
    for n, line in enumerate(lines[1:], 2):
        try:
            row = json.loads(line)
            done[row["file_id"]] = row["caption"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"{path}, line {n}: not a caption record; delete the file to start over") from None
    return done


def caption_folder(model, processor, images: str | Path | list[Record], out_json: str | Path,
                   instruction: str = DEFAULT_INSTRUCTION, generation: LlavaGeneration = LlavaGeneration(),
                   batch_size: int = 16, num_workers: int = 0, first_sentence: bool = False, progress: bool = True,
                   model_name: str = "", on_batch=None) -> CaptionRun:
    """Caption every image of a folder (or a record list) into ``out_json`` = ``{file id: caption}``.

    Resumable: each batch is appended to ``out_json.partial.jsonl`` as it finishes; a restart with the same
    settings skips those images. The JSON is written atomically at the end and the partial file removed.

    Under a launcher (``torchrun`` / ``accelerate launch``, see :mod:`hw3lib.distributed`) every process captions
    every ``world_size``-th batch of the images still to do (the batches one process would form), into its own
    ``out_json.partial.rank<R>.jsonl``; the main process writes the one JSON, the same as one process writes. A
    restart resumes from the partial files of any number of processes.
    """
    from ..distributed import current

    t0 = time.time()
    dist = current()
    records = list_images(images) if isinstance(images, (str, Path)) else list(images)
    out_json = Path(out_json)
    settings = caption_settings(model_name, instruction, generation, first_sentence)
    done = None
    if dist.main:  # only the main process reads (and, for other settings, deletes) what an interrupted run left
        done = {}
        for path in partial_files(out_json):
            done.update(_read_partial(path, settings))
        done = {k: v for k, v in done.items() if k in {r.file_id for r in records}}
    done = dist.broadcast(done)
    todo = dist.shard_batches([r for r in records if r.file_id not in done], batch_size)
    suffix = f".partial.rank{dist.rank}.jsonl" if dist.active else ".partial.jsonl"
    partial = out_json.with_name(out_json.name + suffix)
    partial.parent.mkdir(parents=True, exist_ok=True)
    header = json.dumps({"settings": settings}) + "\n"
    with open(partial, "a", encoding="utf-8") as f:
        if f.tell() == 0:
            f.write(header)
            f.flush()

        def write(batch: dict[str, str]) -> None:
            f.write("".join(json.dumps({"file_id": k, "caption": v}) + "\n" for k, v in batch.items()))
            f.flush()
            os.fsync(f.fileno())
            if on_batch is not None:
                on_batch(batch)

        try:
            new = caption_records(model, processor, todo, instruction, generation, batch_size, num_workers,
                                  first_sentence, progress and dist.main, on_batch=write)
        except BaseException:
            if f.tell() == len(header.encode()):
                f.close()
                partial.unlink()  # this process captioned nothing: nothing to resume from
            raise  # otherwise the captions so far stay, and a restart with the same settings skips them
    for shard in dist.gather(new):
        new.update(shard)
    captions = {r.file_id: done[r.file_id] if r.file_id in done else new[r.file_id] for r in records}
    dist.barrier()  # every process has closed its partial file
    if dist.main:
        write_json_atomic(out_json, captions)
        for path in partial_files(out_json):
            path.unlink()
    dist.barrier()
    return CaptionRun(captions, reused=len(done), computed=len(new), seconds=time.time() - t0, settings=settings)


def caption_settings(model_name: str, instruction: str, generation: LlavaGeneration, first_sentence: bool) -> dict:
    """What makes two captionings of an image the same: a partial file is resumed only under these settings."""
    return {"model": model_key(model_name), "instruction": instruction, "generation": asdict(generation),
            "first_sentence": first_sentence}


def seed_partial(out_json: str | Path, settings: dict, captions: dict[str, str]) -> Path:
    """Hand :func:`caption_folder` into ``out_json`` captions already made under the same ``settings``
    (:func:`caption_settings`) elsewhere, e.g. by a sweep over fewer images: it takes them as done, as it takes
    those of an interrupted run of its own. Written atomically as one more partial file."""
    path = Path(out_json).with_name(Path(out_json).name + ".partial.seed.jsonl")
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"settings": settings}) + "\n" + "".join(
            json.dumps({"file_id": k, "caption": v}) + "\n" for k, v in captions.items()), encoding="utf-8")
    return path


def partial_files(out_json: Path) -> list[Path]:
    """What an interrupted :func:`caption_folder` into ``out_json`` left: one partial file per process."""
    return sorted(out_json.parent.glob(out_json.name + ".partial*.jsonl"))
