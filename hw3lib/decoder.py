"""The course's GPT-2 decoder (Radford et al., 2019), in the spirit of nanoGPT, loading ``decoder_model.bin``.

The checkpoint is a GPT-2 state dict in Hugging Face's Conv1D layout: ``c_attn`` / ``c_fc`` / ``c_proj`` weights are
stored ``(in, out)`` and are transposed into ``nn.Linear``; keys may or may not start with ``transformer.``; the
causal-mask buffers (``attn.bias``, ``attn.masked_bias``) are ignored. Module names copy the checkpoint's keys.

Attention has two paths: the fused one (``F.scaled_dot_product_attention``) by default, and an explicit one that
computes the softmax weights so that they can be returned (``output_attentions=True``). Optional LoRA layers
(loralib, Hu et al., 2021) are built *in place of* the linears before the checkpoint is loaded, so the frozen base
keeps the checkpoint's weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import atomic_path

_CONV1D = (".c_attn.weight", ".c_fc.weight", ".c_proj.weight")  # stored (in, out) in the checkpoint
_IGNORED = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of old HF / the course's Attention


@dataclass
class DecoderConfig:
    n_layer: int = 12  # GPT-2 small, as the course's decoder_model.bin
    n_head: int = 12  # head size 64, like every GPT-2
    n_embd: int = 768
    vocab_size: int = 50257  # 50,000 merges + 256 bytes + <|endoftext|>
    block_size: int = 1024  # positions of wpe: visual tokens + caption must fit
    dropout: float = 0.0  # GPT-2 was trained with 0.1; the frozen decoder runs without


LORA_TARGETS = ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj", "lm_head")  # the linears that can take LoRA


@dataclass
class LoraConfig:
    r: int = 0  # rank; 0 = no LoRA
    alpha: int = 16  # scaling = alpha / r (loralib)
    dropout: float = 0.0  # on the LoRA branch's input
    # which linears get LoRA: "c_attn" (q, v), "attn.c_proj", "c_fc", "mlp.c_proj", "lm_head"
    targets: tuple[str, ...] = ("c_attn",)
    c_attn_qkv: tuple[bool, bool, bool] = (True, False, True)  # q, k, v parts of the fused c_attn (the paper's q, v)

    def __post_init__(self):
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown:  # a misspelt layer would silently get no LoRA
            raise ValueError(f"LoRA targets {unknown} match no layer of the decoder; known: {', '.join(LORA_TARGETS)}")

    @staticmethod
    def parse_targets(text: str) -> tuple[str, ...]:
        """``"c_attn, c_fc"`` -> ``("c_attn", "c_fc")`` (a notebook parameter is one string)."""
        return tuple(t.strip() for t in text.split(",") if t.strip())


def _linear(in_f: int, out_f: int, name: str, lora: LoraConfig | None, bias: bool = True) -> nn.Linear:
    if lora is None or lora.r <= 0 or name not in lora.targets:
        return nn.Linear(in_f, out_f, bias=bias)
    import loralib

    kw = dict(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, merge_weights=False)
    if name == "c_attn":
        return loralib.MergedLinear(in_f, out_f, enable_lora=list(lora.c_attn_qkv), bias=bias, **kw)
    return loralib.Linear(in_f, out_f, bias=bias, **kw)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: DecoderConfig, lora: LoraConfig | None = None):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.c_attn = _linear(cfg.n_embd, 3 * cfg.n_embd, "c_attn", lora)  # fused q, k, v
        self.c_proj = _linear(cfg.n_embd, cfg.n_embd, "attn.c_proj", lora)
        self.n_head, self.n_embd, self.dropout = cfg.n_head, cfg.n_embd, cfg.dropout

    def forward(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None,
                output_attentions: bool = False):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if past is not None:  # keys / values of the earlier positions, (B, nh, P, hs)
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        S = k.shape[2]  # the T queries are the last T of S positions
        att = None
        if output_attentions:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(k.shape[-1])  # (B, nh, T, S)
            causal = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
            att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)
            y = F.dropout(att, self.dropout, self.training) @ v
        elif T == 1 or T == S:  # plain causal (prefill) or one new token that sees everything
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, dropout_p=self.dropout if self.training else 0)
        else:  # several new tokens after a cache
            causal = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal,
                                               dropout_p=self.dropout if self.training else 0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y), (k, v), att


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig, lora: LoraConfig | None = None):
        super().__init__()
        self.c_fc = _linear(cfg.n_embd, 4 * cfg.n_embd, "c_fc", lora)
        self.act = nn.GELU(approximate="tanh")  # GPT-2's gelu_new
        self.c_proj = _linear(4 * cfg.n_embd, cfg.n_embd, "mlp.c_proj", lora)

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig, lora: LoraConfig | None = None):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg, lora)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg, lora)

    def forward(self, x, past=None, output_attentions=False):
        a, present, att = self.attn(self.ln_1(x), past, output_attentions)
        x = x + a
        return x + self.mlp(self.ln_2(x)), present, att


def call_block(block: Block, x: torch.Tensor, past=None, output_attentions: bool = False):
    """``block(x, past, output_attentions)``; compiled once, it serves every block of the same shapes (the code and
    the shapes are the same; the weights are the compiled function's inputs)."""
    return block(x, past, output_attentions)


@dataclass
class DecoderOutput:
    logits: torch.Tensor  # (B, T, vocab); the last hidden states (B, T, C) when called with logits=False
    loss: torch.Tensor | None = None  # mean next-token cross-entropy over targets != -100
    past_key_values: list | None = None  # per layer (k, v), each (B, nh, S, hs)
    attentions: list | None = field(default=None)  # per layer (B, nh, T, S) when output_attentions


class Decoder(nn.Module):
    """GPT-2 language model with tied input/output embeddings.

    ``forward`` takes token ids or ready embeddings (the captioner prepends visual tokens), an optional KV cache and
    the position of the first token (``position_offset``, for cached decoding).
    """

    def __init__(self, cfg: DecoderConfig, lora: LoraConfig | None = None):
        super().__init__()
        self.cfg, self.lora = cfg, lora
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            h=nn.ModuleList([Block(cfg, lora) for _ in range(cfg.n_layer)]),
            ln_f=nn.LayerNorm(cfg.n_embd),
        ))
        self.lm_head = _linear(cfg.n_embd, cfg.vocab_size, "lm_head", lora, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as GPT-2
        self.apply(self._init_weights)
        # how forward runs a block: None calls it (call_block); training may set a compiled call_block for the
        # duration of a step (hw3lib.train, compile_scope "blocks"): one compiled block serves all of them
        self.block_call = None

    @staticmethod
    def _init_weights(m: nn.Module) -> None:  # GPT-2's init; LoRA's own (B = 0) is restored below
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if hasattr(m, "lora_B"):
            m.reset_parameters()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (without positions), (B, T, C)."""
        return self.transformer.wte(input_ids)

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, past_key_values: list | None = None,
                position_offset: int | torch.Tensor = 0, output_attentions: bool = False,
                logits: bool = True) -> DecoderOutput:
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = x.shape
        past_len = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        pos = torch.arange(T, device=x.device) + past_len
        if torch.is_tensor(position_offset):  # per-row offsets: the check reads them back from the device
            pos = pos + position_offset.view(-1, 1)
            last = int(pos.max())
        else:  # known on the host: no device sync (and nothing that stops torch.compile's graph)
            pos, last = pos + position_offset, past_len + T - 1 + position_offset
        if last >= self.cfg.block_size:
            raise ValueError(f"position {last} is past block_size {self.cfg.block_size}")
        x = F.dropout(x + self.transformer.wpe(pos), self.cfg.dropout, self.training)
        presents, attentions = [], [] if output_attentions else None
        call = self.block_call or call_block
        for i, block in enumerate(self.transformer.h):
            x, present, att = call(block, x, None if past_key_values is None else past_key_values[i],
                                   output_attentions)
            presents.append(present)
            if output_attentions:
                attentions.append(att)
        if not logits:  # only the KV cache is wanted (a shared prefix): skip ln_f and the vocabulary projection
            return DecoderOutput(x, None, presents, attentions)
        out = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(out.float().view(-1, out.size(-1)), targets.reshape(-1), ignore_index=-100)
        return DecoderOutput(out, loss, presents, attentions)

    # ------------------------------------------------------------------------------------------- checkpoint I/O
    @classmethod
    def from_checkpoint(cls, path: str | Path, cfg: DecoderConfig | None = None,
                        lora: LoraConfig | None = None) -> "Decoder":
        """Build the decoder (with LoRA layers, if any) and load the course checkpoint into it.

        Args:
            path: ``decoder_model.bin`` (``torch.save`` of a GPT-2 state dict in Conv1D layout).
            cfg: the architecture; inferred from the tensor shapes when omitted (head size 64).
            lora: LoRA layers to build before loading; their weights stay at loralib's init (B = 0).
        """
        state = read_checkpoint(path)
        model = cls(cfg or config_from_state_dict(state, path), lora)
        model.load_course_state_dict(state, path)
        return model

    def load_course_state_dict(self, state: dict[str, torch.Tensor], source: str | Path = "state dict") -> None:
        """Copy a course-format state dict into the base weights; every key and shape is checked first."""
        expected = {k: v for k, v in self.transformer.state_dict().items() if ".lora_" not in k}
        got = {}
        for key, value in state.items():
            key = key[len("transformer."):] if key.startswith("transformer.") else key
            if key.endswith(_IGNORED) or key == "lm_head.weight":
                continue
            if key.endswith(_CONV1D):
                if value.dim() != 2:
                    raise ValueError(f"{source}: {key} has shape {tuple(value.shape)}, expected a 2-D Conv1D weight")
                value = value.t()
            got[key] = value
        missing = [k for k in expected if k not in got]
        unexpected = [k for k in got if k not in expected]
        if missing or unexpected:
            raise ValueError(f"{source}: checkpoint does not match a {self.cfg.n_layer}-layer GPT-2 decoder: "
                             f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                             f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        for key, value in got.items():
            want = tuple(expected[key].shape)
            have = tuple(value.shape) if not key.endswith(_CONV1D) else tuple(value.t().shape)
            if tuple(value.shape) != want:
                conv = " (stored (in, out), transposed on load)" if key.endswith(_CONV1D) else ""
                raise ValueError(f"{source}: {key} has shape {have}{conv}, the model expects "
                                 f"{want if not key.endswith(_CONV1D) else want[::-1]}")
        with torch.no_grad():
            self.transformer.load_state_dict({k: v.to(expected[k].dtype) for k, v in got.items()}, strict=False)

    def course_state_dict(self) -> dict[str, torch.Tensor]:
        """The base weights in the course's format (no prefix, Conv1D layout, no LoRA, no lm_head)."""
        out = {}
        for key, value in self.transformer.state_dict().items():
            if ".lora_" in key:
                continue
            out[key] = value.t().contiguous() if key.endswith(_CONV1D) else value.clone()
        return out


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """``torch.load`` a decoder checkpoint safely (tensors only) with an error that names the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: decoder checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError / EOFError / UnpicklingError for broken files
        # torch's own text for a file it cannot unpickle is a paragraph advising weights_only=False (arbitrary code
        # execution): wrong advice for a broken file; its first sentence is enough
        first = str(e).strip().split(". ")[0].splitlines()[0] if str(e).strip() else ""
        if "Weights only load failed" in first:
            first = "not a torch.save file of tensors"
        raise ValueError(f"{path}: cannot read the decoder checkpoint (truncated or not a torch.save file; the "
                         f"course's is 500 MB): {type(e).__name__}: {first}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return state


def config_from_state_dict(state: dict[str, torch.Tensor], source: str | Path = "state dict",
                           head_size: int = 64) -> DecoderConfig:
    """The architecture implied by a checkpoint's shapes (GPT-2's head size is 64 at every scale)."""
    strip = {(k[len("transformer."):] if k.startswith("transformer.") else k): v for k, v in state.items()}
    for key in ("wte.weight", "wpe.weight"):
        if key not in strip:
            raise ValueError(f"{source}: missing key {key!r}; not a GPT-2 state dict (keys: {list(strip)[:5]} ...)")
    layers = {int(k.split(".")[1]) for k in strip if k.startswith("h.")}
    vocab, n_embd = strip["wte.weight"].shape
    return DecoderConfig(n_layer=max(layers) + 1 if layers else 0, n_head=max(1, n_embd // head_size), n_embd=n_embd,
                         vocab_size=vocab, block_size=strip["wpe.weight"].shape[0])


def save_checkpoint(model: Decoder, path: str | Path) -> None:
    """Write ``decoder_model.bin`` in the course's format, atomically."""
    with atomic_path(path) as tmp:
        torch.save(model.course_state_dict(), tmp)
