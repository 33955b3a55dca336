"""hw3lib.rehearsal.answers: the rehearsal's random LLaVA ends its answers after a seeded length, on every path."""
import pytest
import torch
from PIL import Image

from hw3lib.llava import DEFAULT_INSTRUCTION, LlavaGeneration, build_prompt, generate
from hw3lib.rehearsal.answers import MARKER, answer_tokens, end_after


def test_end_after_forces_the_end_token_once_a_row_has_its_length():
    scores = torch.zeros(3, 10)
    first = torch.tensor([0, 1, 5])  # lengths 2 + first % 3: 2, 3, 4
    out = end_after(scores, 3, first, 2, 4, eos=9)
    assert out[0].argmax() == 9 and out[1].argmax() == 9 and torch.isinf(out[:2, :9]).all()
    assert torch.equal(out[2], scores[2])  # 3 new tokens of 4: goes on


@pytest.mark.parametrize("settings", [dict(), dict(cache="static+graphs"), dict(num_beams=3)])
def test_a_marked_model_ends_every_answer_at_its_seeded_length(llava, p1_records, monkeypatch, settings):
    model, processor = llava
    assert answer_tokens(model) is None  # a real (here: the trained stand-in's) config has no marker
    monkeypatch.setattr(model.config, MARKER, [2, 4], raising=False)
    images = [Image.open(r.image_path).convert("RGB") for r in p1_records[:6]]
    enc = dict(processor(images=images, text=[build_prompt(processor, DEFAULT_INSTRUCTION)] * 6, padding=True,
                         return_tensors="pt"))
    tok = processor.tokenizer
    with torch.inference_mode():
        free = model.generate(**enc, **LlavaGeneration(max_new_tokens=30).generate_kwargs(),
                              pad_token_id=tok.pad_token_id)
        out = generate(model, enc, LlavaGeneration(max_new_tokens=30, **settings), tok.pad_token_id)
    prompt = enc["input_ids"].shape[1]
    assert (free[:, prompt:] != tok.pad_token_id).sum(1).min() > 5  # unmarked, the stand-in says more
    for row in out[:, prompt:].tolist():
        ended = row.index(tok.eos_token_id)
        assert ended == 2 + row[0] % 3, row  # the answer's length follows from its first token
