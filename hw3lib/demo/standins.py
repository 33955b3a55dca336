"""Stand-in models for the demo profile, trained on the shapes world and saved in the real models' formats.

=============  =====================================  ==================================================
stand-in       real model it replaces                  format (loaded by the same code as the real one)
=============  =====================================  ==================================================
``decoder/``   the course's GPT-2 decoder + tokenizer  ``decoder_model.bin`` (Conv1D layout), ``encoder.json``,
                                                       ``vocab.bpe``
``vit/``       a timm ViT (the captioner's encoder)    timm ``config.json`` + ``model.safetensors``
                                                       (``timm.create_model("local-dir:...")``)
``clip/``      CLIP ViT-B/32 for CLIPScore             ``open_clip_config.json`` + ``open_clip_model.safetensors``
                                                       (``open_clip.create_model("local-dir:...")``)
=============  =====================================  ==================================================

Each trainer is short and seeded; ``hw3 demo-data --rebuild`` runs them all (minutes on 2 CPU cores) and each
writes ``train_log.json`` with what it reached, next to its weights.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import load_annotations, load_image, write_json_atomic
from ..train import warmup_cosine
from .world import COLORS, SHAPES, load_masks, random_scenes

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "data" / "demo" / "models"


def _pixels(paths: list[Path], mean: float = 0.5, std: float = 0.5) -> torch.Tensor:
    arr = np.stack([np.asarray(load_image(p), dtype=np.float32) / 255.0 for p in paths])
    return (torch.from_numpy(arr).permute(0, 3, 1, 2) - mean) / std  # (N, 3, H, W)


def _split(world: Path, name: str):
    p2 = world / "p2_data"
    refs = load_annotations(p2 / f"{name}.json")
    paths = [p2 / "images" / name / f"{k}.jpg" for k in refs]
    return list(refs), paths, refs


# ---------------------------------------------------------------------------------------- tokenizer + decoder
def build_tokenizer(world: Path, out: Path, vocab_size: int = 512) -> Path:
    """Train a GPT-2 byte-level BPE on the world's captions; write encoder.json + vocab.bpe (GPT-2's formats,
    ``<|endoftext|>`` last as in GPT-2)."""
    from tokenizers import ByteLevelBPETokenizer

    _, _, refs = _split(world, "train")
    tok = ByteLevelBPETokenizer(add_prefix_space=False)
    tok.train_from_iterator([c for caps in refs.values() for c in caps], vocab_size=vocab_size, min_frequency=2,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    model = json.loads(tok.to_str())["model"]
    vocab = sorted(((t, i) for t, i in model["vocab"].items() if t != "<|endoftext|>"), key=lambda x: x[1])
    encoder = {t: n for n, (t, _) in enumerate(vocab)}
    encoder["<|endoftext|>"] = len(encoder)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    out.mkdir(parents=True, exist_ok=True)
    (out / "encoder.json").write_text(json.dumps(encoder, ensure_ascii=False))
    (out / "vocab.bpe").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return out


def build_decoder(world: Path, out: Path, steps: int = 800, batch_size: int = 64, seed: int = 0, n_layer: int = 3,
                  n_embd: int = 192, device: str | None = None) -> dict:
    """A small GPT-2 trained as a language model on the captions, at random position offsets (the captioner puts
    its visual tokens first, and a real GPT-2 has trained every position). Saved as ``decoder_model.bin``.

    3 layers of width 192 (head size 64, as GPT-2): the captions' language needs no more (4 x 256 and 2 x 128 reach
    the same validation loss), and every step of the captioner's training runs this decoder on the CPU."""
    from ..decoder import Decoder, DecoderConfig, save_checkpoint
    from ..tokenizer import BPETokenizer

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    build_tokenizer(world, out)
    tok = BPETokenizer(out / "encoder.json", out / "vocab.bpe")
    cfg = DecoderConfig(n_layer=n_layer, n_head=n_embd // 64, n_embd=n_embd, vocab_size=tok.vocab_size, block_size=256)
    device = torch.device(device or "cpu")
    model = Decoder(cfg).to(device)
    seqs = {s: [tok.encode_caption(c) for caps in _split(world, s)[2].values() for c in caps] for s in ("train", "val")}

    def batch(split: str, idx) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = [seqs[split][i] for i in idx]
        T = max(map(len, rows))
        ids = torch.full((len(rows), T), tok.eot_id)
        targets = torch.full((len(rows), T), -100)
        for r, s in enumerate(rows):
            ids[r, : len(s)] = torch.tensor(s)
            targets[r, : len(s) - 1] = torch.tensor(s[1:])
        # half the rows at position 0 (plain LM), half after a random prefix length
        offs = torch.from_numpy(rng.integers(0, cfg.block_size - T, size=len(rows)) * (rng.random(len(rows)) < 0.5))
        return ids, targets, offs

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, steps, steps // 20))
    t0, log = time.time(), []
    model.train()
    for step in range(steps):
        ids, targets, offs = batch("train", rng.integers(0, len(seqs["train"]), batch_size))
        loss = model(ids.to(device), targets=targets.to(device), position_offset=offs.to(device)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log.append((step, round(loss.item(), 4)))
            print(f"  decoder step {step:5d} loss {loss.item():.3f}  ({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    with torch.no_grad():
        val = []
        for i in range(0, len(seqs["val"]), 256):
            ids, targets, _ = batch("val", range(i, min(i + 256, len(seqs["val"]))))
            val.append(model(ids.to(device), targets=targets.to(device)).loss.item())
        ids, targets, _ = batch("val", range(256))
        val_far = model(ids.to(device), targets=targets.to(device),
                        position_offset=cfg.block_size - ids.shape[1]).loss.item()
    model.cpu()
    save_checkpoint(model, out / "decoder_model.bin")
    info = {"config": cfg.__dict__, "steps": steps, "batch_size": batch_size, "train_loss": log,
            "val_loss": float(np.mean(val)), "val_loss_last_positions": val_far, "seconds": round(time.time() - t0)}
    write_json_atomic(out / "train_log.json", info)
    return info


# ------------------------------------------------------------------------------------------------------- ViT
VIT_ARGS = dict(img_size=96, patch_size=8, embed_dim=192, depth=4, num_heads=3, num_classes=0)


def _patch_targets(masks: list[np.ndarray], objects: list[list[dict]], patch: int) -> tuple[torch.Tensor, ...]:
    """Per-patch colour and shape class (0 = background) from the label maps: a patch belongs to the object
    that covers at least a quarter of it."""
    colours, shapes = list(COLORS), list(SHAPES)
    n, H, W = len(masks), masks[0].shape[0] // patch, masks[0].shape[1] // patch
    col = torch.zeros(n, H * W, dtype=torch.long)
    shp = torch.zeros(n, H * W, dtype=torch.long)
    present = torch.zeros(n, len(colours) * len(shapes))
    for i, (lab, objs) in enumerate(zip(masks, objects)):
        blocks = lab.reshape(H, patch, W, patch).transpose(0, 2, 1, 3).reshape(H * W, patch * patch)
        for k, o in enumerate(objs, start=1):
            hit = torch.from_numpy((blocks == k).sum(1) >= patch * patch // 4)
            col[i][hit] = colours.index(o["color"]) + 1
            shp[i][hit] = shapes.index(o["shape"]) + 1
            present[i, colours.index(o["color"]) * len(shapes) + shapes.index(o["shape"])] = 1
    return col, shp, present


def _scene_chunk(args: tuple[int, int]):
    n, seed = args
    return random_scenes(n, seed=seed)


def fresh_scenes(n: int, seed: int, chunk: int = 250) -> tuple[list, list, list]:
    """``n`` new scenes, drawn in parallel processes; the result does not depend on the number of processes."""
    import os
    from concurrent.futures import ProcessPoolExecutor

    jobs = [(min(chunk, n - i), seed * 10_000 + i // chunk) for i in range(0, n, chunk)]
    with ProcessPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as pool:
        parts = list(pool.map(_scene_chunk, jobs))
    return tuple([x for part in parts for x in part[k]] for k in range(3))


def build_vit(world: Path, out: Path, epochs: int = 30, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
              device: str | None = None) -> dict:
    """A small timm ViT (patch 8 at 96 px: a 12 x 12 grid) trained to label every patch token with the colour and
    shape of the object under it, and the CLS token with the scene's (colour, shape) set. The per-patch objective
    keeps spatial information in the patch tokens, which the captioner and its attention maps need. The first epoch
    sees the train split, every later one as many freshly drawn scenes of the same world (never the val split):
    shapes, unlike colours, need many scenes and epochs. About 2 minutes on one GPU, 35 on 2 CPU cores."""
    import timm
    from timm.models import save_for_hf

    from .world import load_objects

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **VIT_ARGS)
    D, P = model.embed_dim, VIT_ARGS["patch_size"]
    heads = nn.ModuleDict(dict(color=nn.Linear(D, len(COLORS) + 1), shape=nn.Linear(D, len(SHAPES) + 1),
                               scene=nn.Linear(D, len(COLORS) * len(SHAPES))))
    data = {}
    for split in ("train", "val"):
        ids, paths, _ = _split(world, split)
        masks = load_masks(world / "p2_data" / f"{split}_masks.npz")
        objs = load_objects(world / "p2_data" / f"{split}_objects.json")
        data[split] = (_pixels(paths), *_patch_targets([masks[k] for k in ids], [objs[k] for k in ids], P))

    def fresh(epoch: int):
        """New scenes every epoch after the first: a ViT from scratch is data-hungry, and the world is free."""
        images, labels, objs = fresh_scenes(len(data["train"][0]), seed=1000 * (seed + 1) + epoch)
        x = (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5
        return (x, *_patch_targets(labels, objs, P))

    def losses(x, col, shp, present):
        tokens = model.forward_features(x)  # (B, 1 + N, D)
        patches = tokens[:, model.num_prefix_tokens:]
        lc = F.cross_entropy(heads["color"](patches).flatten(0, 1), col.flatten())
        ls = F.cross_entropy(heads["shape"](patches).flatten(0, 1), shp.flatten())
        lg = F.binary_cross_entropy_with_logits(heads["scene"](tokens[:, 0]), present)
        return lc + ls + lg, patches

    model.to(device)
    heads.to(device)
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    n = len(data["train"][0])
    steps = epochs * (n // batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, steps, steps // 10))
    g = torch.Generator().manual_seed(seed)
    t0, step, log = time.time(), 0, []
    for epoch in range(epochs):
        model.train()
        train = data["train"] if epoch == 0 else fresh(epoch)
        perm = torch.randperm(n, generator=g)
        for b in range(n // batch_size):
            idx = perm[b * batch_size : (b + 1) * batch_size]
            x = train[0][idx]
            if torch.rand(1, generator=g) < 0.5:  # flips keep every label valid
                x = x.flip(-1)
                grid = VIT_ARGS["img_size"] // P
                col, shp = (t[idx].view(-1, grid, grid).flip(-1).reshape(len(idx), -1) for t in train[1:3])
            else:
                col, shp = train[1][idx], train[2][idx]
            loss, _ = losses(x.to(device), col.to(device), shp.to(device), train[3][idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
        acc = vit_patch_accuracy(model, heads, data["val"])
        log.append({"epoch": epoch, "loss": round(loss.item(), 4), **acc})
        print(f"  vit epoch {epoch} loss {loss.item():.3f} val {acc}  ({time.time() - t0:.0f}s)", flush=True)
    model.eval().cpu()
    model.pretrained_cfg = {**model.pretrained_cfg, "tag": "shapes_world", "license": "same as this repository",
                            "input_size": (3, 96, 96), "crop_pct": 1.0, "mean": (0.5,) * 3, "std": (0.5,) * 3,
                            "interpolation": "bicubic", "num_classes": 0}
    save_for_hf(model, out, model_args=VIT_ARGS, safe_serialization=True)
    info = {"model_args": VIT_ARGS, "epochs": epochs, "log": log, "seconds": round(time.time() - t0),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    write_json_atomic(out / "train_log.json", info)
    return info


@torch.no_grad()
def vit_patch_accuracy(model, heads, split) -> dict:
    """Per-patch colour / shape accuracy on object patches (background excluded)."""
    model.eval()
    x, col, shp, _ = split
    dev = next(model.parameters()).device
    pc, ps = [], []
    for i in range(0, len(x), 256):
        patches = model.forward_features(x[i : i + 256].to(dev))[:, model.num_prefix_tokens:]
        pc.append(heads["color"](patches).argmax(-1))
        ps.append(heads["shape"](patches).argmax(-1))
    pc, ps = torch.cat(pc).cpu(), torch.cat(ps).cpu()
    obj = col > 0
    return {"color_acc": round((pc[obj] == col[obj]).float().mean().item(), 4),
            "shape_acc": round((ps[obj] == shp[obj]).float().mean().item(), 4)}


# ------------------------------------------------------------------------------------------------------ CLIP
CLIP_CFG = {
    "embed_dim": 128,
    "quick_gelu": True,  # as the OpenAI ViT-B-32 CLIPScore uses
    "vision_cfg": {"image_size": 96, "layers": 4, "width": 128, "head_width": 32, "patch_size": 12},
    # context 32 (not 77): the world's captions are < 25 words, and the text tower costs 2.4x less
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 96, "heads": 4, "layers": 3},
}


def build_clip(world: Path, out: Path, epochs: int = 10, batch_size: int = 128, lr: float = 1e-3,
               seed: int = 0) -> dict:
    """A small CLIP (open_clip's architecture and tokenizer) trained contrastively on (image, caption) pairs of the
    world; saved in the open_clip hub format (fp16 weights to keep the repository small)."""
    import open_clip
    from open_clip.loss import ClipLoss
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = open_clip.CLIP(**{k: v for k, v in CLIP_CFG.items()})
    context = CLIP_CFG["text_cfg"]["context_length"]
    tokenizer = open_clip.get_tokenizer("ViT-B-32-quickgelu", context_length=context)
    ids, paths, refs = _split(world, "train")
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    x_all = (_pixels(paths, 0.0, 1.0) - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    captions = [refs[k] for k in ids]
    loss_fn = ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    n = len(ids)
    steps = epochs * (n // batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, steps, steps // 10))
    t0, log = time.time(), []
    for epoch in range(epochs):
        model.train()
        perm = rng.permutation(n)
        for b in range(n // batch_size):
            idx = perm[b * batch_size : (b + 1) * batch_size]
            text = tokenizer([captions[i][rng.integers(len(captions[i]))] for i in idx])
            img_f, txt_f, scale = model(x_all[idx], text)
            loss = loss_fn(img_f, txt_f, scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
        log.append((epoch, round(loss.item(), 4)))
        print(f"  clip epoch {epoch} loss {loss.item():.3f}  ({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, out / "open_clip_model.safetensors")
    (out / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": CLIP_CFG,
        "preprocess_cfg": {"mean": list(mean), "std": list(std), "interpolation": "bicubic", "resize_mode": "shortest"},
    }, indent=2))
    info = {"model_cfg": CLIP_CFG, "epochs": epochs, "loss": log, "seconds": round(time.time() - t0)}
    write_json_atomic(out / "train_log.json", info)
    return info


def build_all(world: Path, out: Path = DEFAULT_DIR,
              which: tuple[str, ...] = ("decoder", "vit", "clip", "llava")) -> dict:
    from .llava_standin import build_llava

    builders = {"decoder": build_decoder, "vit": build_vit, "clip": build_clip, "llava": build_llava}
    report = {}
    for name in which:
        print(f"training the {name} stand-in ...", flush=True)
        t0 = time.time()
        report[name] = builders[name](Path(world), Path(out) / name)
        print(f"  {name}: {time.time() - t0:.0f}s", flush=True)
    return report
