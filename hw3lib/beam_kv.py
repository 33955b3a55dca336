"""Beam search over a prompt whose keys and values are stored once per image.

transformers' beam search keeps one KV cache row per beam. For a captioning prompt of 590 tokens and 20 new ones,
almost all of that cache is the prompt, identical for the beams of an image, and every decoding step copies all of
it twice: once to grow the cache, once to reorder it for the surviving beams. This module keeps, per layer, one
buffer per image laid out as

    [ prompt (P positions) | beam 0's tokens (T slots) | beam 1's tokens | ... | beam K-1's tokens ]

and turns the K one-token queries of an image into one attention call over that buffer, each query masked to the
prompt and to its own beam's slots. The prompt is written once; a step writes K new positions and reorders only
the generated slots. The attention itself is PyTorch's ``scaled_dot_product_attention`` over the same keys and
values, so the captions are transformers' beam search (``tests/test_llava.py`` compares them token for token).

Use ``attach(cache, beams, max_new)`` on a cache filled by a forward pass over the prompts, then call ``generate``
inside ``attention_for(model)``: it points the language model at this module's attention function, which hands any
other cache to transformers' own sdpa function.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicLayer

NAME = "hw3_prompt_once"
_active: contextvars.ContextVar["_Shared | None"] = contextvars.ContextVar("hw3_prompt_once", default=None)


class _Shared:
    """What the layers of one cache share: the sizes, the step's mask, and how many slots are written."""

    def __init__(self, prompt_mask: torch.Tensor, beams: int, slots: int):
        self.beams, self.slots = beams, slots
        self.images, self.prompt = prompt_mask.shape
        self.written = 0  # generated positions written per beam (the same for every layer after a step)
        self.prompt_mask = prompt_mask.bool()  # (B, P): False where the prompt is left padding
        self.mask: torch.Tensor | None = None

    def step_mask(self, q: int) -> torch.Tensor:
        """(B, 1, K*q, P + K*T): query (k, i) sees the unpadded prompt and beam k's slots up to its own position."""
        B, K, P, T, t = self.images, self.beams, self.prompt, self.slots, self.written
        dev = self.prompt_mask.device
        pos = torch.arange(T, device=dev)
        own = pos[None, :] <= (t + torch.arange(q, device=dev))[:, None]  # (q, T)
        eye = torch.eye(K, dtype=torch.bool, device=dev)
        gen = (eye[:, None, :, None] & own[None, :, None, :]).reshape(K * q, K * T)  # (Kq, KT)
        pre = self.prompt_mask[:, None, :].expand(B, K * q, P)
        return torch.cat([pre, gen.expand(B, K * q, K * T)], dim=-1)[:, None]


class PromptOnceLayer(DynamicLayer):
    """One layer's buffer ``(B, P + K*T, H, D)``; ``update`` returns it viewed as ``(B, H, P + K*T, D)``."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, shared: _Shared):
        super().__init__()
        B, H, P, D = keys.shape
        K, T = shared.beams, shared.slots
        self.shared = shared
        self.kbuf = keys.new_zeros(B, P + K * T, H, D)
        self.vbuf = values.new_zeros(B, P + K * T, H, D)
        self.kbuf[:, :P] = keys.transpose(1, 2)
        self.vbuf[:, :P] = values.transpose(1, 2)
        self.device, self.is_initialized = keys.device, True
        self.keys, self.values = self.kbuf, self.vbuf  # for code that only checks that the layer holds tensors

    def _beams(self, buf: torch.Tensor) -> torch.Tensor:  # (B, K, T, H, D), a view of the generated slots
        s = self.shared
        return buf[:, s.prompt:].view(s.images, s.beams, s.slots, *buf.shape[2:])

    def update(self, key_states, value_states, *args, **kwargs):
        s = self.shared
        BK, H, q, D = key_states.shape
        if s.written + q > s.slots:
            raise RuntimeError(f"beam search wrote more than the {s.slots} slots it was given")
        for buf, new in ((self.kbuf, key_states), (self.vbuf, value_states)):
            self._beams(buf)[:, :, s.written:s.written + q] = new.view(s.images, s.beams, H, q, D).transpose(2, 3)
        return self.kbuf.transpose(1, 2), self.vbuf.transpose(1, 2)

    def get_seq_length(self) -> int:
        return self.shared.prompt + self.shared.written

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        q = args[0] if args else kwargs.get("query_length", kwargs.get("cache_position"))
        q = q if isinstance(q, int) else int(q.shape[0])
        return self.get_seq_length() + q, 0

    def get_max_length(self) -> int:
        return self.shared.prompt + self.shared.slots

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        s = self.shared
        if s.written == 0:
            return
        idx = beam_idx.to(self.device).view(s.images, s.beams)
        idx = idx - torch.arange(s.images, device=self.device)[:, None] * s.beams  # the beam within its image
        rows = torch.arange(s.images, device=self.device)[:, None]
        for buf in (self.kbuf, self.vbuf):
            gen = self._beams(buf)
            gen[:, :, :s.written] = gen[rows, idx, :s.written]

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("the prompt-once cache is already laid out for its beams")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("the prompt-once cache keeps every beam of every image")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the prompt-once cache cannot be cropped")


def attach(cache, prompt_mask: torch.Tensor, beams: int, max_new: int):
    """Turn ``cache`` (a ``DynamicCache`` filled by one forward pass over the prompts, ``B`` rows) into the
    prompt-once layout for ``beams`` beams and up to ``max_new`` generated positions; returns it."""
    shared = _Shared(prompt_mask, beams, max_new)
    for i, layer in enumerate(cache.layers):
        cache.layers[i] = PromptOnceLayer(layer.keys, layer.values, shared)
    cache.hw3_shared = shared
    return cache


def prompt_once_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention signature. With a prompt-once cache, ``key``/``value`` are ``(B, H, S, D)`` for
    ``query`` ``(B*K, H, q, D)``; anything else goes to the model's own attention function (sdpa for LLaVA)."""
    s = _active.get()
    if s is None or key.shape[0] == query.shape[0]:
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        before = getattr(s, "before", "sdpa") if s is not None else "sdpa"
        fn = AttentionInterface._global_mapping.get(before, sdpa_attention_forward)  # eager has no entry: sdpa
        return fn(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    BK, H, q, D = query.shape
    B, K = s.images, s.beams
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = (x.repeat_interleave(groups, dim=1) for x in (key, value))
    if module.layer_idx == 0 or s.mask is None or s.mask.shape[-2] != K * q:
        s.mask = s.step_mask(q)  # once per step: layer 0 comes first
    qb = query.view(B, K, H, q, D).transpose(1, 2).reshape(B, H, K * q, D)
    out = F.scaled_dot_product_attention(qb, key, value, attn_mask=s.mask, scale=scaling)  # (B, H, K*q, D)
    if module.layer_idx == getattr(s, "last_layer", -1):
        s.written += q
    return out.view(B, H, K, q, D).permute(0, 2, 3, 1, 4).reshape(BK, q, H, D), None


def _text_config(model):
    return getattr(model.config, "text_config", model.config)


@contextlib.contextmanager
def attention_for(model, cache):
    """Inside: the language model's attention is ``prompt_once_attention``, reading ``cache``'s layout."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, prompt_once_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    config = _text_config(model)
    before = config._attn_implementation
    shared = cache.hw3_shared
    shared.last_layer, shared.before = len(cache.layers) - 1, before
    token = _active.set(shared)
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = before
        _active.reset(token)
