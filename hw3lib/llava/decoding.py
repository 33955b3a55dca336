"""How LLaVA decodes a batch: :func:`generate` takes one of three routes, each giving transformers' own tokens.

* Sampling, and greedy with a dynamic or static cache: ``model.generate`` as it is.
* Greedy with ``cache="static+graphs"``: :func:`graphed_greedy`, the one-token steps replayed from a CUDA graph.
* Beam search: the prompt runs once per image, not once per beam, and its keys and values stay once per image
  (:func:`attach_prompt_once`); a step copies and reorders only the generated positions.

Greedy from a CUDA graph
------------------------
A decoding step of LLaVA-1.5-7B at batch 128 is about a thousand small kernels. Launched one by one from Python
they take longer than the GPU needs for them; captured once in a CUDA graph, a step is one launch. The prompt
goes through the model as in ``generate`` (a forward pass that fills a static KV cache), then every later step
reads its inputs from fixed buffers and writes them for the next: the last token, its position, the cache slot,
the attention mask over the cache, the step count (for ``min_new_tokens``) and which rows have finished.

The graph and its buffers are kept for the next batch of the same shape (:class:`GreedySteps`, ``reuse``): one
capture per setting and batch size, not one per batch. Nothing in a step may wait for the host (``.item()``, a tensor
made from Python values): the capture would fail (``tests/test_llava.py`` checks the operations a step runs).

The tokens are ``model.generate``'s greedy ones: the same positions for left-padded prompts, end-of-sequence
blocked until ``min_new_tokens``, padding after a row's end, and the output cut where the last row ended
(``tests/test_llava.py`` compares them in fp32 on the CPU, where the same steps run without a graph).

Beam search with the prompt once
--------------------------------
transformers' beam search keeps one KV cache row per beam. For a captioning prompt of 590 tokens and 20 new ones,
almost all of that cache is the prompt, identical for the beams of an image, and every decoding step copies all of
it twice: once to grow the cache, once to reorder it for the surviving beams. Here each layer keeps one
buffer per image laid out as

    [ prompt (P positions) | beam 0's tokens (T slots) | beam 1's tokens | ... | beam K-1's tokens ]

and turns the K one-token queries of an image into one attention call over that buffer, each query masked to the
prompt and to its own beam's slots. The prompt is written once; a step writes K new positions and reorders only
the generated slots. The attention itself is PyTorch's ``scaled_dot_product_attention`` over the same keys and
values, so the captions are transformers' beam search (``tests/test_llava.py`` compares them token for token).

:func:`attach_prompt_once` lays out a cache filled by a forward pass over the prompts; ``generate`` then runs inside
:func:`prompt_once_attention_for`, which points the language model at :func:`prompt_once_attention`, an attention
function that hands any other cache to transformers' own sdpa function.
"""
from __future__ import annotations

import contextlib
import contextvars
import inspect
import warnings

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicLayer

from .settings import LlavaGeneration


def generate(model, inputs: dict, generation: LlavaGeneration, pad_token_id: int,
             prompt_once: bool = True, reuse: dict | None = None) -> torch.Tensor:
    """``model.generate`` on one preprocessed batch: the prompts and the new tokens, ``(B, prompt + new)``.

    Beam search runs the prompt (image included) once per image, not once per beam: a forward pass over every
    prompt but its last token fills a KV cache, handed to ``generate``, which computes the last prompt token and
    the beams as it always does. So the captions are transformers' own beam search (the tests compare them) at a
    third of the prefill for 3 beams. With ``prompt_once`` (the default) the prompt's keys and values then stay
    once per image (:func:`attach_prompt_once`): a step copies and reorders only the generated positions. Without
    it, the cache is repeated for the beams, and every step grows and reorders the whole of it. ``reuse``: see
    :func:`graphed_greedy` (greedy with ``cache="static+graphs"`` only)."""
    from ..rehearsal.answers import logits_processors

    kw = {**generation.generate_kwargs(), **logits_processors(model, inputs["input_ids"].shape[1])}
    if generation.cache == "static+graphs":
        if graphs_supported(model, generation):
            return graphed_greedy(model, inputs, generation, pad_token_id, reuse=reuse)
    if generation.num_beams == 1 or generation.do_sample:
        return model.generate(**inputs, **kw, pad_token_id=pad_token_id)
    from transformers import DynamicCache

    # the cache argument is "cache" from transformers 5.2x, "past_key_values" before
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = DynamicCache(config=model.config)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # as generate() numbers left-padded prompts
    model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
          pixel_values=inputs["pixel_values"], use_cache=True, logits_to_keep=1, **{name: cache})  # fills the cache
    kw = {k: v for k, v in kw.items() if k not in ("cache_implementation", "disable_compile")}
    if not prompt_once:
        cache.batch_repeat_interleave(generation.num_beams)  # row i's cache for its beams i*K .. i*K + K - 1
        return model.generate(input_ids=ids, attention_mask=mask, **{name: cache}, **kw, pad_token_id=pad_token_id)
    attach_prompt_once(cache, mask[:, :-1], generation.num_beams, generation.max_new_tokens)
    with prompt_once_attention_for(model, cache):
        return model.generate(input_ids=ids, attention_mask=mask, **{name: cache}, **kw, pad_token_id=pad_token_id)


