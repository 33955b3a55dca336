"""Loading LLaVA-1.5. One :class:`LlavaLoad` value says which model, on which device, in how many bits and with
which kernels; notebook 01, notebook 04, ``hw3 llava-caption`` and the sweep's worker processes all load through it.

A local folder is used as it is. A hub id is read from the Hugging Face cache after checking that every file is
there (:mod:`hw3lib.hub`), so a downloaded model works offline and a missing one is one line, not a download.
"""
from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import DataError
from .settings import REAL_MODEL_ID


@dataclass(frozen=True)
class LlavaLoad:
    """How to load LLaVA: what the notebooks' parameters, the command line and a sweep's worker processes hand on."""

    model: str = REAL_MODEL_ID  # a local folder (saved with save_pretrained) or a hub id
    load_in_4bit: bool = False  # the language model in 4 bits (bitsandbytes; GPU only)
    load_in_8bit: bool = False  # or in 8 bits (bitsandbytes' LLM.int8; GPU only): not with load_in_4bit
    fast_kernels: bool = False  # Liger's kernels in the prefill (:func:`use_fast_kernels`) where installed, on a GPU,
    # not with load_in_4bit / load_in_8bit
    device: str | None = None  # None: cuda when available, else cpu
    random_weights: bool = False  # llava-1.5-7b's architecture with random weights, driven by ``model``'s processor
    # (benchmarks and dry runs without the download: :func:`hw3lib.rehearsal.weights.random_llava`)

    def load(self):
        """``(model, processor)``, ready for :func:`hw3lib.llava.caption_records`."""
        if not self.random_weights:
            return load_llava(self.model, self.device, load_in_4bit=self.load_in_4bit,
                              load_in_8bit=self.load_in_8bit, fast_kernels=self.fast_kernels)
        if self.load_in_4bit or self.load_in_8bit:  # it would benchmark bf16 under a 4- or 8-bit name
            raise ValueError("random weights are built in bf16: load_in_4bit / load_in_8bit do not apply (rehearse "
                             "the 7B with `hw3 rehearse` and load it by name to quantise it)")
        from ..rehearsal.weights import random_llava

        model, processor = random_llava(self.model, device=self.device or "cuda")
        if self.fast_kernels and not use_fast_kernels(model):
            _no_fast_kernels()
        return model, processor

    def key(self) -> str:
        """The model as a run's settings name it: a local folder by its absolute path (``./data/demo/models/llava/``
        and ``data/demo/models/llava`` are one model, so a resumed run keeps its finished captions), a hub id as it
        is."""
        return model_key(self.model)


def model_key(name: str) -> str:
    """See :meth:`LlavaLoad.key`."""
    return str(Path(name).resolve()) if name and Path(name).is_dir() else name


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def _no_fast_kernels() -> None:
    warnings.warn("fast_kernels: liger-kernel is not installed (pip install liger-kernel) or the model is not on a "
                  "GPU; PyTorch's kernels are used", stacklevel=3)


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
    from .. import hub

    path = hub.local_folder(name)
    if path is not None:
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
    from .. import hub

    try:
        with hub.cache_only(cache_only):
            return cls.from_pretrained(name, **kw)
    except Exception as e:  # noqa: BLE001 -- OSError, ValueError, safetensors' and tokenizers' own errors ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{name}: cannot load it as a {cls.__name__} (missing, truncated or foreign files?): "
                        f"{first[:300]}") from None


INT8_CAST = "MatMul8bitLt: inputs will be cast from"


class _FirstOnly(logging.Filter):
    """Lets the first record that starts with ``prefix`` through, and drops the later ones."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix, self.seen = prefix, False

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(self.prefix):
            return True
        said, self.seen = self.seen, True
        return not said


def _int8_cast_said_once() -> None:
    """LLM.int8 multiplies in fp16 and says so for every product of a bf16 input: 78,643 lines in one 128-image
    benchmark (bitsandbytes 0.50, through ``logging``; older versions through ``warnings``). Once is enough."""
    log = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _FirstOnly) for f in log.filters):
        log.addFilter(_FirstOnly(INT8_CAST))
    warnings.filterwarnings("once", message=INT8_CAST)


def load_llava(model: str | Path = REAL_MODEL_ID, device: str | None = None, dtype: torch.dtype | None = None,
               load_in_4bit: bool = False, attn_implementation: str = "sdpa", fast_kernels: bool = False,
               load_in_8bit: bool = False):
    """``(model, processor)`` ready for :func:`caption_records`.

    Args:
        model: a local folder or a hub id (the cache is tried first, so a downloaded model works offline).
        device: ``cuda`` when available, else ``cpu``. dtype: bf16 on CUDA, fp32 on the CPU.
        load_in_4bit: quantise the language model with bitsandbytes (GPU only): NF4 weights, matrix products in
            ``dtype``. load_in_8bit: bitsandbytes' LLM.int8 instead (GPU only; its products run in fp16, the bf16
            inputs cast). Not both.
        fast_kernels: Liger's fused kernels in the prefill (:func:`use_fast_kernels`), where installed, on a GPU.

    Random weights at the real architecture (benchmarks, dry runs) are :func:`hw3lib.rehearsal.weights.random_llava`.
    """
    name = str(model)
    if load_in_4bit and load_in_8bit:
        raise ValueError("load_in_4bit and load_in_8bit: choose one")
    quantised = load_in_4bit or load_in_8bit
    if quantised and (missing := quantisation_missing()):  # before the processor loads, not after
        raise RuntimeError(f"load_in_{4 if load_in_4bit else 8}bit needs {' and '.join(missing)}: "
                           f"pip install -e \".[gpu]\"")
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    resolved = _resolve(name)  # a folder, or a hub id with its cached files checked (all shards) when offline
    processor = _from_pretrained(AutoProcessor, *resolved)
    processor.tokenizer.padding_side = "left"
    kw: dict = {"dtype": dtype, "attn_implementation": attn_implementation}
    if quantised:
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype)
                                     if load_in_4bit else BitsAndBytesConfig(load_in_8bit=True))
        _int8_cast_said_once()
        kw["device_map"] = {"": device}
    net = _from_pretrained(LlavaForConditionalGeneration, *resolved, **kw)
    if not quantised:
        net.to(device)
    net.eval()
    if fast_kernels and quantised:
        warnings.warn("fast_kernels: Liger's kernels serve bf16 layers, not bitsandbytes' quantised ones; PyTorch's "
                      "kernels are used", stacklevel=2)
    elif fast_kernels and not use_fast_kernels(net):
        _no_fast_kernels()
    return net, processor


def quantisation_missing() -> list[str]:
    """What a 4- or 8-bit load lacks of the two packages transformers' bitsandbytes quantiser needs (``[]``: none)."""
    import importlib.util

    return [m for m in ("bitsandbytes", "accelerate") if importlib.util.find_spec(m) is None]


def use_fast_kernels(model) -> bool:
    """Liger's fused Triton kernels for the language model's RMSNorm, rotary embedding and SwiGLU MLP, in the
    prefill only (``pip install liger-kernel``; CUDA): the one-token decoding steps keep PyTorch's kernels, whose
    launches cost less (docs/benchmarks.md has the figures). Returns False, changing nothing, without a GPU model,
    a Llama language model or the package.

    Liger's rotary function replaces Llama's in ``transformers.models.llama`` for the whole process (prompts go to
    it, single tokens to the original), and its kernels round differently from PyTorch's in bf16, so a caption may
    differ in a late token."""
    if device_of(model).type != "cuda" or model.config.text_config.model_type != "llama":
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
