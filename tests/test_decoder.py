import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hw3lib.decoder import Decoder, DecoderConfig, LoraConfig, config_from_state_dict, read_checkpoint

TINY = dict(n_layer=2, n_head=2, n_embd=128, vocab_size=101, block_size=64)  # head size 64, as GPT-2


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=128, vocab_size=101, n_positions=64, bos_token_id=100,
                     eos_token_id=100)
    return GPT2LMHeadModel(cfg).eval()


def _save_course_file(hf_model, path, prefix=""):
    """As the course saved decoder_model.bin: the transformer's state dict, Conv1D layout, causal buffers kept."""
    sd = {prefix + k: v for k, v in hf_model.transformer.state_dict().items()}
    for i in range(hf_model.config.n_layer):  # old transformers versions stored these buffers too
        sd[f"{prefix}h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
    torch.save(sd, path)
    return path


@pytest.mark.parametrize("prefix", ["", "transformer."])
def test_logits_equal_hugging_face(hf_model, tmp_path, prefix):
    path = _save_course_file(hf_model, tmp_path / "decoder_model.bin", prefix)
    model = Decoder.from_checkpoint(path).eval()
    assert model.cfg == DecoderConfig(**TINY)  # inferred from the shapes
    idx = torch.randint(0, 101, (3, 17))
    with torch.no_grad():
        ref = hf_model(idx).logits
        fused = model(idx)
        explicit = model(idx, output_attentions=True)
    torch.testing.assert_close(fused.logits, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(explicit.logits, ref, atol=1e-5, rtol=1e-5)
    assert fused.attentions is None
    att = explicit.attentions
    assert len(att) == 2 and att[0].shape == (3, 2, 17, 17)
    torch.testing.assert_close(att[1].sum(-1), torch.ones(3, 2, 17))
    assert att[0].triu(diagonal=1).abs().max() == 0  # causal


def test_kv_cache_and_offsets_match_the_full_pass(hf_model, tmp_path):
    model = Decoder.from_checkpoint(_save_course_file(hf_model, tmp_path / "d.bin")).eval()
    idx = torch.randint(0, 101, (2, 12))
    with torch.no_grad():
        full = model(idx, position_offset=5).logits
        first = model(idx[:, :8], position_offset=5)
        second = model(idx[:, 8:], past_key_values=first.past_key_values, position_offset=5)
        step = model(idx[:, 8:9], past_key_values=first.past_key_values, position_offset=5, output_attentions=True)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step.logits[:, 0], full[:, 8], atol=1e-5, rtol=1e-5)
    assert step.attentions[0].shape == (2, 2, 1, 9)
    with pytest.raises(ValueError, match="past block_size 64"):
        model(idx, position_offset=60)


def test_round_trip_course_format(hf_model, tmp_path):
    from hw3lib.decoder import save_checkpoint

    model = Decoder.from_checkpoint(_save_course_file(hf_model, tmp_path / "d.bin"))
    save_checkpoint(model, tmp_path / "again.bin")
    again = read_checkpoint(tmp_path / "again.bin")
    orig = hf_model.transformer.state_dict()
    assert set(again) == {k for k in orig if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    for k, v in again.items():
        assert torch.equal(v, orig[k]), k


def test_lora_at_init_leaves_logits_unchanged(hf_model, tmp_path):
    path = _save_course_file(hf_model, tmp_path / "d.bin")
    base = Decoder.from_checkpoint(path).eval()
    targets = ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj", "lm_head")
    lora = Decoder.from_checkpoint(path, lora=LoraConfig(r=4, targets=targets)).eval()
    assert lora.lm_head.weight is lora.transformer.wte.weight  # still tied with a LoRA lm_head
    assert any("lora_A" in n for n, _ in lora.named_parameters())
    idx = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(lora(idx).logits, base(idx).logits)


def test_bad_checkpoints(hf_model, tmp_path):
    good = _save_course_file(hf_model, tmp_path / "good.bin")
    data = good.read_bytes()
    (tmp_path / "trunc.bin").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match=r"trunc\.bin: cannot read the decoder checkpoint \(truncated"):
        Decoder.from_checkpoint(tmp_path / "trunc.bin")
    with pytest.raises(FileNotFoundError, match=r"none\.bin: decoder checkpoint not found"):
        Decoder.from_checkpoint(tmp_path / "none.bin")

    sd = torch.load(good, weights_only=True)
    sd["h.1.mlp.c_fc.weight"] = sd["h.1.mlp.c_fc.weight"][:, :500]
    torch.save(sd, tmp_path / "shape.bin")
    with pytest.raises(ValueError, match=r"shape\.bin: h\.1\.mlp\.c_fc\.weight has shape \(128, 500\) .*"
                                         r"expects \(128, 512\)"):
        Decoder.from_checkpoint(tmp_path / "shape.bin", DecoderConfig(**TINY))

    sd = torch.load(good, weights_only=True)
    del sd["h.0.ln_2.bias"]
    torch.save(sd, tmp_path / "missing.bin")
    with pytest.raises(ValueError, match=r"missing\.bin: .*missing keys \['h\.0\.ln_2\.bias'\]"):
        Decoder.from_checkpoint(tmp_path / "missing.bin")

    with pytest.raises(ValueError, match=r"good\.bin: checkpoint does not match a 3-layer"):
        Decoder.from_checkpoint(good, DecoderConfig(**{**TINY, "n_layer": 3}))
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.bin")
    with pytest.raises(ValueError, match=r"other\.bin: missing key 'wte\.weight'"):
        config_from_state_dict(read_checkpoint(tmp_path / "other.bin"), tmp_path / "other.bin")


def test_demo_standin_loads(models_dir):
    from hw3lib.tokenizer import BPETokenizer

    model = Decoder.from_checkpoint(models_dir / "decoder/decoder_model.bin").eval()
    tok = BPETokenizer(models_dir / "decoder/encoder.json", models_dir / "decoder/vocab.bpe")
    assert model.cfg.vocab_size == tok.vocab_size

    def loss(text, offset=0):
        ids = torch.tensor([tok.encode_caption(text)])
        with torch.no_grad():
            return model(ids[:, :-1], targets=ids[:, 1:], position_offset=offset).loss.item()

    good = "there is a red circle and a blue square on a gray background"
    scrambled = "background circle on gray a red is there and a blue square a"
    assert loss(good) < 0.5 * loss(scrambled), "the stand-in learned the captions' language"
    assert abs(loss(good, offset=150) - loss(good)) < 0.25, "... at late positions too (after a visual prefix)"
