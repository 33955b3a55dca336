"""GPT-2 byte-level BPE read from the course's ``encoder.json`` + ``vocab.bpe``.

Follows OpenAI's ``gpt-2/src/encoder.py`` (Radford et al., 2019): text -> UTF-8 bytes mapped to printable unicode
characters -> pre-tokenised by the GPT-2 regex -> merged by rank. ``<|endoftext|>`` both starts and ends a caption,
as in the course's decoder.

Why not ``transformers.GPT2TokenizerFast(vocab_file=..., merges_file=...)``? With transformers 5.x that call
silently builds a one-token tokenizer that encodes everything to ``[]``. This file has no such trap and is checked
against the ``tokenizers`` library in the tests.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import regex

EOT = "<|endoftext|>"
_PAT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable character table of GPT-2 (whitespace/control bytes moved above 255)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class BPETokenizer:
    """Encode/decode with a GPT-2 vocabulary.

    Args:
        encoder_json: path of ``encoder.json`` (token string -> id).
        vocab_bpe: path of ``vocab.bpe`` (merges, one ``a b`` pair per line, after a ``#version`` line).
    """

    def __init__(self, encoder_json: str | Path, vocab_bpe: str | Path):
        self.encoder_path, self.merges_path = Path(encoder_json), Path(vocab_bpe)
        try:
            self.encoder: dict[str, int] = json.loads(self.encoder_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"{self.encoder_path}: not a readable GPT-2 encoder.json ({e})") from e
        if not isinstance(self.encoder, dict) or EOT not in self.encoder:
            raise ValueError(f"{self.encoder_path}: a GPT-2 encoder.json maps token -> id and contains {EOT!r}")
        try:
            lines = self.merges_path.read_text(encoding="utf-8").split("\n")
        except OSError as e:
            raise ValueError(f"{self.merges_path}: cannot read vocab.bpe ({e})") from e
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        bad = [m for m in merges if len(m) != 2]
        if bad:
            raise ValueError(f"{self.merges_path}: a merge line must hold two symbols, got {' '.join(bad[0])!r}")
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.decoder = {v: k for k, v in self.encoder.items()}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        self.eot_id: int = self.encoder[EOT]
        self._cache: dict[str, list[str]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def _bpe(self, token: str) -> list[str]:
        if token in self._cache:
            return self._cache[token]
        word = list(token)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self._cache[token] = word
        return word

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added). Raises ``KeyError`` naming a piece the vocab lacks."""
        ids: list[int] = []
        for piece in regex.findall(_PAT, text):
            chars = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            for tok in self._bpe(chars):
                try:
                    ids.append(self.encoder[tok])
                except KeyError:
                    raise KeyError(f"token {tok!r} of {text!r} is not in {self.encoder_path}") from None
        return ids

    def decode(self, ids) -> str:
        """Text of ``ids``; ``<|endoftext|>`` is dropped."""
        toks = "".join(self.decoder[int(i)] for i in ids if int(i) != self.eot_id)
        return bytearray(self.byte_decoder[c] for c in toks).decode("utf-8", errors="replace")

    def encode_caption(self, caption: str) -> list[int]:
        """``<|endoftext|> caption <|endoftext|>``: the course's training format."""
        return [self.eot_id, *self.encode(caption), self.eot_id]

    def token_strings(self, ids) -> list[str]:
        """Each id's text (for attention-map titles: one entry per token, sub-words not merged)."""
        return [bytearray(self.byte_decoder[c] for c in self.decoder[int(i)]).decode("utf-8", errors="replace")
                for i in ids]