# ------------------------------------------------------------------------------------ greedy from a CUDA graph
_capture_failed = False  # once a capture has failed, later batches do not try again (each try costs memory)


def _capture(step):
    """``step`` recorded in a CUDA graph (not run), or None with one warning if something in it cannot be
    captured (an operation that waits for the host in another transformers version, say): the steps then run one by
    one, in this batch and every later one."""
    global _capture_failed
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    try:
        # thread_local: a DataLoader's pin-memory thread may call the CUDA API while this thread captures
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            step()
    except torch.OutOfMemoryError:
        raise  # the card is too small for this batch: say so, rather than decode slowly from now on
    except RuntimeError as e:
        warnings.warn(f"greedy decoding could not be captured in a CUDA graph ({str(e).splitlines()[0][:200]}); "
                      f"its steps run one by one", stacklevel=3)
        _capture_failed = True
        return None
    return graph


def graphs_supported(model, generation) -> bool:
    """Plain greedy decoding, with nothing in the model's generation config that ``generate`` would add."""
    cfg = model.generation_config
    extras = [getattr(cfg, name, None) for name in ("suppress_tokens", "begin_suppress_tokens", "bad_words_ids",
                                                     "forced_bos_token_id", "forced_eos_token_id", "sequence_bias")]
    return (generation.num_beams == 1 and not generation.do_sample and generation.repetition_penalty == 1.0
            and generation.no_repeat_ngram_size == 0 and not any(extras)
            and getattr(cfg, "repetition_penalty", 1.0) in (None, 1.0)
            and not getattr(cfg, "no_repeat_ngram_size", 0))


