import json

import pytest
import torch
from safetensors.torch import load_file

from hw3lib.captioner import (CaptionerConfig, EncoderConfig, CaptionerGeneration, build, checked_trainable_count, load_adapter,
                              course_files, save_adapter)
from hw3lib.data import load_split
from hw3lib.decoder import Decoder, LoraConfig
from hw3lib.captioner import extract_features


def _cfg(world, models_dir, **lora):
    return CaptionerConfig(encoder=EncoderConfig(name=str(models_dir / "vit"), pool=2),
                           lora=LoraConfig(**{"r": 4, "alpha": 8, "targets": ("c_attn", "c_fc", "mlp.c_proj"),
                                              **lora}),
                           **course_files(world))


@pytest.fixture(scope="module")
def setup(world, models_dir):
    torch.manual_seed(0)
    model, encoder, transform = build(_cfg(world, models_dir))
    records = load_split(world / "p2_data/val.json", world / "p2_data/images/val")[:6]
    feats = extract_features(encoder, transform, records, model.cfg.encoder).float()
    with torch.no_grad():  # a trained-looking adapter: non-zero LoRA B, so that LoRA changes the output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model.eval(), encoder, transform, records, feats


def test_lora_at_init_leaves_the_decoder_unchanged(world, models_dir):
    model, _, _ = build(_cfg(world, models_dir), with_encoder=False, encoder_dim=192)
    plain = Decoder.from_checkpoint(course_files(world)["decoder_checkpoint"]).eval()
    ids = torch.randint(0, plain.cfg.vocab_size, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(model.decoder.eval()(ids).logits, plain(ids).logits)


def test_only_projection_and_lora_train(setup):
    model = setup[0]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(("proj.", "visual_norm.")) or ".lora_" in n for n in trainable)
    assert any(".lora_A" in n for n in trainable) and any(n.startswith("proj.") for n in trainable)
    assert not any(p.requires_grad for n, p in model.decoder.named_parameters() if ".lora_" not in n)
    assert model.trainable_parameters() == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_count_check(setup):
    model = setup[0]
    n = model.trainable_parameters()
    assert checked_trainable_count(model) == n
    with pytest.raises(ValueError, match=f"{n:,} trainable parameters"):
        checked_trainable_count(model, limit=n)


def test_loss_covers_caption_tokens_only(setup):
    model, _, _, records, feats = setup
    ids, targets = model.batch_captions([r.references[0] for r in records])
    assert (ids[:, 0] == model.tokenizer.eot_id).all()
    out = model(feats, ids, targets)
    V = feats.shape[1]
    assert out.logits.shape[1] == V + ids.shape[1]
    manual = torch.nn.functional.cross_entropy(out.logits[:, V:].reshape(-1, out.logits.shape[-1]), targets.reshape(-1),
                                               ignore_index=-100)
    torch.testing.assert_close(out.loss, manual)


def test_save_load_round_trip(setup, tmp_path, world):
    model = setup[0]
    path = save_adapter(model, tmp_path / "adapter")
    again, _, _ = load_adapter(path, with_encoder=True)
    saved = load_file(str(path))
    assert set(saved) == {n for n, p in model.named_parameters() if p.requires_grad}
    for n, p in again.named_parameters():
        if n in saved:
            assert torch.equal(p.detach(), model.state_dict()[n]), n
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["trainable_params"] == model.trainable_parameters()


def test_load_rejects_wrong_adapters(setup, tmp_path):
    from safetensors.torch import save_file

    model = setup[0]
    path = save_adapter(model, tmp_path / "a")
    state = load_file(str(path))
    key = next(k for k in state if "lora_A" in k)
    state[key] = state[key][:1]
    save_file(state, str(path))
    with pytest.raises(ValueError, match=f"{key.replace('.', '[.]')} has shape"):
        load_adapter(path)
    del state[key]
    save_file(state, str(path))
    with pytest.raises(ValueError, match="missing"):
        load_adapter(path)
    with pytest.raises(FileNotFoundError, match="adapter file not found"):
        load_adapter(tmp_path / "none")


def test_one_beam_equals_greedy(setup):
    model, _, _, _, feats = setup
    gen = CaptionerGeneration(max_new_tokens=12)
    from hw3lib.captioner_decoding import _beam, _greedy

    greedy = _greedy(model, feats, gen, False)
    beam1 = _beam(model, feats, gen, False)
    assert greedy.token_ids == beam1.token_ids


@pytest.mark.parametrize("beams", [1, 3])
def test_batched_equals_one_at_a_time(setup, beams):
    model, _, _, _, feats = setup
    gen = CaptionerGeneration(num_beams=beams, max_new_tokens=12, no_repeat_ngram_size=2)
    batched = model.generate(feats, gen).captions
    single = [model.generate(feats[i : i + 1], gen).captions[0] for i in range(len(feats))]
    assert batched == single


def test_attention_capture(setup):
    model, _, _, _, feats = setup
    off = model.generate(feats, CaptionerGeneration(max_new_tokens=8))
    assert off.attentions is None
    for beams in (1, 2):
        on = model.generate(feats, CaptionerGeneration(num_beams=beams, max_new_tokens=8), output_attentions=True)
        assert on.captions == model.generate(feats, CaptionerGeneration(num_beams=beams, max_new_tokens=8)).captions
        for ids, att in zip(on.token_ids, on.attentions):
            L, H = model.decoder.cfg.n_layer, model.decoder.cfg.n_head
            assert att.shape[0] in (len(ids), len(ids) + 1) and att.shape[1:] == (L, H, feats.shape[1])
            assert (att >= 0).all() and (att.sum(-1) <= 1 + 1e-5).all()  # a share of each query's attention


def test_no_repeat_ngram():
    from hw3lib.captioner_decoding import banned_tokens

    assert banned_tokens([[1, 2, 3, 1, 2]], 3) == [[3]]
    assert banned_tokens([[1, 2, 1]], 2) == [[2]]
    assert banned_tokens([[5]], 0) == [[]]


def test_shared_prefix_equals_the_full_forward(setup):
    model, _, _, records, feats = setup
    image_index = torch.tensor([0, 0, 1, 2, 2, 2])
    ids, targets = model.batch_captions([records[int(i)].references[k % 5] for k, i in enumerate(image_index)])
    full = model(feats[image_index], ids, targets)
    shared = model.forward_shared(feats[:3], image_index, ids, targets)
    torch.testing.assert_close(shared.loss, full.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared.logits, full.logits[:, feats.shape[1]:], atol=1e-4, rtol=1e-4)
