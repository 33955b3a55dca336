"""Zero-shot captioning with LLaVA-1.5 (P1): load, prompt, caption a folder in batches, attention over the image.

The same calls serve ``llava-hf/llava-1.5-7b-hf`` and the demo's stand-in (``data/demo/models/llava``): both are a
``LlavaForConditionalGeneration`` and an ``AutoProcessor`` saved with ``save_pretrained``.

* Captioning is batched (left padding, images decoded by DataLoader workers) and resumable: every finished caption
  is appended to ``OUT.partial.jsonl``; a restarted run skips those images; the final JSON is written atomically.
* Attention of each generated token over the image is read from one teacher-forced pass with eager attention in
  the language model. The image positions are found from the image token id in ``input_ids`` -- never from fixed
  offsets, which move with the processor version, the prompt and the padding.
"""
from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .data import DataError, ImageDataset, Record, list_images, load_image, write_json_atomic

REAL_MODEL_ID = "llava-hf/llava-1.5-7b-hf"
DEFAULT_INSTRUCTION = "Describe this image in one sentence."


# --------------------------------------------------------------------------------------------------- settings
CACHES = ("dynamic", "static", "static+compile", "static+graphs")


@dataclass(frozen=True)
class LlavaGeneration:
    """A generation config for ``model.generate``: greedy (default), beam search, or seeded sampling."""

    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 30
    min_new_tokens: int = 0
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0
    seed: int = 0  # sampling only
    # KV cache: "dynamic" (grows by concatenation), "static" (preallocated), "static+compile" (transformers compiles
    # the decoding step), "static+graphs" (greedy: the one-token steps replayed from a CUDA graph, hw3lib.fast_greedy)
    cache: str = "dynamic"

    def __post_init__(self):
        if self.cache not in CACHES:
            raise ValueError(f"cache must be one of {', '.join(map(repr, CACHES))}, got {self.cache!r}")
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) is more than max_new_tokens "
                             f"({self.max_new_tokens}): no answer could satisfy both")
        if self.length_penalty != self.length_penalty or abs(self.length_penalty) == float("inf"):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty}")

    @classmethod
    def from_dict(cls, d: dict) -> "LlavaGeneration":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown generation setting(s) {sorted(unknown)}; "
                             f"known: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)

    def generate_kwargs(self) -> dict:
        kw = dict(max_new_tokens=self.max_new_tokens, min_new_tokens=self.min_new_tokens, num_beams=self.num_beams,
                  do_sample=self.do_sample, length_penalty=self.length_penalty,
                  repetition_penalty=self.repetition_penalty, no_repeat_ngram_size=self.no_repeat_ngram_size)
        if self.do_sample:
            kw.update(temperature=self.temperature, top_p=self.top_p, top_k=0)
        else:  # keep generation_config.json's sampling defaults from leaking into greedy / beam search
            kw.update(temperature=None, top_p=None, top_k=None)
        if self.num_beams > 1:
            kw["early_stopping"] = True
        if self.cache != "dynamic":  # a preallocated cache: no copy of the whole cache per step; compile is opt-in
            kw.update(cache_implementation="static", disable_compile=self.cache != "static+compile")
        return kw

    @property
    def label(self) -> str:
        if self.do_sample:
            name = f"sample T={self.temperature:g}" + (f" p={self.top_p:g}" if self.top_p < 1 else "")
        else:
            name = "greedy" if self.num_beams == 1 else f"beam {self.num_beams}"
        extras = [f"{k}={v}" for k, v in (("len_pen", self.length_penalty), ("no_repeat", self.no_repeat_ngram_size),
                                          ("rep_pen", self.repetition_penalty)) if v not in (1.0, 0)]
        extras += [self.cache] if self.cache != "dynamic" else []
        return " ".join([name, *extras])


def postprocess(text: str, first_sentence: bool = False) -> str:
    """Strip whitespace; optionally keep only the first sentence (up to and including its full stop)."""
    text = " ".join(text.split())
    if first_sentence:
        for i, ch in enumerate(text):
            if ch in ".!?" and (i + 1 == len(text) or text[i + 1] == " "):
                return text[: i + 1]
    return text