class GreedySteps:
    """Greedy decoding of batches of one shape (``batch`` prompts of ``prompt`` tokens, at most ``new`` new tokens):
    a static KV cache, the buffers that a step reads and writes, and the step captured in a CUDA graph on the first
    batch, then replayed for every later batch of that shape (:func:`graphed_greedy`). A batch resets the cache and
    the buffers in place, so the graph's addresses stay valid."""

    def __init__(self, model, batch: int, prompt: int, generation, pad_token_id: int, device: torch.device,
                 graphs: bool):
        from transformers import StaticCache

        from ..rehearsal.answers import answer_tokens, end_after

        self.model, self.prompt, self.new, self.pad = model, prompt, generation.max_new_tokens, pad_token_id
        self.graphs, self.graph = graphs, None
        eos = model.generation_config.eos_token_id
        self.eos = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), dtype=torch.long, device=device)
        self.min_new = torch.tensor(generation.min_new_tokens, device=device)
        self.span = answer_tokens(model)  # the rehearsal's random LLaVA: answers of 8-20 tokens (rehearsal/answers.py)
        self.end_after = end_after
        total = prompt + self.new
        self.cache = StaticCache(config=model.config, max_cache_len=total)
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        # the buffers a step reads and writes
        self.state = {
            "token": torch.empty(batch, 1, dtype=torch.long, device=device),
            "position": torch.empty(batch, 1, dtype=torch.long, device=device),
            "slot": torch.empty(1, dtype=torch.long, device=device),
            "step": torch.zeros((), dtype=torch.long, device=device),  # new tokens so far
            "finished": torch.zeros(batch, dtype=torch.bool, device=device),
            # added to the attention scores over the cache: 0 where a slot is attended to, the dtype's minimum elsewhere
            "mask": torch.empty((batch, 1, 1, total), dtype=model.dtype, device=device),
            "out": torch.empty((batch, self.new), dtype=torch.long, device=device),
            "first": torch.zeros(batch, dtype=torch.long, device=device),  # each row's first new token
        }

    def choose(self, logits: torch.Tensor) -> None:
        """The greedy token from ``logits`` (B, V): generate's MinNewTokens processor, argmax, padding after the
        end; then the buffers move one step on. Nothing here waits for the host: a graph captures it."""
        state, eos = self.state, self.eos
        blocked = logits.index_fill(-1, eos, float("-inf")) if len(eos) else logits
        logits = torch.where(state["step"] < self.min_new, blocked, logits)
        if self.span is not None:
            logits = self.end_after(logits, state["step"], state["first"], *self.span, eos[:1])
        token = logits.argmax(-1).masked_fill(state["finished"], self.pad)
        state["out"].index_copy_(1, state["step"].view(1), token[:, None])
        state["first"].copy_(torch.where(state["step"] == 0, token, state["first"]))
        state["finished"] |= torch.isin(token, eos)
        state["token"].copy_(token[:, None])
        state["step"] += 1
        state["position"] += 1
        state["slot"] += 1
        state["mask"].index_fill_(-1, state["slot"], 0.0)

    def step(self) -> None:
        """One new token for every row, from the buffers into the buffers."""
        s = self.state
        out = self.model(input_ids=s["token"], attention_mask=s["mask"], position_ids=s["position"],
                         cache_position=s["slot"], use_cache=True, logits_to_keep=1, **{self.cache_arg: self.cache})
        self.choose(out.logits[:, -1].float())

    @torch.inference_mode()
    def __call__(self, inputs: dict) -> torch.Tensor:
        """``(B, prompt + new)`` token ids of one batch, as ``model.generate`` returns them for greedy decoding."""
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        prompt, state = self.prompt, self.state
        positions = mask.long().cumsum(-1) - 1
        positions = positions.masked_fill(mask == 0, 1)  # as generate() numbers left-padded prompts
        self.cache.reset()  # the last batch's keys and values
        state["position"].copy_(positions[:, -1:])
        state["slot"].fill_(prompt - 1)
        state["step"].zero_()
        state["finished"].zero_()
        state["first"].zero_()
        state["out"].fill_(self.pad)
        state["mask"].fill_(torch.finfo(self.model.dtype).min)
        state["mask"][:, 0, 0, :prompt].masked_fill_(mask.bool(), 0.0)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                            pixel_values=inputs["pixel_values"], cache_position=torch.arange(prompt, device=ids.device),
                            use_cache=True, logits_to_keep=1, **{self.cache_arg: self.cache}).logits[:, -1]
        self.choose(logits.float())
        for t in range(1, self.new):
            if t % 4 == 0 and bool(state["finished"].all()):  # every row has ended (a sync, so not every step)
                break
            if self.graphs and self.graph is None and t >= 2:  # step 1 ran eagerly: the warm-up a capture needs
                self.graph = _capture(self.step)
                self.graphs = self.graph is not None
            if self.graph is not None:
                self.graph.replay()
            else:
                self.step()
        out = state["out"]
        if bool(state["finished"].all()):  # generate stops at the step where the last row ended
            last = int((out[:, :, None] == self.eos).any(-1).long().argmax(-1).max())
            out = out[:, : last + 1]
        else:
            out = out[:, : int(state["step"])]
        return torch.cat([ids, out], dim=1)


