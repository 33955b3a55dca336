"""Training the P2 captioner: the loop shared by notebook 02 and ``hw3 train``.

* The frozen encoder runs once per image, not once per caption per epoch: its features are cached (in memory, or
  on disk to share between runs) unless augmentation is on.
* AdamW (fused on CUDA) on the projection + LoRA weights only, linear warm-up then cosine decay, gradient clipping,
  bf16 autocast on the GPU.
* Each epoch ends with validation CIDEr / CLIPScore, an atomic checkpoint (``last.pt``: trained weights, optimiser,
  schedule, history) and, when it is the best so far, the adapter (``best.safetensors`` + ``best.json``).
  ``resume`` continues after a kill with the same schedule and data order: the run ends with the same parameters
  as one that was never interrupted.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .captioner import (Captioner, CaptionerGeneration, caption_features, encode_images, extract_features,
                        save_adapter, trained_state_dict)
from .data import DataError, ImageDataset, Record, atomic_path


@dataclass
class TrainConfig:
    num_epochs: int = 5  # passes over the training samples: the length of the learning-rate schedule
    stop_after: int = 0  # train only the first this many epochs of that schedule (0: all); a later call with a larger
    # value continues the same run
    keep_epochs: tuple[int, ...] = ()  # also save the adapter after these epochs (out_dir/epoch-K), best or not
    validate: bool = True  # caption the val images after every epoch, keep the best; False: train only (its history
    # has the loss alone, and no best adapter: keep_epochs names the ones to save)
    batch_size: int = 64  # captions per step
    lr: float = 1e-3  # peak learning rate (projection and LoRA alike)
    weight_decay: float = 0.01  # AdamW; small, LoRA matrices are already low-rank
    warmup_ratio: float = 0.05  # fraction of all steps spent warming up linearly
    grad_clip: float = 1.0  # max global grad norm
    captions_per_image: int = 0  # per epoch: 0 = every reference; k = k references drawn per image (short epochs)
    eval_images: int = 0  # val images captioned after each epoch (0 = all)
    eval_batch_size: int = 64  # images per generate() call
    seed: int = 0  # data order, dropout, caption draws
    feature_cache: str = "memory"  # "memory", "disk" (out_dir/features-*.pt) or "off" (encoder every step)
    num_workers: int | None = None  # threads decoding images for the features; None: up to 16 on a GPU, 0 on the CPU
    amp: bool = True  # bf16 autocast on CUDA (ignored on the CPU)
    deterministic: bool = True  # CPU: deterministic kernels (index_add's threads otherwise sum in any order), so the
    # same seed gives bit-identical tensors; CUDA keeps its fast kernels
    compile: bool | None = None  # the step's loss and backward through torch.compile (None: on CUDA only). A step
    # is thousands of small kernels (LoRA on every linear); compiled, they are fused, and on CUDA replayed as CUDA
    # graphs ("reduce-overhead") without Python. Every step is padded to the largest, so it compiles once. Speed
    # only: not part of the run's identity, so a run may resume with it on or off
    compile_scope: str = "step"  # "step": the whole loss is one graph (the fastest steps, the longest compile);
    # "blocks": one decoder block is compiled, and serves the 12 blocks and every later run whose blocks have the
    # same shapes (notebook 02's ablation reuses the main run's): a quarter of the compile time on the CPU, 2.3x
    # less on an H100 (two runs measured), where its steps are about 2.4x slower (docs/benchmarks.md). Speed only,
    # like compile


@dataclass
class TrainResult:
    history: list[dict]  # one row per epoch: loss, val cider / clipscore, seconds
    best_epoch: int
    best_path: Path | None
    seconds: float
    epoch_paths: dict[int, Path] = field(default_factory=dict)  # the adapters saved for ``keep_epochs``


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


REPLACE = "hw3 train --overwrite (notebook 02: -p overwrite true)"
_FEATURES: dict = {}  # (records and encoder config, encoder) -> features: the variants of notebook 02 reuse them


def cached_features(encoder, transform, records, enc_cfg, cfg: TrainConfig, out_dir: Path, device) -> torch.Tensor:
    """Features from the disk cache when ``feature_cache == "disk"`` and it matches, else freshly extracted."""
    workers = cfg.num_workers  # None: extract_features' default (decoding threads on a GPU)
    key = hashlib.sha1(json.dumps([asdict(enc_cfg), [str(r.image_path) for r in records]]).encode()).hexdigest()[:16]
    if cfg.feature_cache != "disk":  # memory: runs in one process with the same encoder share one extraction
        memo_key = (key, id(encoder))
        if memo_key not in _FEATURES:
            if len(_FEATURES) >= 4:
                _FEATURES.clear()
            _FEATURES[memo_key] = extract_features(encoder, transform, records, enc_cfg, cfg.eval_batch_size, device,
                                                   workers)
        return _FEATURES[memo_key]
    path = Path(out_dir) / f"features-{key}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True, mmap=True)  # pages read as the steps need them, shared
    feats = extract_features(encoder, transform, records, enc_cfg, cfg.eval_batch_size, device, workers)
    with atomic_path(path) as tmp:
        torch.save(feats, tmp)
    return feats


def epoch_batches(records: list[Record], k: int, batch_size: int, rng: np.random.Generator,
                  ) -> list[list[tuple[int, int]]]:
    """One epoch's steps as (image index, reference index) pairs: images in a random order, each with ``k`` of its
    references (all when ``k`` is 0); a step holds whole images and about ``batch_size`` captions, so that every
    image's visual prefix runs through the decoder once per step (:meth:`Captioner.forward_shared`)."""
    steps, current = [], []
    for i in rng.permutation(len(records)):
        n = len(records[i].references)
        chosen = range(n) if k <= 0 or k >= n else sorted(rng.choice(n, size=k, replace=False))
        current.extend((int(i), int(j)) for j in chosen)
        if len(current) >= batch_size:
            steps.append(current)
            current = []
    return steps + ([current] if current else [])