# --------------------------------------------------------------------------------------------------- loading
def _check_model_dir(path: Path, what: str) -> None:
    if not path.exists():
        raise DataError(f"{path}: {what} model folder not found (give a folder saved with save_pretrained, or a hub id "
                        f"such as {REAL_MODEL_ID})")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise DataError(f"{path}: not a saved transformers model (no config.json in this folder)")


def _check_llava_config(config_file: Path, name: str) -> None:
    """A LLaVA is expected: say so when the name holds another kind of model (a timm or CLIP folder, say)."""
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{name}: cannot read its config.json ({e})") from None
    kind = config.get("model_type") if isinstance(config, dict) else None
    if kind != "llava":
        found = f"model_type {kind!r}" if kind else ("a timm model" if "architecture" in config else "no model_type")
        raise DataError(f"{name}: not a LLaVA model (its config.json has {found}); expected a "
                        f"LlavaForConditionalGeneration such as {REAL_MODEL_ID}")


def _resolve(name: str, weights: bool = True, what: str = "LLaVA") -> tuple[str, bool]:
    """``(name, cache_only)`` for ``from_pretrained``: a local folder as it is, a hub id after checking the cache
    for its config (and ``weights``: every weights shard; see :mod:`hw3lib.hub`); anything else is refused with one
    line."""
    from . import hub

    if hub.is_local(name):
        path = Path(name).expanduser()
        _check_model_dir(path, what)
        _check_llava_config(path / "config.json", name)
        return str(path), False
    if not hub.is_hub_id(name):
        kind = hub.kind_of_name(name)
        if kind:
            raise DataError(f"{name}: a {kind} model (in the cache as timm/{name}), not a LLaVA; give a hub id "
                            f"such as {REAL_MODEL_ID} or a local folder")
        raise DataError(f"{name}: neither a local folder nor a hub id (owner/name, such as {REAL_MODEL_ID})")
    config_file = hub.cached_file(name, "config.json")
    if config_file is not None:  # the wrong kind of model is worth knowing before any missing file
        _check_llava_config(config_file, name)
    return name, hub.ensure_available(hub.transformers_files(name, what, weights))


def _from_pretrained(cls, name: str, cache_only: bool, **kw):
    """``cls.from_pretrained`` from a folder or through the Hugging Face cache; one-line errors naming ``name``."""
    from . import hub

    try:
        with hub.cache_only(cache_only):
            return cls.from_pretrained(name, **kw)
    except Exception as e:  # noqa: BLE001 -- OSError, ValueError, safetensors' and tokenizers' own errors ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{name}: cannot load it as a {cls.__name__} (missing, truncated or foreign files?): "
                        f"{first[:300]}") from None


def load_llava(model: str | Path = REAL_MODEL_ID, device: str | None = None, dtype: torch.dtype | None = None,
               load_in_4bit: bool = False, attn_implementation: str = "sdpa", fast_kernels: bool = False):
    """``(model, processor)`` ready for :func:`caption_records`.

    Args:
        model: a local folder or a hub id (the cache is tried first, so a downloaded model works offline).
        device: ``cuda`` when available, else ``cpu``. dtype: bf16 on CUDA, fp32 on the CPU.
        load_in_4bit: quantise the language model with bitsandbytes (GPU only).
        fast_kernels: Liger's fused kernels in the prefill (:func:`use_fast_kernels`), where installed, on a GPU.

    Random weights at the real architecture (benchmarks, dry runs) are :func:`hw3lib.rehearsal.weights.random_llava`.
    """
    name = str(model)
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    resolved = _resolve(name)  # a folder, or a hub id with its cached files checked (all shards) when offline
    processor = _from_pretrained(AutoProcessor, *resolved)
    processor.tokenizer.padding_side = "left"
    kw: dict = {"dtype": dtype, "attn_implementation": attn_implementation}
    if load_in_4bit:
        try:
            from transformers import BitsAndBytesConfig
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise RuntimeError("load_in_4bit needs bitsandbytes: pip install bitsandbytes") from None
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype)
        kw["device_map"] = {"": device}
    net = _from_pretrained(LlavaForConditionalGeneration, *resolved, **kw)
    if not load_in_4bit:
        net.to(device)
    net.eval()
    if fast_kernels and not load_in_4bit and not use_fast_kernels(net):
        warnings.warn("fast_kernels: liger-kernel is not installed (pip install liger-kernel) or the model is not "
                      "on a GPU; PyTorch's kernels are used", stacklevel=2)
    return net, processor