def graphed_greedy(model, inputs: dict, generation, pad_token_id: int, graphs: bool | None = None,
                   reuse: dict | None = None) -> torch.Tensor:
    """``(B, prompt + new)`` token ids, as ``model.generate`` returns them for greedy decoding. ``graphs``: replay
    the steps from a CUDA graph (default: on a CUDA device, unless a capture has failed in this process).
    ``reuse``: a dict that a caller keeps across its batches (:func:`hw3lib.llava.caption_records` keeps one per
    call, and empties it when it returns): a batch of the shape of the last one (and the same model and limits)
    reuses its cache and graph; any other lets them go first, so at most one is held."""
    from ..rehearsal.answers import answer_tokens

    ids = inputs["input_ids"]
    graphs = ids.device.type == "cuda" and not _capture_failed if graphs is None else graphs
    key = (tuple(ids.shape), str(ids.device), generation.max_new_tokens, generation.min_new_tokens, pad_token_id,
           id(model), model.dtype, str(model.generation_config.eos_token_id), answer_tokens(model), graphs)
    steps = reuse.get(key) if reuse is not None else None
    if steps is None:
        if reuse:
            reuse.clear()  # the other shape's cache and graph go before this one's are made
        steps = GreedySteps(model, ids.shape[0], ids.shape[1], generation, pad_token_id, ids.device, graphs)
        if reuse is not None:
            reuse[key] = steps
    return steps(inputs)


# ---------------------------------------------------------------------------- beam search with the prompt once
NAME = "hw3_prompt_once"
_active: contextvars.ContextVar["_PromptOnce | None"] = contextvars.ContextVar("hw3_prompt_once", default=None)


class _PromptOnce:
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

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, state: _PromptOnce):
        super().__init__()
        B, H, P, D = keys.shape
        K, T = state.beams, state.slots
        self.state = state
        self.kbuf = keys.new_zeros(B, P + K * T, H, D)
        self.vbuf = values.new_zeros(B, P + K * T, H, D)
        self.kbuf[:, :P] = keys.transpose(1, 2)
        self.vbuf[:, :P] = values.transpose(1, 2)
        self.device, self.is_initialized = keys.device, True
        self.keys, self.values = self.kbuf, self.vbuf  # for code that only checks that the layer holds tensors

    def _beams(self, buf: torch.Tensor) -> torch.Tensor:  # (B, K, T, H, D), a view of the generated slots
        s = self.state
        return buf[:, s.prompt:].view(s.images, s.beams, s.slots, *buf.shape[2:])

    def update(self, key_states, value_states, *args, **kwargs):
        s = self.state
        BK, H, q, D = key_states.shape
        if s.written + q > s.slots:
            raise RuntimeError(f"beam search wrote more than the {s.slots} slots it was given")
        for buf, new in ((self.kbuf, key_states), (self.vbuf, value_states)):
            self._beams(buf)[:, :, s.written:s.written + q] = new.view(s.images, s.beams, H, q, D).transpose(2, 3)
        return self.kbuf.transpose(1, 2), self.vbuf.transpose(1, 2)

    def get_seq_length(self) -> int:
        return self.state.prompt + self.state.written

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        q = args[0] if args else kwargs.get("query_length", kwargs.get("cache_position"))
        q = q if isinstance(q, int) else int(q.shape[0])
        return self.get_seq_length() + q, 0

    def get_max_length(self) -> int:
        return self.state.prompt + self.state.slots

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        s = self.state
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


def attach_prompt_once(cache, prompt_mask: torch.Tensor, beams: int, max_new: int):
    """Turn ``cache`` (a ``DynamicCache`` filled by one forward pass over the prompts, ``B`` rows) into the
    prompt-once layout for ``beams`` beams and up to ``max_new`` generated positions; returns it."""
    state = _PromptOnce(prompt_mask, beams, max_new)
    for i, layer in enumerate(cache.layers):
        cache.layers[i] = PromptOnceLayer(layer.keys, layer.values, state)
    cache.hw3_state = state
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
def prompt_once_attention_for(model, cache):
    """Inside: the language model's attention is ``prompt_once_attention``, reading ``cache``'s layout."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, prompt_once_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    config = _text_config(model)
    before = config._attn_implementation
    state = cache.hw3_state
    state.last_layer, state.before = len(cache.layers) - 1, before
    token = _active.set(state)
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = before
        _active.reset(token)
