import json

import pytest

from hw3lib.tokenizer import BPETokenizer

TEXTS = ["A small red circle and a large blue square.", "there is a green star on a gray background",
         "Hello, wörld! It's 3.5 inches — ünïcödé 😀 and\ttabs  ", "x" * 50, ""]


@pytest.fixture(scope="module")
def tok(models_dir):
    return BPETokenizer(models_dir / "decoder/encoder.json", models_dir / "decoder/vocab.bpe")


def test_round_trips_real_text(tok):
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("a red circle")
    assert 0 < len(ids) <= 3, "the world's words are single tokens of the stand-in vocabulary"


def test_matches_the_tokenizers_library(tok, models_dir):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    ref = Tokenizer(models.BPE.from_file(str(models_dir / "decoder/encoder.json"),
                                         str(models_dir / "decoder/vocab.bpe")))
    ref.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    ref.decoder = decoders.ByteLevel()
    for text in TEXTS[:-1]:
        assert tok.encode(text) == ref.encode(text).ids, text


def test_endoftext_starts_and_ends_a_caption(tok):
    ids = tok.encode_caption("a blue star")
    assert ids[0] == ids[-1] == tok.eot_id == tok.vocab_size - 1
    assert tok.decode(ids) == "a blue star"
    assert tok.token_strings(tok.encode("a blue star")) == ["a", " blue", " star"]


def test_bad_files(tmp_path, models_dir):
    (tmp_path / "encoder.json").write_text(json.dumps({"a": 0}))
    with pytest.raises(ValueError, match=r"encoder\.json: a GPT-2 encoder.json maps token -> id and contains "
                                         r"'<\|endoftext\|>'"):
        BPETokenizer(tmp_path / "encoder.json", models_dir / "decoder/vocab.bpe")
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\na b c\n")
    with pytest.raises(ValueError, match=r"vocab\.bpe: a merge line must hold two symbols"):
        BPETokenizer(models_dir / "decoder/encoder.json", tmp_path / "vocab.bpe")


def test_real_gpt2_files_give_known_ids():
    """The course's real encoder.json / vocab.bpe (data/gpt2/, with provenance): GPT-2's published ids."""
    from pathlib import Path

    gpt2 = Path(__file__).resolve().parents[1] / "data/gpt2"
    real = BPETokenizer(gpt2 / "encoder.json", gpt2 / "vocab.bpe")
    assert real.vocab_size == 50257 and real.eot_id == 50256
    assert real.encode("Hello world") == [15496, 995]
    assert real.encode(" The quick brown fox") == [383, 2068, 7586, 21831]
    assert real.decode(real.encode_caption("A man riding a wave.")) == "A man riding a wave."
