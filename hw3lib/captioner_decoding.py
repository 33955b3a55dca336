"""How the captioner decodes: greedy or beam search over its GPT-2 decoder with a KV cache, the visual prefix
computed once; optionally each generated token's attention over the visual tokens (for notebook 04's maps).

:class:`CaptionerGeneration` is the captioner's decoding (LLaVA's is :class:`hw3lib.llava.LlavaGeneration`, and its
decoding :mod:`hw3lib.llava.decoding`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CaptionerGeneration:
    num_beams: int = 1  # 1 = greedy
    max_new_tokens: int = 30  # caption tokens, the closing <|endoftext|> included
    length_penalty: float = 1.0  # beam score = sum log p / length ** length_penalty
    no_repeat_ngram_size: int = 0  # forbid repeating any n-gram of this size (0 = off)


@dataclass
class Generated:
    token_ids: list[list[int]]  # per image, without <|endoftext|>
    captions: list[str]
    attentions: list[torch.Tensor] | None = None  # per image (T, layers, heads, visual tokens), T = len(ids) + 1


@torch.no_grad()
def generate(model, features: torch.Tensor, gen: CaptionerGeneration = CaptionerGeneration(),
             output_attentions: bool = False) -> Generated:
    """Captions for a batch of visual features, greedy or beam search, with a KV cache.

    With ``output_attentions`` every generated token (and the closing ``<|endoftext|>``) gets the attention of
    the query that produced it over the visual tokens: (layers, heads, V) per token.
    """
    if gen.num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {gen.num_beams}")
    return _greedy(model, features, gen, output_attentions) if gen.num_beams == 1 else \
        _beam(model, features, gen, output_attentions)


def _prefill(model, features, output_attentions):
    vis = model.visual_tokens(features)
    bos = model.decoder.embed(torch.full((len(features), 1), model.tokenizer.eot_id, device=features.device))
    out = model.decoder(inputs_embeds=torch.cat([vis, bos], 1), output_attentions=output_attentions)
    return out, vis.shape[1]


def _visual_attention(out, V: int) -> torch.Tensor:
    """(B, layers, heads, V): the last query's attention over the visual positions, every layer."""
    return torch.stack([a[:, :, -1, :V] for a in out.attentions], 1).float().cpu()


def banned_tokens(tokens: list[list[int]], n: int) -> list[list[int]]:
    """Tokens that would repeat an n-gram already in each sequence."""
    if n <= 0:
        return [[] for _ in tokens]
    out = []
    for seq in tokens:
        if len(seq) < n - 1:
            out.append([])
            continue
        tail = tuple(seq[len(seq) - n + 1:]) if n > 1 else ()
        out.append([seq[i + n - 1] for i in range(len(seq) - n + 1) if tuple(seq[i : i + n - 1]) == tail])
    return out


def _greedy(model, features, gen, output_attentions) -> Generated:
    eot = model.tokenizer.eot_id
    out, V = _prefill(model, features, output_attentions)
    B = len(features)
    steps: list[torch.Tensor] = []  # (B,) per step; each row is cut at its first <|endoftext|> in _finish
    done = torch.zeros(B, dtype=torch.bool, device=features.device)
    atts = [_visual_attention(out, V)] if output_attentions else []
    for _ in range(gen.max_new_tokens):
        logits = out.logits[:, -1].float()
        if gen.no_repeat_ngram_size > 0:
            so_far = torch.stack(steps, 1).tolist() if steps else [[] for _ in range(B)]
            for i, banned in enumerate(banned_tokens(so_far, gen.no_repeat_ngram_size)):
                logits[i, banned] = float("-inf")
        nxt = logits.argmax(-1)
        steps.append(nxt)
        done |= nxt == eot
        if bool(done.all()):
            break
        out = model.decoder(nxt.view(-1, 1), past_key_values=out.past_key_values,
                            output_attentions=output_attentions)
        if output_attentions:
            atts.append(_visual_attention(out, V))
    tokens = torch.stack(steps, 1).tolist() if steps else [[] for _ in range(B)]
    return _finish(model, tokens, torch.stack(atts, 1) if atts else None)


def _beam(model, features, gen, output_attentions) -> Generated:
    eot, K = model.tokenizer.eot_id, gen.num_beams
    out, V = _prefill(model, features, output_attentions)
    B, dev = len(features), features.device
    past = [(k.repeat_interleave(K, 0), v.repeat_interleave(K, 0)) for k, v in out.past_key_values]
    logp = out.logits[:, -1].float().log_softmax(-1).repeat_interleave(K, 0)  # (B*K, vocab)
    vocab = logp.shape[-1]
    scores = torch.zeros(B, K, device=dev)
    scores[:, 1:] = float("-inf")  # all beams start equal: keep one alive so the first step fans out
    seqs: list[list[int]] = [[] for _ in range(B * K)]
    finished = torch.zeros(B * K, dtype=torch.bool, device=dev)
    lengths = torch.zeros(B * K, device=dev)
    att_hist = _visual_attention(out, V).repeat_interleave(K, 0).unsqueeze(1) if output_attentions else None
    for step in range(gen.max_new_tokens):
        for i, banned in enumerate(banned_tokens(seqs, gen.no_repeat_ngram_size)):
            if banned and not finished[i]:
                logp[i, banned] = float("-inf")
        logp[finished] = float("-inf")
        logp[finished, eot] = 0.0  # a finished beam stays as it is, at no cost
        cand = (scores.view(-1, 1) + logp).view(B, K * vocab)
        top, idx = cand.topk(K, dim=1)  # (B, K)
        src = (torch.arange(B, device=dev).view(-1, 1) * K + idx // vocab).view(-1)
        tok = (idx % vocab).view(-1)
        was_done = finished[src]
        seqs = [seqs[s] + ([] if d else [int(t)]) for s, t, d in zip(src.tolist(), tok.tolist(), was_done.tolist())]
        lengths = lengths[src] + (~was_done).float()
        finished = was_done | (tok == eot)
        scores = top
        past = [(k[src], v[src]) for k, v in past]
        if att_hist is not None:
            att_hist = att_hist[src.cpu()]
        if bool(finished.all()) or step == gen.max_new_tokens - 1:
            break
        out = model.decoder(tok.view(-1, 1), past_key_values=past, output_attentions=output_attentions)
        past = out.past_key_values
        logp = out.logits[:, -1].float().log_softmax(-1)
        if att_hist is not None:
            att_hist = torch.cat([att_hist, _visual_attention(out, V).unsqueeze(1)], 1)
    norm = (scores.view(-1) / lengths.clamp(min=1) ** gen.length_penalty).view(B, K)
    best = (torch.arange(B, device=dev) * K + norm.argmax(1)).tolist()
    tokens = [seqs[b] for b in best]
    att = None
    if att_hist is not None:
        att = [att_hist[b, : len(tokens[i])] for i, b in enumerate(best)]
    return _finish(model, tokens, att)


def _finish(model, tokens: list[list[int]], att) -> Generated:
    eot = model.tokenizer.eot_id
    ids = [seq[: seq.index(eot)] if eot in seq else seq for seq in tokens]
    captions = [model.tokenizer.decode(s).strip() for s in ids]
    attentions = None
    if att is not None:
        attentions = [att[i][: len(ids[i]) + 1] for i in range(len(ids))]
    return Generated(ids, captions, attentions)