def train(model: Captioner, encoder, transform, train_records: list[Record], val_records: list[Record],
          cfg: TrainConfig, out_dir: str | Path, gen: CaptionerGeneration = CaptionerGeneration(), clip=None,
          resume: bool = True, overwrite: bool = False, device: str | None = None, on_step=None,
          log=print) -> TrainResult:
    """Train ``model``'s projection + LoRA on ``train_records``; validate on ``val_records`` every epoch.

    Args:
        clip: a :class:`hw3lib.metrics.ClipScorer` for validation CLIPScore (None: CIDEr only).
        resume: continue from ``out_dir/last.pt`` when it exists (and belongs to this very run).
        overwrite: a ``last.pt`` of another configuration or data is replaced; otherwise it is an error.
        on_step: called as ``on_step(epoch, step)`` after every optimiser step (tests use it to simulate a kill).

    Under a launcher (``torchrun`` / ``accelerate launch``, :mod:`hw3lib.distributed`) it is data-parallel: every
    process takes every ``world_size``-th caption of each step, its loss is weighted by its share of the step's
    tokens and the gradients are summed, so a step equals the one-process step. The main process validates and
    writes the checkpoints.
    """
    from .distributed import current
    from .metrics import cider, clip_score

    dist = current()
    device = dist.device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(device)
    if cfg.feature_cache not in ("memory", "disk", "off"):
        raise ValueError(f"feature_cache must be 'memory', 'disk' or 'off', got {cfg.feature_cache!r}")
    if cfg.compile_scope not in COMPILE_SCOPES:
        raise ValueError(f"compile_scope must be one of {', '.join(COMPILE_SCOPES)}, got {cfg.compile_scope!r}")
    stop = cfg.stop_after or cfg.num_epochs
    if not 0 < stop <= cfg.num_epochs or any(not 0 < k <= stop for k in cfg.keep_epochs):
        raise ValueError(f"stop_after ({cfg.stop_after}) and keep_epochs ({list(cfg.keep_epochs)}) must lie within "
                         f"the {cfg.num_epochs} epochs of the schedule")
    t_start = time.time()
    val_records = val_records[: cfg.eval_images] if cfg.eval_images > 0 else val_records
    last = out_dir / "last.pt"
    check_run_folder(out_dir, model.cfg, cfg, train_records, val_records, gen, overwrite=overwrite or not resume)
    if dist.active and cfg.feature_cache == "disk" and not dist.main:
        dist.barrier()  # the main process extracts (or finds) the disk cache; the others then read it
    t_features = time.time()
    train_feats = cached_features(encoder, transform, train_records, model.cfg.encoder, cfg, out_dir, device) \
        if cfg.feature_cache != "off" else None
    val_feats = cached_features(encoder, transform, val_records, model.cfg.encoder, cfg, out_dir, device) \
        if dist.main and cfg.validate else None
    if cfg.feature_cache != "off" and dist.main:
        counted = f"{len(train_records)} + {len(val_records)}" if cfg.validate else f"{len(train_records)}"
        log(f"features of {counted} images ready in {time.time() - t_features:.1f}s")
    if dist.active and cfg.feature_cache == "disk" and dist.main:
        dist.barrier()

    # the whole plan up front: each epoch's order depends on (seed, epoch) only, so a resumed run replays it
    plan = [epoch_batches(train_records, cfg.captions_per_image, cfg.batch_size, np.random.default_rng([cfg.seed, e]))
            for e in range(cfg.num_epochs)]
    tokens = [[model.caption_tokens(c) for c in r.references] for r in train_records]  # once, not every step
    total = sum(map(len, plan))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, total, int(cfg.warmup_ratio * total)))
    history, start_epoch, best = [], 0, (-1.0, -1)
    key = run_key(model.cfg, cfg, train_records, val_records, gen)
    state = torch.load(last, map_location="cpu", weights_only=False) if resume and last.is_file() else None
    if state is not None and state.get("run_key") != key:
        if not overwrite:
            raise DataError(f"{out_dir}: holds a run of another configuration or data; to replace it, {REPLACE}; "
                            "or choose another output folder")
        log(f"{last} belongs to a run with another configuration or data: starting over")
        state = None
    if state is not None:
        model.load_state_dict(state["trained"], strict=False)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        history, start_epoch, best = state["history"], state["epoch"] + 1, tuple(state["best"])
        log(f"resumed from {last} after epoch {state['epoch'] + 1}/{cfg.num_epochs}")

    amp = cfg.amp and device.type == "cuda"
    compiled = device.type == "cuda" if cfg.compile is None else cfg.compile
    step_loss = caption_loss(model, amp, step_sizes(plan, tokens) if compiled else None,
                             "reduce-overhead" if device.type == "cuda" else None,  # CUDA graphs where there are
                             cfg.compile_scope)
    with _block_weights_in_bf16(model, amp), _deterministic(cfg.deterministic and device.type == "cpu"):
        for epoch in range(start_epoch, stop):
            t0 = time.time()
            torch.manual_seed(cfg.seed * 1000 + epoch)  # dropout: the same whether or not the run was resumed
            model.train()
            shares, values, pending = [], [], []  # each step's share of the loss; its loss, read back in groups
            bar = tqdm(plan[epoch], desc=f"epoch {epoch + 1}/{cfg.num_epochs}", leave=False, disable=not dist.main)
            for step, batch in enumerate(bar):
                share = 1.0
                if dist.active:  # this process's captions, and their share of the step's tokens
                    counts = [len(tokens[i][j]) + 1 for i, j in batch]  # the targets: the caption and <eot>
                    share = sum(dist.shard(counts)) / sum(counts)
                    batch = dist.shard(batch)
                if not batch:  # a last step smaller than the number of processes
                    opt.zero_grad(set_to_none=True)
                    if dist.active:
                        dist.all_reduce_(params_grads(params))
                    _step(opt, sched, params, cfg)
                    continue
                images = sorted({i for i, _ in batch})
                local = {i: n for n, i in enumerate(images)}
                if train_feats is not None:
                    feats = train_feats[images].to(device, non_blocking=True)
                else:
                    pixel_values = torch.stack([ImageDataset(train_records, transform)[i][0] for i in images])
                    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                        feats = encode_images(encoder.to(device), pixel_values.to(device), model.cfg.encoder)
                image_index = torch.tensor([local[i] for i, _ in batch], device=device)
                ids, targets = model.batch_tokens([tokens[i][j] for i, j in batch])
                loss = step_loss(feats, image_index, ids.to(device), targets.to(device))
                opt.zero_grad(set_to_none=True)
                (loss * share).backward()
                if dist.active:
                    dist.all_reduce_(params_grads(params))
                _step(opt, sched, params, cfg)
                shares.append(share)
                pending.append(loss.detach().clone())  # a copy: a CUDA graph reuses its output's memory
                if len(pending) == 20 or step == len(plan[epoch]) - 1:  # not every step: a read-back waits for the GPU
                    values += torch.stack(pending).tolist()
                    pending = []
                    bar.set_postfix(loss=f"{np.mean(values[-20:]):.3f}")
                if on_step is not None:
                    on_step(epoch, step)
            values += torch.stack(pending).tolist() if pending else []  # a process whose last steps were empty
            losses = [v * s for v, s in zip(values, shares)]
            loss_sum = torch.tensor([float(np.sum(losses))], dtype=torch.float64, device=device)  # NCCL: on the GPU
            dist.all_reduce_([loss_sum])
            if not dist.main:  # the main process validates and writes the checkpoints
                dist.barrier()
                continue
            row = {"epoch": epoch + 1, "loss": float(loss_sum) / len(plan[epoch]), "lr": sched.get_last_lr()[0]}
            if cfg.validate:
                preds = caption_features(model, val_feats, gen, cfg.eval_batch_size, device)
                pred = {r.file_id: c for r, c in zip(val_records, preds)}
                row["val_cider"] = cider(pred, {r.file_id: list(r.references) for r in val_records})[0]
                if clip is not None:
                    row["val_clipscore"] = clip_score(clip, pred, val_records[0].image_path.parent)[0]
            row["seconds"] = round(time.time() - t0, 1)
            history.append(row)
            if cfg.validate and row["val_cider"] > best[0]:
                best = (row["val_cider"], epoch + 1)
                save_adapter(model, out_dir / "best", extra={"epoch": epoch + 1, "history": history})
            if epoch + 1 in cfg.keep_epochs:
                save_adapter(model, out_dir / f"epoch-{epoch + 1}", extra={"epoch": epoch + 1, "history": history})
            _save_last(last, model, opt, sched, epoch, history, best, key)
            scores = "".join(f", {name} {row[key]:.3f}" for key, name in (("val_cider", "val CIDEr"),
                                                                          ("val_clipscore", "CLIPScore")) if key in row)
            log(f"epoch {epoch + 1}/{cfg.num_epochs}: loss {row['loss']:.3f}{scores} ({row['seconds']}s)")
            dist.barrier()
    if not dist.main:  # the history and the best epoch as the main process wrote them
        state = torch.load(last, map_location="cpu", weights_only=False)
        history, best = state["history"], tuple(state["best"])
    best_path = out_dir / "best.safetensors"
    kept = {k: out_dir / f"epoch-{k}.safetensors" for k in cfg.keep_epochs}
    return TrainResult(history, best[1], best_path if best_path.is_file() else None, time.time() - t_start,
                       {k: path for k, path in kept.items() if path.is_file()})