def use_fast_kernels(model) -> bool:
    """Liger's fused Triton kernels for the language model's RMSNorm, rotary embedding and SwiGLU MLP in the
    prefill (``pip install liger-kernel``; CUDA only). The prefill, most of captioning's time, is then a fifth
    shorter (docs/benchmarks.md). The one-token decoding steps keep PyTorch's kernels: they are bound by kernel
    launches, and Triton's launches cost more, by my reading (with Liger there too, decoding was 20 % and 70 %
    slower in two calls on an H100; docs/benchmarks.md has the spread, which is not profiled).
    Returns False, changing nothing, without a GPU model, a Llama language model or the package.

    Liger's rotary function replaces Llama's in ``transformers.models.llama`` for the whole process (prompts go to
    it, single tokens to the original), and its kernels round differently from PyTorch's in bf16, so a caption may
    differ in a late token."""
    if _device_of(model).type != "cuda" or model.config.text_config.model_type != "llama":
        return False
    import logging

    # Liger lists the optional backends it cannot load (CuTe DSL, Ascend) as warnings on import; none is used here
    logging.getLogger("liger_kernel.backends.registry").setLevel(logging.ERROR)
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
    except ImportError:
        return False
    from transformers.models.llama import modeling_llama

    language_model = model.model.language_model
    original_rope = _original_rope.setdefault("llama", modeling_llama.apply_rotary_pos_emb)
    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=False, model=language_model)
    liger_rope = modeling_llama.apply_rotary_pos_emb

    def rope(q, k, cos, sin, *args, **kwargs):  # q: (batch, heads, tokens, head dim)
        return (liger_rope if q.shape[2] > 1 else original_rope)(q, k, cos, sin, *args, **kwargs)

    modeling_llama.apply_rotary_pos_emb = rope
    for layer in language_model.layers:
        for module in (layer.mlp, layer.input_layernorm, layer.post_attention_layernorm):
            _prompt_only(module)
    _prompt_only(language_model.norm)
    return True


_original_rope: dict = {}


def _prompt_only(module) -> None:
    """``module`` runs Liger's forward (bound to it by Liger) on prompts and its class's own on single tokens."""
    fast, own = module.forward, type(module).forward.__get__(module)
    module.forward = lambda x, *a, **kw: (fast if x.shape[-2] > 1 else own)(x, *a, **kw)


def build_prompt(processor, instruction: str) -> str:
    """The llava-1.5 conversation for one image and one instruction, through the processor's chat template
    (``USER: <image>\\n{instruction} ASSISTANT:``)."""
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(conversation, add_generation_prompt=True)
    return f"USER: {processor.image_token}\n{instruction} ASSISTANT:"


