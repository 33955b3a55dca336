"""Where each generated word of LLaVA looks: the attention of every generated token over the image positions.

One teacher-forced pass over prompt + caption with eager attention in the language model (sdpa and flash
attention return no weights); with causal attention it equals the attentions ``generate`` records step by step.
The image positions are found from the image token id in ``input_ids``, never from fixed offsets, which move with
the processor version, the prompt and the padding.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data import load_image
from .loading import device_of
from .settings import DEFAULT_INSTRUCTION, LlavaGeneration, build_prompt


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
    device, dtype = device_of(model), next(model.parameters()).dtype
    if isinstance(image, (str, Path)):
        image = load_image(image)
    inputs = processor(images=[image], text=[build_prompt(processor, instruction)], return_tensors="pt")
    inputs = {k: v.to(device) for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    tok = processor.tokenizer
    prompt_len = inputs["input_ids"].shape[1]
    if generated_ids is None:
        from ..rehearsal.answers import logits_processors

        out = model.generate(**inputs, **generation.generate_kwargs(), **logits_processors(model, prompt_len),
                             pad_token_id=tok.pad_token_id)
        generated_ids = out[0, prompt_len:].tolist()
    generated_ids = [t for t in generated_ids if t != tok.pad_token_id]
    if generated_ids and generated_ids[-1] == tok.eos_token_id:
        generated_ids = generated_ids[:-1]
    span = image_token_span(inputs["input_ids"][0], model.config.image_token_id)
    rows, cols = vision_grid(model)
    n_layers = model.config.text_config.num_hidden_layers
    layers = list(range(n_layers)) if layers is None else [range(n_layers)[i] for i in layers]
    T = len(generated_ids)
    if T == 0:
        heads = model.config.text_config.num_attention_heads
        empty = np.zeros((0, len(layers), heads, rows, cols), np.float32)
        return LlavaAttention("", [], [], [], empty, empty, np.zeros(empty.shape[1:], np.float32), layers, span,
                              prompt_len)
    full = torch.cat([inputs["input_ids"], torch.tensor([generated_ids], device=device)], dim=1)
    previous = {k: getattr(model.config, k)._attn_implementation for k in ("text_config", "vision_config")}
    model.set_attn_implementation("eager")  # attention weights exist only in the eager implementation
    try:
        out = model(input_ids=full, pixel_values=inputs["pixel_values"], attention_mask=torch.ones_like(full),
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