COMPILE_SCOPES = ("step", "blocks")


def caption_loss(model: Captioner, amp: bool, pad_to: tuple[int, int, int] | None = None,
                 mode: str | None = None, scope: str = "step"):
    """``loss(features, image_index, input_ids, targets)``: :meth:`Captioner.forward_shared`'s loss, under bf16
    autocast when ``amp``.

    With ``pad_to = (images, captions, tokens)`` it goes through ``torch.compile`` (forward and backward), and every
    step is first padded to those sizes: one shape, so one compile. The padding changes nothing in the loss: the
    extra images are never indexed, and the extra captions and positions have no targets (-100), which the mean
    skips. ``scope`` (:data:`COMPILE_SCOPES`): the whole loss, or only the decoder's blocks, through one compiled
    :func:`hw3lib.decoder.call_block` set on the decoder for the duration of the step."""
    def loss(features, image_index, input_ids, targets):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            return model.forward_shared(features, image_index, input_ids, targets).loss

    if pad_to is None:
        return loss
    n_images, n_captions, n_tokens = pad_to
    if scope == "blocks":  # compiled code is cached by the function's code: later runs reuse it where shapes match
        from .decoder import call_block

        blocks = torch.compile(call_block, mode=mode)

        def compiled(*step):
            model.decoder.block_call = blocks
            try:
                return loss(*step)
            finally:
                model.decoder.block_call = None
    else:
        compiled = torch.compile(loss, mode=mode)  # mode: torch.compile's ("reduce-overhead": CUDA graphs)
    graphs = mode == "reduce-overhead"

    state = {"compiled": True, "first": True}

    def padded(features, image_index, input_ids, targets):
        if not state["compiled"]:
            return loss(features, image_index, input_ids, targets)
        (n, N), T = (features.shape[0], input_ids.shape[0]), input_ids.shape[1]
        step = (F.pad(features, (0, 0, 0, 0, 0, n_images - n)), F.pad(image_index, (0, n_captions - N)),
                F.pad(input_ids, (0, n_tokens - T, 0, n_captions - N), value=model.tokenizer.eot_id),
                F.pad(targets, (0, n_tokens - T, 0, n_captions - N), value=-100))
        if graphs:  # a new step: the graph's outputs (the last loss) may be overwritten from here on
            torch.compiler.cudagraph_mark_step_begin()
        try:
            # loralib's MergedLinear pads with a boolean mask (a nonzero): trace it, do not break the graph there
            with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
                return compiled(*step)
        except torch._dynamo.exc.TorchDynamoException as e:  # no compiler here (Triton, a C++ compiler): eager
            if not state["first"]:
                raise
            first = (str(e).strip().splitlines() or [""])[0][:200]
            warnings.warn(f"torch.compile could not compile the training step ({type(e).__name__}: {first}); "
                          "training eagerly (hw3 train --no-compile skips the attempt)", stacklevel=2)
            state["compiled"] = False
            return loss(features, image_index, input_ids, targets)
        finally:
            state["first"] = False

    return padded


