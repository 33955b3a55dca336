"""The rehearsal's pieces on the CPU: COCO-like data with COCO's quirks, the llava-1.5 tokenizer layout and
processor, and the course decoder at its real size. (The 7B model itself is built on the GPU: docs/rehearsal.md.)"""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

from hw3lib.data import load_image, load_split, list_images
from hw3lib.rehearsal.coco import COCO_SIZES, CocoLikeSizes, write_hw3_data


def test_coco_like_data_has_the_layout_and_the_quirks(tmp_path):
    root = write_hw3_data(tmp_path / "a", CocoLikeSizes(p1_val=8, p2_train=70, p2_val=8), log=lambda *_: None,
                          workers=0)
    for ann, images in (("p1_data/val.json", "p1_data/images/val"), ("p2_data/train.json", "p2_data/images/train"),
                        ("p2_data/val.json", "p2_data/images/val")):
        records = load_split(root / ann, root / images)
        assert records and all(len(r.file_id) == 12 and r.file_id.isdigit() for r in records)
        raw = json.loads((root / ann).read_text())
        per_image = {}
        for a in raw["annotations"]:
            per_image.setdefault(a["image_id"], []).append(a["caption"])
        assert all(len(c) == 5 for c in per_image.values())
    assert len(list_images(root / "p3_data/images")) == 5
    train = json.loads((root / "p2_data/train.json").read_text())["annotations"]
    captions = [a["caption"] for a in train]
    assert any(c != c.rstrip() for c in captions), "trailing spaces / newlines"
    assert any(c.isupper() for c in captions) or any(c[:1].islower() for c in captions), "odd capitals"
    assert any(not c.rstrip().endswith(".") for c in captions), "missing full stops"
    modes, sizes, oriented = set(), set(), 0
    for path in sorted((root / "p2_data/images/train").glob("*.jpg")):
        with Image.open(path) as im:
            modes.add(im.mode)
            sizes.add(im.size)
            oriented += im.getexif().get(0x0112, 1) != 1
        assert load_image(path).mode == "RGB"
    assert {"RGB", "L", "CMYK"} <= modes and oriented == 1 and sizes <= set(COCO_SIZES) and len(sizes) > 3


def test_coco_like_data_is_the_same_with_workers(tmp_path):
    sizes = CocoLikeSizes(p1_val=3, p2_train=6, p2_val=3)
    a = write_hw3_data(tmp_path / "a", sizes, log=lambda *_: None, workers=0)
    b = write_hw3_data(tmp_path / "b", sizes, log=lambda *_: None, workers=2)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def test_llava_processor_has_the_real_token_layout():
    from hw3lib.llava import build_prompt, image_token_span
    from hw3lib.rehearsal.weights import llava_processor

    processor = llava_processor()
    tok = processor.tokenizer
    assert len(tok) == 32002  # 32,000 + <image> + <pad>, as llava-hf's; the model has 32,064 rows
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert (tok.convert_tokens_to_ids("<image>"), tok.pad_token_id) == (32000, 32001)
    prompt = build_prompt(processor, "Describe this image in one sentence.")
    assert prompt == "USER: <image>\nDescribe this image in one sentence. ASSISTANT:"
    enc = processor(images=[Image.new("RGB", (640, 480))], text=[prompt], return_tensors="pt")
    assert tuple(enc["pixel_values"].shape) == (1, 3, 336, 336)
    start, stop = image_token_span(enc["input_ids"][0], 32000)
    assert stop - start == 576 and int(enc["input_ids"][0, 0]) == 1  # 24 x 24 patches after <s>
    assert tok.decode(tok("a man riding a wave", add_special_tokens=False)["input_ids"]) == "a man riding a wave"


def test_course_decoder_at_its_real_size(tmp_path):
    import torch

    from hw3lib.decoder import Decoder, read_checkpoint
    from hw3lib.rehearsal.weights import save_course_decoder
    from hw3lib.tokenizer import BPETokenizer

    path = save_course_decoder(tmp_path, log=lambda *_: None)
    state = read_checkpoint(path)
    assert not any(k.startswith("transformer.") for k in state) and tuple(state["h.0.attn.c_attn.weight"].shape) \
        == (768, 2304)  # the course's layout: no prefix, Conv1D (in, out)
    decoder = Decoder.from_checkpoint(path)
    assert (decoder.cfg.n_layer, decoder.cfg.n_embd, decoder.cfg.vocab_size) == (12, 768, 50257)
    tok = BPETokenizer(tmp_path / "encoder.json", tmp_path / "vocab.bpe")
    assert tok.encode("Hello world") == [15496, 995]
    with torch.no_grad():
        logits = decoder(torch.tensor([tok.encode_caption("a dog")])).logits
    assert logits.shape[-1] == 50257 and np.isfinite(logits.numpy()).all()
