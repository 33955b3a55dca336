"""Answers of a sensible length from the rehearsal's random LLaVA.

Random weights almost never emit the end token, so every answer would run to ``max_new_tokens`` (60 in notebook
01's sweep) and the rehearsal's timings would be those of the longest possible answers. ``hw3 rehearse`` therefore
marks the random LLaVA's ``config.json`` with ``hw3_rehearsal_answer_tokens: [low, high]``; for a model so marked
(and only for it: real checkpoints carry no such key), generation ends each answer after ``low`` to ``high`` new
tokens, as a trained model's one-sentence captions do. The length is a function of the answer's first token, so it
is seeded by the image and the instruction, the same in every run, and the same whichever decoding path (transformers'
``generate``, the graphed greedy loop of :func:`hw3lib.llava.decoding.graphed_greedy`, beam search) produces the answer.
"""
from __future__ import annotations

import torch

MARKER = "hw3_rehearsal_answer_tokens"
REHEARSAL_TOKENS = (8, 20)  # what hw3 rehearse writes


def answer_tokens(model) -> tuple[int, int] | None:
    """``(low, high)`` for a model marked by the rehearsal, else None."""
    value = getattr(getattr(model, "config", None), MARKER, None)
    if value is None:
        return None
    low, high = (int(v) for v in value)
    if not 1 <= low <= high:
        raise ValueError(f"{MARKER} must be [low, high] with 1 <= low <= high, got {value!r}")
    return low, high


def end_after(scores: torch.Tensor, new_tokens: torch.Tensor | int, first: torch.Tensor, low: int, high: int,
              eos: torch.Tensor | int) -> torch.Tensor:
    """``scores`` (rows, vocabulary) with the end token forced in every row that has produced its length, ``low +
    first % (high - low + 1)`` new tokens, ``first`` being the row's first new token. Given ``new_tokens`` and
    ``eos`` (the end token's id) as tensors on ``scores``' device, nothing here reads from or copies to the host, so
    that a CUDA graph can capture it (:class:`hw3lib.llava.decoding.GreedySteps`)."""
    length = low + first % (high - low + 1)
    new_tokens = new_tokens if torch.is_tensor(new_tokens) else torch.tensor(new_tokens, device=scores.device)
    eos = eos.view(1) if torch.is_tensor(eos) else torch.tensor([eos], device=scores.device)
    done = (new_tokens >= length)[:, None]
    only_eos = torch.full_like(scores, float("-inf")).index_fill(-1, eos, 0.0)
    return torch.where(done, only_eos, scores)


class EndAnswers:
    """The same as a ``generate`` logits processor: ``prompt`` is the prompt's length in ``input_ids``."""

    def __init__(self, prompt: int, low: int, high: int, eos: int):
        self.prompt, self.low, self.high, self.eos = prompt, low, high, eos

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        new = input_ids.shape[1] - self.prompt
        if new == 0:
            return scores
        return end_after(scores, new, input_ids[:, self.prompt], self.low, self.high, self.eos)


def logits_processors(model, prompt: int) -> dict:
    """``generate``'s keyword for a marked model (``{"logits_processor": ...}``), else ``{}``."""
    span = answer_tokens(model)
    if span is None:
        return {}
    from transformers import LogitsProcessorList

    eos = model.generation_config.eos_token_id
    eos = eos if isinstance(eos, int) else list(eos)[0]
    return {"logits_processor": LogitsProcessorList([EndAnswers(prompt, *span, eos)])}
