"""Zero-shot captioning with LLaVA-1.5 (P1), one concept per module:

* :mod:`.settings`: the model id, the instruction and its llava-1.5 prompt, :class:`LlavaGeneration`, the answer's
  clean-up;
* :mod:`.loading`: :class:`LlavaLoad` (which model, device, 4-bit, fast kernels) and :func:`load_llava`;
* :mod:`.decoding`: :func:`generate` on one batch (greedy from a CUDA graph, beam search with the prompt once);
* :mod:`.captioning`: a folder in batches, resumable (:func:`caption_folder`, :func:`caption_records`);
* :mod:`.attention`: each generated token's attention over the image (:func:`attention_maps`);
* :mod:`.prompt_sweep`: notebook 01's sweep, in one process or under ``torchrun``.

The same calls serve ``llava-hf/llava-1.5-7b-hf`` and the demo's stand-in (``data/demo/models/llava``): both are a
``LlavaForConditionalGeneration`` and an ``AutoProcessor`` saved with ``save_pretrained``. The names below are
imported from their modules on first use, so that ``import hw3lib.llava`` costs nothing until one is needed.
"""
from __future__ import annotations

import importlib

_WHERE = {
    "settings": ["REAL_MODEL_ID", "DEFAULT_INSTRUCTION", "CACHES", "LlavaGeneration", "build_prompt", "postprocess"],
    "loading": ["LlavaLoad", "load_llava", "use_fast_kernels", "device_of", "model_key"],
    "decoding": ["generate"],
    "captioning": ["CaptionRun", "caption_records", "caption_folder", "partial_files"],
    "attention": ["LlavaAttention", "attention_maps", "image_token_span", "vision_grid"],
    "prompt_sweep": ["best_on_all", "best_setting", "setting_batch_size", "sweep", "sweep_findings", "sweep_summary"],
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *__all__])
