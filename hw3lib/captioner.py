"""The P2 captioner: a frozen timm ViT, a trainable projection, and the course's GPT-2 decoder adapted with LoRA.

    image -> ViT (frozen) -> patch tokens (+ CLS) -> projection (+ LayerNorm) -> visual tokens
    [visual tokens] <|endoftext|> caption <|endoftext|>  -> GPT-2 with LoRA -> next-token loss on the caption only

Follows the ClipCap / "prefix" recipe (Mokady et al., 2021) with LoRA (Hu et al., 2021). LoRA layers are built
inside the decoder *before* the course checkpoint is loaded, so the frozen base keeps its weights. Projected
visual tokens are layer-normalised with a gain set to the scale of GPT-2's token embeddings: raw ViT features are
an order of magnitude larger than text embeddings, which drowns the text in every report that missed it.

Only the projection and the LoRA weights train; :func:`save_adapter` stores exactly those (safetensors) with the
JSON of the config that built them.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import DataError, Record, atomic_path, list_images, read_json
from .captioner_decoding import CaptionerGeneration, Generated, generate
from .decoder import Decoder, LoraConfig
from .tokenizer import BPETokenizer


@dataclass
class EncoderConfig:
    name: str = "vit_large_patch14_clip_224.openai_ft_in12k_in1k"  # timm name, "local-dir:PATH" or a timm folder
    checkpoint: str = ""  # a local weights file for `name` ("" = the timm cache / hub, or the folder's weights)
    random_weights: bool = False  # the architecture without weights: benchmarks and dry runs
    use_cls: bool = True  # keep the CLS token next to the patch tokens
    pool: int = 1  # average-pool the patch grid by this factor (2: a 12 x 12 grid becomes 6 x 6): fewer tokens


@dataclass
class CaptionerConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder_checkpoint: str = "hw3_data/p2_data/decoder_model.bin"  # the course's GPT-2 weights
    encoder_json: str = "hw3_data/p2_data/encoder.json"  # the course's tokenizer files
    vocab_bpe: str = "hw3_data/p2_data/vocab.bpe"
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(r=16, alpha=32, targets=("c_attn", "c_fc")))
    projection: str = "mlp"  # "linear" or "mlp" (Linear-GELU-Linear)
    visual_norm: bool = True  # LayerNorm the visual tokens to the scale of the text embeddings
    max_caption_tokens: int = 40  # longer training captions are cut

    @classmethod
    def from_dict(cls, d: dict) -> "CaptionerConfig":
        d = dict(d)
        encoder = EncoderConfig(**d.pop("encoder", {}))
        lora = d.pop("lora", {})
        lora = LoraConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in lora.items()})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown captioner config keys {sorted(unknown)}")
        return cls(encoder=encoder, lora=lora, **d)


def _check_timm_folder(folder: Path) -> None:
    """A timm folder holds a ``config.json`` that names its ``architecture``; a transformers model (LLaVA, CLIP)
    names ``architectures`` or ``model_type`` instead. Say which it is, rather than timm's ``KeyError``."""
    config = folder / "config.json"
    if not config.is_file():
        raise DataError(f"{folder}: not a timm encoder folder (no config.json; timm's holds 'architecture')")
    try:
        raw = json.loads(config.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{config}: cannot read it ({e})") from None
    if not isinstance(raw, dict) or "architecture" not in raw:
        other = (raw.get("architectures") or [raw.get("model_type")])[0] if isinstance(raw, dict) else None
        what = f"a transformers model ({other})" if other else "not timm's config"
        raise DataError(f"{folder}: not a timm encoder folder: its config.json is {what}, with no 'architecture'. "
                        f"The encoder is a timm model name or a folder that timm saved (e.g. data/demo/models/vit)")


def create_encoder(cfg: EncoderConfig):
    """The frozen timm encoder with its preprocessing. Returns ``(model, transform)``.

    ``name`` may be a timm model name (weights from the timm cache or the hub), ``local-dir:PATH`` or a folder with
    timm's ``config.json`` + weights (the demo stand-in), optionally with ``checkpoint`` as a local weights file.
    """
    import timm
    from timm.data import create_transform, resolve_data_config

    from . import hub

    name, cache_only = cfg.name, False
    folder = hub.local_folder(name)
    if folder is not None:
        if not folder.is_dir():
            raise DataError(f"{folder}: timm encoder folder not found")
        if not cfg.name.startswith("local-dir:"):  # timm's own spelling is taken as it is
            _check_timm_folder(folder)
        name = f"local-dir:{folder}"
    elif not cfg.random_weights and not cfg.checkpoint:
        spec = hub.timm_files(name)  # refuses a name that timm does not know
        cache_only = hub.ensure_available(spec) if spec is not None else False
    kwargs = dict(pretrained=not cfg.random_weights, num_classes=0)
    if cfg.checkpoint and not cfg.random_weights:
        if not Path(cfg.checkpoint).is_file():
            raise FileNotFoundError(f"{cfg.checkpoint}: encoder weights file not found")
        kwargs["pretrained_cfg_overlay"] = dict(file=cfg.checkpoint)
    if cfg.random_weights:
        torch.manual_seed(0)  # the same "random" encoder every time: a dry run trains and captions with one encoder
    try:
        with hub.cache_only(cache_only):
            model = timm.create_model(name, **kwargs)
    except Exception as e:  # timm raises RuntimeError / OSError / hub errors
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise DataError(f"could not create the timm encoder {cfg.name!r}: {type(e).__name__}: {first}. "
                           f"Offline? {hub.DOWNLOAD_HINT}") from None
    model.eval().requires_grad_(False)
    rows, cols = encoder_grid(model)
    if rows % cfg.pool or cols % cfg.pool:
        divisors = [d for d in range(1, rows + 1) if rows % d == 0 and cols % d == 0]
        raise DataError(f"pool {cfg.pool} does not divide the {rows} x {cols} patch grid of {cfg.name!r} "
                        f"(use one of {divisors})")
    transform = create_transform(**resolve_data_config(model=model), is_training=False)
    return model, transform


def encoder_grid(model) -> tuple[int, int]:
    """(rows, cols) of the encoder's patch grid."""
    return tuple(model.patch_embed.grid_size)


@torch.no_grad()
def encode_images(encoder, pixel_values: torch.Tensor, cfg: EncoderConfig) -> torch.Tensor:
    """Visual features the projection consumes: (B, [CLS] + grid tokens, D)."""
    tokens = encoder.forward_features(pixel_values)  # (B, prefix + H*W, D), final norm applied
    n_prefix = getattr(encoder, "num_prefix_tokens", 1)
    patches = tokens[:, n_prefix:]
    if cfg.pool > 1:
        H, W = encoder_grid(encoder)
        grid = patches.transpose(1, 2).reshape(len(patches), -1, H, W)
        patches = F.avg_pool2d(grid, cfg.pool).flatten(2).transpose(1, 2)
    return torch.cat([tokens[:, :1], patches], 1) if cfg.use_cls else patches


class Captioner(nn.Module):
    """Projection + LoRA decoder over visual features (the frozen encoder lives outside, see :func:`build`)."""

    def __init__(self, cfg: CaptionerConfig, encoder_dim: int, decoder: Decoder, tokenizer: BPETokenizer):
        super().__init__()
        self.cfg, self.tokenizer, self.decoder, self.encoder_dim = cfg, tokenizer, decoder, encoder_dim
        C = decoder.cfg.n_embd
        if cfg.projection == "linear":
            self.proj = nn.Linear(encoder_dim, C)
        elif cfg.projection == "mlp":
            self.proj = nn.Sequential(nn.Linear(encoder_dim, C), nn.GELU(), nn.Linear(C, C))
        else:
            raise ValueError(f"projection must be 'linear' or 'mlp', got {cfg.projection!r}")
        self.visual_norm = nn.LayerNorm(C) if cfg.visual_norm else nn.Identity()
        if cfg.visual_norm:  # gain = the per-dimension RMS of the text embeddings
            with torch.no_grad():
                self.visual_norm.weight.fill_(decoder.transformer.wte.weight.pow(2).mean().sqrt().item())
        self.freeze()

    def freeze(self) -> None:
        """Only the projection, the visual norm and LoRA weights train."""
        for name, p in self.named_parameters():
            p.requires_grad = name.startswith(("proj.", "visual_norm.")) or ".lora_" in name

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def visual_tokens(self, features: torch.Tensor) -> torch.Tensor:
        return self.visual_norm(self.proj(features.to(self.proj_dtype)))

    @property
    def proj_dtype(self) -> torch.dtype:
        return next(self.proj.parameters()).dtype

    def forward(self, features: torch.Tensor, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                output_attentions: bool = False):
        """``features`` (B, V, D) from :func:`encode_images`; ``input_ids`` (B, T) = ``<eot> caption``; ``targets``
        (B, T) = ``caption <eot>`` with -100 on padding. The loss covers the caption tokens only."""
        vis = self.visual_tokens(features)
        x = torch.cat([vis, self.decoder.embed(input_ids)], 1)
        full_targets = None
        if targets is not None:
            full_targets = torch.cat([targets.new_full(vis.shape[:2], -100), targets], 1)
        return self.decoder(inputs_embeds=x, targets=full_targets, output_attentions=output_attentions)

    def forward_shared(self, features: torch.Tensor, image_index: torch.Tensor, input_ids: torch.Tensor,
                       targets: torch.Tensor):
        """The same loss as :meth:`forward` for several captions per image, computing each image's visual prefix
        once: the prefix comes first and attention is causal, so its keys and values do not depend on the caption.

        Args:
            features: (B, V, D), one row per image.
            image_index: (N,) the image of each caption.
            input_ids, targets: (N, T) as in :meth:`forward`.
        """
        prefix = self.decoder(inputs_embeds=self.visual_tokens(features), logits=False)
        past = [(k[image_index], v[image_index]) for k, v in prefix.past_key_values]
        return self.decoder(input_ids, targets=targets, past_key_values=past)

    def caption_tokens(self, caption: str) -> list[int]:
        """A caption's token ids as training sees them (at most ``max_caption_tokens``)."""
        return self.tokenizer.encode(caption)[: self.cfg.max_caption_tokens]

    def batch_captions(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, targets)`` for captions, right-padded (targets -100 on padding)."""
        return self.batch_tokens([self.caption_tokens(c) for c in captions])

    def batch_tokens(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The same from token ids (:meth:`caption_tokens`): training tokenises every reference once."""
        eot = self.tokenizer.eot_id
        T = max(map(len, seqs)) + 1
        ids = torch.full((len(seqs), T), eot, dtype=torch.long)
        targets = torch.full((len(seqs), T), -100, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, 1 : len(s) + 1] = torch.tensor(s, dtype=torch.long)
            targets[i, : len(s) + 1] = torch.tensor(s + [eot], dtype=torch.long)
        return ids, targets

    # ------------------------------------------------------------------------------------------------- decoding
    def generate(self, features: torch.Tensor, gen: CaptionerGeneration = CaptionerGeneration(),
                 output_attentions: bool = False) -> Generated:
        """Captions for a batch of visual features: :func:`hw3lib.captioner_decoding.generate`."""
        return generate(self, features, gen, output_attentions)


# ---------------------------------------------------------------------------------------------- build / save / load
def build(cfg: CaptionerConfig, with_encoder: bool = True, decoder_checkpoint: str | None = None,
          encoder_dim: int | None = None, seed: int = 0):
    """The captioner and (optionally) its frozen encoder + transform: ``(captioner, encoder, transform)``.

    LoRA layers are created inside the decoder before the checkpoint is loaded into it. Without the encoder,
    ``encoder_dim`` (its feature width) is needed to size the projection. The trained parameters (projection,
    LoRA's A) start from ``seed``: the same command gives the same run.
    """
    ckpt = decoder_checkpoint or cfg.decoder_checkpoint
    torch.manual_seed(seed)
    decoder = Decoder.from_checkpoint(ckpt, lora=cfg.lora)
    tokenizer = BPETokenizer(cfg.encoder_json, cfg.vocab_bpe)
    if tokenizer.vocab_size != decoder.cfg.vocab_size:
        raise ValueError(f"{cfg.encoder_json} has {tokenizer.vocab_size} tokens but {ckpt} embeds "
                         f"{decoder.cfg.vocab_size}: tokenizer and decoder do not belong together")
    encoder = transform = None
    if with_encoder:
        encoder, transform = create_encoder(cfg.encoder)
        dim = encoder.num_features
    else:
        if encoder_dim is None:
            raise ValueError("build(with_encoder=False) needs encoder_dim, the encoder's feature width")
        dim = encoder_dim
    torch.manual_seed(seed + 1)  # the projection's init does not depend on how (or whether) the encoder was made
    return Captioner(cfg, dim, decoder, tokenizer), encoder, transform


def trained_state_dict(model: Captioner) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_adapter(model: Captioner, path: str | Path, extra: dict | None = None) -> Path:
    """Write the trained parameters (``.safetensors``) and the config that built them (``.json``), atomically."""
    from safetensors.torch import save_file

    path = Path(path).with_suffix(".safetensors")
    meta = {"captioner": asdict(model.cfg), "encoder_dim": model.encoder_dim,
            "trainable_params": model.trainable_parameters(), **(extra or {})}
    with atomic_path(path) as tmp, atomic_path(path.with_suffix(".json")) as jtmp:
        save_file(trained_state_dict(model), str(tmp))
        jtmp.write_text(json.dumps(meta, indent=1))
    return path


def load_adapter(path: str | Path, decoder_checkpoint: str | None = None, with_encoder: bool = True,
                 overrides: dict | None = None):
    """Rebuild a captioner from ``save_adapter``'s files: ``(captioner, encoder, transform)``.

    Every trained key must be present with the right shape; the message names the key otherwise.
    """
    from safetensors.torch import load_file

    path = Path(path).with_suffix(".safetensors")
    meta_path = path.with_suffix(".json")
    for p in (path, meta_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: adapter file not found (an adapter is a .safetensors + .json pair)")
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or not isinstance(meta.get("captioner"), dict):
        raise DataError(f"{meta_path}: not an adapter description (no 'captioner' config; save_adapter writes it)")
    cfg_dict = meta["captioner"]
    if decoder_checkpoint:  # the course ships the tokenizer beside the decoder: prefer those files
        folder = Path(decoder_checkpoint).parent
        if (folder / "encoder.json").is_file() and (folder / "vocab.bpe").is_file():
            cfg_dict.update(encoder_json=str(folder / "encoder.json"), vocab_bpe=str(folder / "vocab.bpe"))
    for k, v in (overrides or {}).items():
        cfg_dict[k] = v
    try:
        cfg = CaptionerConfig.from_dict(cfg_dict)
    except (TypeError, ValueError) as e:
        raise DataError(f"{meta_path}: its 'captioner' config does not fit this version of hw3lib ({e})") from None
    model, encoder, transform = build(cfg, with_encoder, decoder_checkpoint, encoder_dim=meta.get("encoder_dim"))
    try:
        state = load_file(str(path))
    except Exception as e:  # noqa: BLE001 -- safetensors raises its own error type for torn or foreign files
        raise DataError(f"{path}: not a readable safetensors file (truncated or not an adapter): "
                        f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None
    expected = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: trained parameters do not match the config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ValueError(f"{path}: {k} has shape {tuple(v.shape)}, the model expects {tuple(expected[k].shape)}")
    model.load_state_dict(state, strict=False)
    return model.eval(), encoder, transform


def checked_trainable_count(model: Captioner, limit: int = 10_000_000) -> int:
    """The trainable-parameter count; raises when it reaches ``limit`` (the assignment's 10 M)."""
    n = model.trainable_parameters()
    if n >= limit:
        raise ValueError(f"{n:,} trainable parameters: the assignment allows fewer than {limit:,}. Lower the LoRA "
                         f"rank, use fewer LoRA targets or a linear projection")
    return n


def parameter_groups(model: Captioner, encoder=None) -> list[dict]:
    """Rows ``{group, parameters}``: the trainable ones by part (projection, LoRA of each target), their total,
    and the frozen rest (GPT-2, and the encoder when given)."""
    groups: dict[str, int] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = "projection" if name.startswith(("proj.", "visual_norm.")) else "LoRA " + name.split(".")[-3]
            groups[key] = groups.get(key, 0) + p.numel()
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    frozen += sum(p.numel() for p in encoder.parameters()) if encoder is not None else 0
    return ([{"group": k, "parameters": v} for k, v in groups.items()]
            + [{"group": "**trainable**", "parameters": model.trainable_parameters()},
               {"group": "frozen (ViT + GPT-2)" if encoder is not None else "frozen (GPT-2)", "parameters": frozen}])


def course_files(data_root: str | Path) -> dict[str, str]:
    """The course files of a ``hw3_data`` root: decoder checkpoint and tokenizer."""
    p2 = Path(data_root) / "p2_data"
    return {"decoder_checkpoint": str(p2 / "decoder_model.bin"), "encoder_json": str(p2 / "encoder.json"),
            "vocab_bpe": str(p2 / "vocab.bpe")}


@torch.no_grad()
def extract_features(encoder, transform, records: list[Record], enc_cfg, batch_size: int = 64, device="cpu",
                     num_workers: int | None = None, desc: str = "encoder features") -> torch.Tensor:
    """Run the frozen encoder once over ``records``: (N, V, D) features in float16 on the CPU.

    The images come from :func:`hw3lib.image_batches.image_batches`: on a GPU, ``num_workers`` threads (None: up to
    16) decode the JPEGs ahead and the GPU resizes them as Pillow does, the same pixels as ``transform``. Each batch
    is written into one tensor allocated at the first batch: no list of batches and no concatenation, which would
    hold the features twice (10,000 images at ViT-L/14 are 5.3 GB in float16)."""
    from .image_batches import default_workers, image_batches

    device = torch.device(device)
    workers = default_workers(device) if num_workers is None else num_workers
    encoder.to(device).eval()
    out, filled = None, 0
    batches = image_batches(records, transform, batch_size, device, num_workers=workers)
    with tqdm(batches, desc=desc, total=-(-len(records) // batch_size), leave=False) as bar:
        for pixel_values in bar:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                batch = encode_images(encoder, pixel_values, enc_cfg).half()
            if out is None:
                out = torch.empty((len(records), *batch.shape[1:]), dtype=torch.float16)
            out[filled : filled + len(batch)].copy_(batch)
            filled += len(batch)
    return out if out is not None else torch.empty(0)


def caption_features(model: Captioner, features: torch.Tensor, gen: CaptionerGeneration, batch_size: int = 64,
                     device="cpu") -> list[str]:
    """Captions for pre-computed features, batched."""
    model.eval()
    out = []
    for i in range(0, len(features), batch_size):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda"):
            out.extend(model.generate(features[i : i + batch_size].to(device), gen).captions)
    return out


@torch.no_grad()
def caption_images(model: Captioner, encoder, transform, images_dir: str | Path,
                   gen: CaptionerGeneration = CaptionerGeneration(), batch_size: int = 64, device: str | None = None,
                   num_workers: int | None = None) -> dict[str, str]:
    """``{file id: caption}`` for every image of a folder (what the course's hw3_2.sh writes)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    records = list_images(images_dir)
    feats = extract_features(encoder, transform, records, model.cfg.encoder, batch_size, device, num_workers)
    model.to(device)
    captions = caption_features(model, feats, gen, batch_size, device)
    return {r.file_id: c for r, c in zip(records, captions)}