def step_sizes(plan: list[list[list[tuple[int, int]]]], tokens: list[list[list[int]]]) -> tuple[int, int, int]:
    """The most images, captions and input tokens (``<eot>`` + caption) of any step in ``plan``."""
    steps = [step for epoch in plan for step in epoch]
    return (max(len({i for i, _ in step}) for step in steps), max(map(len, steps)),
            max(len(tokens[i][j]) + 1 for step in steps for i, j in step))


def params_grads(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The gradients to sum over the processes (zeros where a parameter got none this step)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params]


def _step(opt, sched, params, cfg: TrainConfig) -> None:
    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    opt.step()
    sched.step()


def run_key(model_cfg, cfg: TrainConfig, train_records: list[Record], val_records: list[Record],
            gen: CaptionerGeneration) -> str:
    """What makes two runs the same: a checkpoint is resumed only by the run that wrote it."""
    # not part of it: speed (compile), and where this call stops and what it keeps: the schedule is the same
    cfg = {k: v for k, v in asdict(cfg).items()
           if k not in ("compile", "compile_scope", "stop_after", "keep_epochs", "validate")}
    return json.dumps([asdict(model_cfg), cfg, [r.file_id for r in train_records],
                       [r.file_id for r in val_records], asdict(gen)], sort_keys=True, default=str)