# --------------------------------------------------------------------------------------------------- captioning
class _Collate:
    """Runs in the DataLoader workers: image preprocessing + tokenisation of one batch."""

    def __init__(self, processor, prompt: str, dtype: torch.dtype = torch.float32):
        self.processor, self.prompt, self.dtype = processor, prompt, dtype

    def __call__(self, batch):
        images, index = zip(*batch)
        enc = dict(self.processor(images=list(images), text=[self.prompt] * len(images), padding=True,
                                  return_tensors="pt"))
        enc["pixel_values"] = enc["pixel_values"].to(self.dtype)  # the model's: half the bytes to pass on in bf16
        return enc, list(index)


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def generate(model, enc: dict, generation: LlavaGeneration, pad_token_id: int,
             prompt_once: bool = True) -> torch.Tensor:
    """``model.generate`` on one preprocessed batch: the prompts and the new tokens, ``(B, prompt + new)``.

    Beam search runs the prompt (image included) once per image, not once per beam: a forward pass over every
    prompt but its last token fills a KV cache, handed to ``generate``, which computes the last prompt token and
    the beams as it always does. So the captions are transformers' own beam search (the tests compare them) at a
    third of the prefill for 3 beams. With ``prompt_once`` (the default) the prompt's keys and values then stay
    once per image (``hw3lib.beam_kv``): a step copies and reorders only the generated positions. Without it, the
    cache is repeated for the beams, and every step grows and reorders the whole of it."""
    from .rehearsal.answers import logits_processors

    kw = {**generation.generate_kwargs(), **logits_processors(model, enc["input_ids"].shape[1])}
    if generation.cache == "static+graphs":
        from hw3lib import fast_greedy

        if fast_greedy.supported(model, generation):
            return fast_greedy.greedy(model, enc, generation, pad_token_id)
    if generation.num_beams == 1 or generation.do_sample:
        return model.generate(**enc, **kw, pad_token_id=pad_token_id)
    import inspect

    from transformers import DynamicCache

    from hw3lib import beam_kv

    # the cache argument is "cache" from transformers 5.2x, "past_key_values" before
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = DynamicCache(config=model.config)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # as generate() numbers left-padded prompts
    model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
          pixel_values=enc["pixel_values"], use_cache=True, logits_to_keep=1, **{name: cache})  # fills the cache
    kw = {k: v for k, v in kw.items() if k not in ("cache_implementation", "disable_compile")}
    if not prompt_once:
        cache.batch_repeat_interleave(generation.num_beams)  # row i's cache for its beams i*K .. i*K + K - 1
        return model.generate(input_ids=ids, attention_mask=mask, **{name: cache}, **kw, pad_token_id=pad_token_id)
    beam_kv.attach(cache, mask[:, :-1], generation.num_beams, generation.max_new_tokens)
    with beam_kv.attention_for(model, cache):
        return model.generate(input_ids=ids, attention_mask=mask, **{name: cache}, **kw, pad_token_id=pad_token_id)


@torch.inference_mode()
def caption_records(model, processor, records: list[Record], instruction: str = DEFAULT_INSTRUCTION,
                    generation: LlavaGeneration = LlavaGeneration(), batch_size: int = 16, num_workers: int = 0,
                    first_sentence: bool = False, progress: bool = True, on_batch=None) -> dict[str, str]:
    """Caption ``records`` in batches; returns ``{file id: caption}``. ``on_batch(dict)`` gets each batch's
    captions as soon as they exist (the resumable writer uses it)."""
    from tqdm.auto import tqdm

    if not records:
        return {}
    device = _device_of(model)
    dtype = next(model.parameters()).dtype
    prompt = build_prompt(processor, instruction)
    tok = processor.tokenizer
    if generation.do_sample:
        torch.manual_seed(generation.seed)
    out: dict[str, str] = {}
    with tqdm(total=len(records), desc="llava captions", unit="img", disable=not progress) as bar:
        for enc, index in _batches(records, processor, prompt, dtype, device, batch_size, num_workers):
            ids = generate(model, enc, generation, tok.pad_token_id)
            texts = tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            batch = {records[i].file_id: postprocess(t, first_sentence) for i, t in zip(index, texts)}
            out.update(batch)
            if on_batch is not None:
                on_batch(batch)
            bar.update(len(index))
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
        enc = {k: torch.cat([p[k] for p in parts]) if len(parts) > 1 else parts[0][k] for k in parts[0]}
        enc["pixel_values"] = enc["pixel_values"].to(dtype)
        return enc, list(index)

    for enc, idx in loader:
        parts.append({k: v.to(device, non_blocking=True) for k, v in enc.items()})
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


def _same_spelling(model_name: str) -> str:
    """A local folder by its absolute path (``./data/demo/models/llava/`` and ``data/demo/models/llava`` are one
    model, so a resumed run keeps its finished captions); a hub id as it is."""
    return str(Path(model_name).resolve()) if model_name and Path(model_name).is_dir() else model_name


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
    from .distributed import current

    t0 = time.time()
    d = current()
    records = list_images(images) if isinstance(images, (str, Path)) else list(images)
    out_json = Path(out_json)
    settings = {"model": _same_spelling(model_name), "instruction": instruction, "generation": asdict(generation),
                "first_sentence": first_sentence}
    done = None
    if d.main:  # only the main process reads (and, for other settings, deletes) what an interrupted run left
        done = {}
        for path in _partials(out_json):
            done.update(_read_partial(path, settings))
        done = {k: v for k, v in done.items() if k in {r.file_id for r in records}}
    done = d.broadcast(done)
    todo = d.shard_batches([r for r in records if r.file_id not in done], batch_size)
    partial = out_json.with_name(out_json.name + (f".partial.rank{d.rank}.jsonl" if d.active else ".partial.jsonl"))
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
                                  first_sentence, progress and d.main, on_batch=write)
        except BaseException:
            if f.tell() == len(header.encode()):
                f.close()
                partial.unlink()  # this process captioned nothing: nothing to resume from
            raise  # otherwise the captions so far stay, and a restart with the same settings skips them
    for shard in d.gather(new):
        new.update(shard)
    captions = {r.file_id: done[r.file_id] if r.file_id in done else new[r.file_id] for r in records}
    d.barrier()  # every process has closed its partial file
    if d.main:
        write_json_atomic(out_json, captions)
        for path in _partials(out_json):
            path.unlink()
    d.barrier()
    return CaptionRun(captions, reused=len(done), computed=len(new), seconds=time.time() - t0, settings=settings)


