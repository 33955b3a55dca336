"""Greedy decoding whose one-token steps are replayed from a CUDA graph (``LlavaGeneration(cache="static+graphs")``).

A decoding step of LLaVA-1.5-7B at batch 128 is about a thousand small kernels. Launched one by one from Python
they take longer than the GPU needs for them; captured once in a CUDA graph, a step is one launch. The prompt
goes through the model as in ``generate`` (a forward pass that fills a static KV cache), then every later step
reads its inputs from fixed buffers and writes them for the next: the last token, its position, the cache slot,
the attention mask over the cache, the step count (for ``min_new_tokens``) and which rows have finished.

The tokens are ``model.generate``'s greedy ones: the same positions for left-padded prompts, end-of-sequence
blocked until ``min_new_tokens``, padding after a row's end, and the output cut where the last row ended
(``tests/test_llava.py`` compares them in fp32 on the CPU, where the same steps run without a graph).
"""
from __future__ import annotations

import inspect
import warnings

import torch


_warned = False


def _capture(step):
    """``step`` recorded in a CUDA graph (not run), or None with one warning if something in it cannot be
    captured (a synchronising operation in another transformers version, say): the steps then run one by one."""
    global _warned
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    try:
        with torch.cuda.graph(graph):
            step()
    except RuntimeError as e:
        if not _warned:
            warnings.warn(f"greedy decoding could not be captured in a CUDA graph ({str(e).splitlines()[0][:200]}); "
                          f"its steps run one by one", stacklevel=3)
            _warned = True
        return None
    return graph


def supported(model, generation) -> bool:
    """Plain greedy decoding, with nothing in the model's generation config that ``generate`` would add."""
    cfg = model.generation_config
    extras = [getattr(cfg, name, None) for name in ("suppress_tokens", "begin_suppress_tokens", "bad_words_ids",
                                                     "forced_bos_token_id", "forced_eos_token_id", "sequence_bias")]
    return (generation.num_beams == 1 and not generation.do_sample and generation.repetition_penalty == 1.0
            and generation.no_repeat_ngram_size == 0 and not any(extras)
            and getattr(cfg, "repetition_penalty", 1.0) in (None, 1.0)
            and not getattr(cfg, "no_repeat_ngram_size", 0))


@torch.inference_mode()
def greedy(model, enc: dict, generation, pad_token_id: int, graphs: bool | None = None) -> torch.Tensor:
    """``(B, prompt + new)`` token ids, as ``model.generate`` returns them for greedy decoding. ``graphs``: replay
    the steps from a CUDA graph (default: on a CUDA device)."""
    from transformers import StaticCache

    from .rehearsal.answers import answer_tokens, end_after

    ids, mask = enc["input_ids"], enc["attention_mask"]
    device, (batch, prompt) = ids.device, ids.shape
    graphs = device.type == "cuda" if graphs is None else graphs
    eos = model.generation_config.eos_token_id
    eos = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), device=device)
    new = generation.max_new_tokens
    total = prompt + new
    cache = StaticCache(config=model.config, max_cache_len=total)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    positions = mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(mask == 0, 1)  # as generate() numbers left-padded prompts
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, pixel_values=enc["pixel_values"],
                   cache_position=torch.arange(prompt, device=device), use_cache=True, logits_to_keep=1,
                   **{name: cache}).logits[:, -1]
    # the buffers a step reads and writes
    state = {
        "token": torch.empty(batch, 1, dtype=torch.long, device=device),
        "position": positions[:, -1:].clone(),
        "slot": torch.full((1,), prompt - 1, dtype=torch.long, device=device),
        "step": torch.zeros((), dtype=torch.long, device=device),  # new tokens so far
        "finished": torch.zeros(batch, dtype=torch.bool, device=device),
        # added to the attention scores over the cache: 0 where a slot is attended to, the dtype's minimum elsewhere
        "mask": torch.full((batch, 1, 1, total), torch.finfo(model.dtype).min, dtype=model.dtype, device=device),
        "out": torch.full((batch, new), pad_token_id, dtype=torch.long, device=device),
    }
    state["mask"][:, 0, 0, :prompt].masked_fill_(mask.bool(), 0.0)
    min_new = torch.tensor(generation.min_new_tokens, device=device)
    span = answer_tokens(model)  # the rehearsal's random LLaVA: answers of 8-20 tokens (hw3lib.rehearsal.answers)
    state["first"] = torch.zeros(batch, dtype=torch.long, device=device)

    def choose(logits: torch.Tensor) -> None:
        """The greedy token from ``logits`` (B, V): generate's MinNewTokens processor, argmax, padding after the
        end; then the buffers move one step on."""
        blocked = logits.index_fill(-1, eos, float("-inf")) if len(eos) else logits
        logits = torch.where(state["step"] < min_new, blocked, logits)
        if span is not None:
            logits = end_after(logits, state["step"], state["first"], *span, int(eos[0]))
        token = logits.argmax(-1).masked_fill(state["finished"], pad_token_id)
        state["out"].index_copy_(1, state["step"].view(1), token[:, None])
        state["first"].copy_(torch.where(state["step"] == 0, token, state["first"]))
        state["finished"] |= torch.isin(token, eos)
        state["token"].copy_(token[:, None])
        state["step"] += 1
        state["position"] += 1
        state["slot"] += 1
        state["mask"].index_fill_(-1, state["slot"], 0.0)

    def step() -> None:
        out = model(input_ids=state["token"], attention_mask=state["mask"], position_ids=state["position"],
                    cache_position=state["slot"], use_cache=True, logits_to_keep=1, **{name: cache})
        choose(out.logits[:, -1].float())

    choose(logits.float())
    graph = None
    for t in range(1, new):
        if t % 4 == 0 and bool(state["finished"].all()):  # every row has ended (a sync, so not every step)
            break
        if graphs and graph is None and t >= 2:  # step 1 ran eagerly: the warm-up a capture needs
            graph = _capture(step)
            graphs = graph is not None
        if graph is not None:
            graph.replay()
        else:
            step()
    out = state["out"]
    ended = state["finished"].cpu()
    if bool(ended.all()):  # generate stops at the step where the last row ended
        last = int((out[:, :, None] == eos).any(-1).long().argmax(-1).max())
        out = out[:, : last + 1]
    else:
        done = int(state["step"])
        out = out[:, :done]
    return torch.cat([ids, out], dim=1)