def check_run_folder(out_dir: str | Path, model_cfg, cfg: TrainConfig, train_records: list[Record],
                     val_records: list[Record], gen: CaptionerGeneration, overwrite: bool = False) -> None:
    """Before any work: refuse an ``out_dir`` whose ``last.pt`` belongs to another run, unless ``overwrite``."""
    last = Path(out_dir) / "last.pt"
    if overwrite or not last.is_file():
        return
    val_records = val_records[: cfg.eval_images] if cfg.eval_images > 0 else val_records
    try:
        state = torch.load(last, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 -- a torn or foreign file
        raise DataError(f"{last}: cannot read this checkpoint ({type(e).__name__}); delete it or pass --overwrite"
                        ) from None
    if not isinstance(state, dict) or state.get("run_key") != run_key(model_cfg, cfg, train_records, val_records,
                                                                       gen):
        raise DataError(f"{out_dir}: holds a run of another configuration or data (its last.pt); to replace it, "
                        f"{REPLACE}; or choose another output folder")


@contextlib.contextmanager
def _deterministic(enabled: bool):
    """``torch.use_deterministic_algorithms`` for the duration, restored after."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled or before)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


@contextlib.contextmanager
def _block_weights_in_bf16(model: Captioner, enabled: bool):
    """The decoder blocks' frozen linear weights in bf16 for the duration (restored after): under autocast they are
    cast to bf16 anyway, and casting them once saves hundreds of copy kernels per training step."""
    saved = {}
    if enabled:
        for block in model.decoder.transformer.h:
            for m in block.modules():
                if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad:
                    saved[m] = m.weight.data
                    m.weight.data = m.weight.data.to(torch.bfloat16)
    try:
        yield
    finally:
        for m, w in saved.items():
            m.weight.data = w


def _save_last(path: Path, model, opt, sched, epoch, history, best, run_key: str) -> None:
    with atomic_path(path) as tmp:
        torch.save({"trained": trained_state_dict(model), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "epoch": epoch, "history": history, "best": list(best),
                    "run_key": run_key}, tmp)


# --------------------------------------------------------------------------------------------------- attempts
def attempt_schedule(cfg: TrainConfig, epochs: int) -> tuple[TrainConfig, TrainConfig | None]:
    """``(main, attempts)``: the schedules of the main run and of the report's attempts. The attempts train the first
    ``epochs`` epochs of the main schedule (its learning rate, warm-up and data order; 0: no attempts), and the main
    run keeps its adapter after that epoch, so that the attempts table compares every run at the same point (the
    attempts then skip the per-epoch validation, which picks no adapter of theirs)."""
    if not 0 <= epochs <= cfg.num_epochs:
        raise ValueError(f"attempt_epochs must lie in 0..num_epochs ({cfg.num_epochs}), got {epochs}")
    if epochs in (0, cfg.num_epochs):
        return cfg, (cfg if epochs else None)
    return replace(cfg, keep_epochs=(epochs,)), replace(cfg, stop_after=epochs, keep_epochs=(epochs,), validate=False)


def row_adapter(result: TrainResult, epoch: int | None, folder: str | Path) -> Path:
    """The adapter that a row of the attempts table scores: the best epoch's (``epoch`` None), else the one kept
    after ``epoch``."""
    path = result.best_path if epoch is None else result.epoch_paths.get(epoch)
    if path is None:
        raise DataError(f"{folder}: no adapter after epoch {epoch} (the run finished before it was asked to keep "
                        f"one); to train it again, {REPLACE}")
    return path


def attempt_configs(cfg, lora_r: int, lora_targets: tuple[str, ...]) -> dict:
    """The report's two LoRA attempts, each changing **one** knob of the main configuration ``cfg``: the rank (alpha
    scaled with it, so that the update's scale alpha / r stays the main run's) and the adapted layers (rank and
    alpha kept). Then the LayerNorm ablation: the main configuration without the visual LayerNorm (an ablation of
    the projection, not a LoRA setting). ``{name: (what changed, config)}``."""
    scale = cfg.lora.alpha / cfg.lora.r
    alpha = scale * lora_r
    alpha = int(alpha) if float(alpha).is_integer() else alpha
    main_targets = ",".join(cfg.lora.targets)
    return {
        "attempt 1": (f"rank {cfg.lora.r} -> {lora_r} (alpha {cfg.lora.alpha} -> {alpha}: alpha / r kept)",
                      replace(cfg, lora=replace(cfg.lora, r=lora_r, alpha=alpha))),
        "attempt 2": (f"targets {main_targets} -> {','.join(lora_targets)}",
                      replace(cfg, lora=replace(cfg.lora, targets=tuple(lora_targets)))),
        "ablation": ("no visual LayerNorm (not a LoRA setting)", replace(cfg, visual_norm=False))}


def attempt_row(name: str, changed: str, cfg, params: int, epochs: int, scores) -> dict:
    """One row of the LoRA attempts table: a column for every knob, then the whole-val-split scores."""
    lora = cfg.lora
    return {"run": name, "changed": changed, "LoRA r": lora.r, "alpha": lora.alpha, "alpha / r": lora.alpha / lora.r,
            "dropout": lora.dropout, "targets": ", ".join(lora.targets), "visual norm": cfg.visual_norm,
            "trainable params": params, "epochs": epochs, "val CIDEr": scores.cider, "val CLIPScore": scores.clipscore}


def attempt_metrics(rows: list[dict]) -> list[dict]:
    """The attempts table as ``metrics.json`` keeps it: the same rows, with names for keys (``LoRA r`` -> ``lora_r``,
    ``alpha / r`` -> ``alpha_over_r``, ``val CIDEr`` -> ``val_cider`` ...)."""
    keys = {"LoRA r": "lora_r", "alpha / r": "alpha_over_r", "val CIDEr": "val_cider", "val CLIPScore": "val_clipscore"}
    return [{keys.get(k, k.replace(" ", "_")): v for k, v in row.items()} for row in rows]