def _partials(out_json: Path) -> list[Path]:
    return sorted(out_json.parent.glob(out_json.name + ".partial*.jsonl"))


# --------------------------------------------------------------------------------------------------- attention
def image_token_span(input_ids: torch.Tensor, image_token_id: int) -> tuple[int, int]:
    """``(start, stop)`` of the image placeholder positions in one row of ``input_ids``; checks they are one run."""
    pos = (torch.as_tensor(input_ids) == image_token_id).nonzero().flatten()
    if len(pos) == 0:
        raise ValueError("no image token in input_ids")
    start, stop = int(pos[0]), int(pos[-1]) + 1
    if stop - start != len(pos):
        raise ValueError(f"the image tokens are not contiguous ({len(pos)} tokens spread over {start}..{stop})")
    return start, stop


def vision_grid(model) -> tuple[int, int]:
    vc = model.config.vision_config
    return vc.image_size // vc.patch_size, vc.image_size // vc.patch_size


@dataclass
class LlavaAttention:
    """Attention of each generated token over the image positions, from the step that produced the token
    (``maps``) and from the step that reads it (``read_maps``).

    ``maps[t, l, h]`` is a (rows, cols) grid: token ``t``'s query (the position that predicted it) in layer
    ``layers[l]``, head ``h``; row-major over the patches as the vision tower saw them (after resize + crop).
    ``read_maps[t]`` is the query at token ``t``'s own position (the one that predicts the next token)."""

    caption: str
    token_ids: list[int]
    tokens: list[str]  # one string per generated token (sub-words, with their leading space)
    token_strings: list[str]  # the tokenizer's own strings; word starts marked ("Ġ" byte-level, "▁" SentencePiece)
    maps: np.ndarray  # (T, len(layers), heads, rows, cols) float32
    read_maps: np.ndarray  # the same shape
    end_map: np.ndarray  # (len(layers), heads, rows, cols): the step that predicted the end of the answer
    layers: list[int]
    span: tuple[int, int]  # image positions in the prompt
    prompt_length: int


@torch.inference_mode()
def attention_maps(model, processor, image, instruction: str = DEFAULT_INSTRUCTION,
                   generation: LlavaGeneration = LlavaGeneration(), generated_ids: list[int] | None = None,
                   layers: list[int] | None = None) -> LlavaAttention:
    """Caption one image (or take ``generated_ids``) and read each generated token's attention over the image.

    One teacher-forced pass over prompt + caption with eager attention in the language model; with causal
    attention it equals the attentions ``generate`` records step by step (the tests compare them)."""
    device, dtype = _device_of(model), next(model.parameters()).dtype
    if isinstance(image, (str, Path)):
        image = load_image(image)
    enc = processor(images=[image], text=[build_prompt(processor, instruction)], return_tensors="pt")
    enc = {k: v.to(device) for k, v in enc.items()}
    enc["pixel_values"] = enc["pixel_values"].to(dtype)
    tok = processor.tokenizer
    prompt_len = enc["input_ids"].shape[1]
    if generated_ids is None:
        from .rehearsal.answers import logits_processors

        out = model.generate(**enc, **generation.generate_kwargs(), **logits_processors(model, prompt_len),
                             pad_token_id=tok.pad_token_id)
        generated_ids = out[0, prompt_len:].tolist()
    generated_ids = [t for t in generated_ids if t != tok.pad_token_id]
    if generated_ids and generated_ids[-1] == tok.eos_token_id:
        generated_ids = generated_ids[:-1]
    span = image_token_span(enc["input_ids"][0], model.config.image_token_id)
    rows, cols = vision_grid(model)
    n_layers = model.config.text_config.num_hidden_layers
    layers = list(range(n_layers)) if layers is None else [range(n_layers)[i] for i in layers]
    T = len(generated_ids)
    if T == 0:
        heads = model.config.text_config.num_attention_heads
        empty = np.zeros((0, len(layers), heads, rows, cols), np.float32)
        return LlavaAttention("", [], [], [], empty, empty, np.zeros(empty.shape[1:], np.float32), layers, span,
                              prompt_len)
    full = torch.cat([enc["input_ids"], torch.tensor([generated_ids], device=device)], dim=1)
    previous = {k: getattr(model.config, k)._attn_implementation for k in ("text_config", "vision_config")}
    model.set_attn_implementation("eager")  # attention weights exist only in the eager implementation
    try:
        out = model(input_ids=full, pixel_values=enc["pixel_values"], attention_mask=torch.ones_like(full),
                    output_attentions=True, logits_to_keep=1)
    finally:
        model.set_attn_implementation(previous)
    att = out.attentions  # per layer (1, heads, L, L)
    n_image = span[1] - span[0]
    first = n_image - rows * cols  # 1 when the CLS token was kept ("full" strategy)
    if first not in (0, 1):
        raise ValueError(f"{n_image} image tokens do not fit a {rows} x {cols} grid")
    q = slice(prompt_len - 1, prompt_len + T)  # the query that predicts each token, then the one that reads the last
    maps = torch.stack([att[layer][0, :, q, span[0] + first : span[1]] for layer in layers])  # (L, H, T + 1, n)
    maps = maps.permute(2, 0, 1, 3).float().reshape(T + 1, len(layers), -1, rows, cols).cpu().numpy()
    tokens = [tok.decode([t]) for t in generated_ids]
    # an id past the tokenizer (one of the model's padding rows, which random weights do generate) has no string:
    # it becomes a word of its own with no text, which words_and_maps drops
    strings = [s if s is not None else " " for s in tok.convert_ids_to_tokens(generated_ids)]
    return LlavaAttention(tok.decode(generated_ids, skip_special_tokens=True).strip(), generated_ids, tokens,
                          strings, maps[:T], maps[1:], maps[T], layers, span, prompt_len)


# --------------------------------------------------------------------------------------------------- sweep
def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:40]


def sweep(model, processor, records: list[Record], instructions: dict[str, str],
          generations: dict[str, LlavaGeneration], out_dir: str | Path, references: dict[str, list[str]],
          scorer=None, extra_scores: dict | None = None, batch_size: int = 16, num_workers: int = 0,
          first_sentence: bool = False, model_name: str = "", progress: bool = True, gpus: int = 1,
          load_in_4bit: bool = False, fast_kernels: bool = False) -> list[dict]:
    """Caption ``records`` once per (instruction, generation) pair and score each setting.

    Each setting leaves ``out_dir/<instruction>__<generation>.json`` (the course's predictions format) and a row
    file beside it; a re-run with the same settings reuses both. Rows: ``instruction``, ``generation``, ``cider``,
    ``clipscore`` (when a :class:`~hw3lib.metrics.ClipScorer` is given), ``mean_length`` (words), ``seconds``,
    ``images_per_s``, ``predictions``, and one column per ``extra_scores`` entry: ``{column: function of the
    predictions dict -> float}`` (the demo adds ``caption_accuracy`` from the shapes world's ground truth).

    ``gpus > 1``: the captioning of every setting still to do runs first, in one ``torchrun`` over that many GPUs
    (:mod:`hw3lib.sweep_worker`: each process loads ``model_name`` on its GPU and takes every N-th batch), then
    this process scores. ``model`` may then be None; ``load_in_4bit`` and ``fast_kernels`` are passed to the
    workers.
    """
    from .metrics import cider, clip_score

    out_dir = Path(out_dir)
    image_dir = records[0].image_path.parent if records else out_dir
    plan = []
    for iname, instruction in instructions.items():
        for gname, gen in generations.items():
            stem = out_dir / f"{_slug(iname)}__{_slug(gname)}"
            settings = {"model": _same_spelling(model_name), "instruction": instruction, "generation": asdict(gen),
                        "first_sentence": first_sentence, "images": [r.file_id for r in records]}
            plan.append((iname, instruction, gname, gen, stem.with_suffix(".json"), stem.with_suffix(".row.json"),
                         settings))

    def reusable(pred_path, row_path, settings) -> dict | None:
        if row_path.is_file() and pred_path.is_file():
            row = json.loads(row_path.read_text())
            if row.get("settings") == settings:
                return row
        return None

    launched = {}
    if gpus > 1:
        todo = [p for p in plan if reusable(*p[4:]) is None]
        if todo:
            launched = _sweep_on_gpus(todo, records, out_dir, model_name, gpus, batch_size, num_workers,
                                      first_sentence, load_in_4bit, fast_kernels)
    rows = []
    for iname, instruction, gname, gen, pred_path, row_path, settings in plan:
        row = reusable(pred_path, row_path, settings)
        if row is not None:
            rows.append(row)
            continue
        if str(pred_path) in launched:
            run = launched[str(pred_path)]
        else:
            run = caption_folder(model, processor, records, pred_path, instruction, gen, batch_size, num_workers,
                                 first_sentence, progress, model_name)
        pred = run.captions
        row = {"name": f"{iname} / {gname}", "instruction_name": iname, "instruction": instruction,
               "generation": gname, "generation_config": asdict(gen),
               "cider": cider(pred, {k: references[k] for k in pred})[0],
               "mean_length": float(np.mean([len(c.split()) for c in pred.values()])),
               "seconds": round(run.seconds, 2),
               "images_per_s": round(run.computed / run.seconds, 2) if run.computed else None,
               "predictions": str(pred_path)}
        if scorer is not None:
            row["clipscore"] = clip_score(scorer, pred, image_dir)[0]
        for column, score in (extra_scores or {}).items():
            row[column] = score(pred)
        row["settings"] = settings
        write_json_atomic(row_path, row)
        rows.append(row)
    return rows


def _sweep_on_gpus(todo: list, records: list[Record], out_dir: Path, model_name: str, gpus: int, batch_size: int,
                   num_workers: int, first_sentence: bool, load_in_4bit: bool,
                   fast_kernels: bool = False) -> dict[str, CaptionRun]:
    """Run the captioning of ``todo`` (sweep plan entries) under torchrun over ``gpus`` processes."""
    import subprocess
    import sys

    out_dir.mkdir(parents=True, exist_ok=True)
    spec_path, results_path = out_dir / "sweep_spec.json", out_dir / "sweep_results.json"
    spec = {"model": model_name, "load_in_4bit": load_in_4bit, "fast_kernels": fast_kernels,
            "images": [str(r.image_path) for r in records],
            "batch_size": batch_size, "num_workers": num_workers, "first_sentence": first_sentence,
            "results": str(results_path),
            "settings": [{"instruction": t[1], "generation": asdict(t[3]), "predictions": str(t[4])} for t in todo]}
    write_json_atomic(spec_path, spec)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}", "-m",
           "hw3lib.sweep_worker", str(spec_path)]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode:
        tail = "\n".join(done.stdout.strip().splitlines()[-40:])
        raise RuntimeError(f"the sweep's captioning on {gpus} GPUs failed ({' '.join(cmd)}):\n{tail}")
    runs = {}
    for r in json.loads(results_path.read_text()):
        captions = json.loads(Path(r["predictions"]).read_text())
        runs[r["predictions"]] = CaptionRun(captions, r["reused"], r["computed"], r["seconds"])
    spec_path.unlink()
    results_path.unlink()
    return runs


def sweep_summary(rows: list[dict], model_name: str, num_images: int) -> dict:
    """What notebook 01 records: every row's settings and scores, and the best row by CIDEr (the course's primary
    metric), with the path of its predictions."""
    keep = ["name", "instruction_name", "instruction", "generation", "generation_config", "cider", "clipscore",
            "mean_length", "caption_accuracy", "seconds", "images_per_s", "predictions"]
    best = max(rows, key=lambda r: r["cider"])
    return {"model": model_name, "num_images": num_images, "sweep": [{k: r[k] for k in keep if k in r} for r in rows],
            "best": {k: best[k] for k in keep if k in best}}
