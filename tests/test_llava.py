"""hw3lib.llava on the committed LLaVA stand-in (a real LlavaForConditionalGeneration + processor)."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hw3lib.data import DataError, list_images, load_image
from hw3lib.llava import (DEFAULT_INSTRUCTION, LlavaGeneration, attention_maps, build_prompt, caption_folder,
                          caption_records, image_token_span, load_llava, postprocess, use_fast_kernels)


def test_prompt_is_the_llava_conversation(llava):
    _, processor = llava
    assert build_prompt(processor, "Describe it.") == "USER: <image>\nDescribe it. ASSISTANT:"


def test_postprocess():
    assert postprocess("  a red  circle.\n It is big. ") == "a red circle. It is big."
    assert postprocess("a red circle. It is big.", first_sentence=True) == "a red circle."
    assert postprocess("3.5 red circles", first_sentence=True) == "3.5 red circles"
    assert postprocess("no full stop", first_sentence=True) == "no full stop"


def test_generation_kwargs_and_labels():
    assert LlavaGeneration().label == "greedy"
    assert LlavaGeneration(num_beams=3).label == "beam 3"
    assert LlavaGeneration(do_sample=True, temperature=0.7).label == "sample T=0.7"
    kw = LlavaGeneration(num_beams=3, max_new_tokens=12).generate_kwargs()
    assert kw["num_beams"] == 3 and kw["max_new_tokens"] == 12 and kw["temperature"] is None
    with pytest.raises(ValueError, match="beams"):
        LlavaGeneration.from_dict({"beams": 3})


def test_image_span_equals_what_the_processor_produced(llava, p1_records):
    """Left padding shifts the span; the span is read from the ids, and its length is the 8 x 8 grid."""
    model, processor = llava
    from PIL import Image

    image = Image.open(p1_records[0].image_path)
    prompts = [build_prompt(processor, "Hi."), build_prompt(processor, "Describe this image in great detail.")]
    enc = processor(images=[image, image], text=prompts, padding=True, return_tensors="pt")
    tok = processor.tokenizer
    head = len(tok("USER: ")["input_ids"])  # <s> + "USER: " come before the image
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    for row, mask in zip(enc["input_ids"], enc["attention_mask"]):
        pads = int((mask == 0).sum())
        start, stop = image_token_span(row, model.config.image_token_id)
        assert (start, stop) == (pads + head, pads + head + grid * grid)
    assert int((enc["attention_mask"][0] == 0).sum()) > 0  # the short prompt really was padded on the left
    with pytest.raises(ValueError, match="contiguous"):
        image_token_span(torch.tensor([5, 9, 9, 5, 9]), 9)


def test_batched_greedy_equals_one_at_a_time(llava, p1_records):
    model, processor = llava
    assert use_fast_kernels(model) is False  # Liger's kernels: GPU only; the model is left as it is
    recs = p1_records[:8]
    gen = LlavaGeneration(max_new_tokens=20)
    batched = caption_records(model, processor, recs, generation=gen, batch_size=4, progress=False)
    single = caption_records(model, processor, recs, generation=gen, batch_size=1, progress=False)
    assert batched == single
    assert all(len(c.split()) >= 2 for c in batched.values())
    # with workers, each prepares a slice of a batch, joined to exactly the batch size (6 / 2 workers: slices of 3;
    # 5 / 2 workers: slices of 1, as 3 does not divide 5)
    for batch, sizes in ((6, [6, 2]), (5, [5, 3])):
        seen = []
        sliced = caption_records(model, processor, recs, generation=gen, batch_size=batch, num_workers=2,
                                 progress=False, on_batch=lambda b: seen.append(list(b)))
        assert sliced == single and list(sliced) == [r.file_id for r in recs]
        assert [len(b) for b in seen] == sizes


@pytest.mark.parametrize("settings", [dict(num_beams=3), dict(num_beams=2, length_penalty=0.5),
                                      dict(num_beams=3, no_repeat_ngram_size=2, min_new_tokens=4),
                                      dict(num_beams=3, cache="static"), dict(num_beams=3, padded=True)])
@pytest.mark.parametrize("prompt_once", [True, False])
def test_beam_search_with_one_prefill_per_image_equals_transformers_beam_search(llava, p1_records, settings,
                                                                                prompt_once):
    """generate() runs the prompt once per image, not once per beam. With prompt_once its keys and values stay
    once per image (hw3lib.llava.decoding); without, the cache is repeated for the beams. Either way the result is token
    for token what model.generate(num_beams=K) gives. "padded" mixes instructions of different lengths, so the
    prompts are left-padded."""
    from hw3lib.llava import generate

    model, processor = llava
    settings = dict(settings)
    padded = settings.pop("padded", False)
    instructions = [DEFAULT_INSTRUCTION, "Shapes?", "Name every shape and colour in this picture, one by one."]
    texts = [build_prompt(processor, instructions[i % 3] if padded else DEFAULT_INSTRUCTION) for i in range(6)]
    gen = LlavaGeneration(max_new_tokens=12, **settings)
    images = [Image.open(r.image_path).convert("RGB") for r in p1_records[:6]]
    enc = dict(processor(images=images, text=texts, padding=True, return_tensors="pt"))
    with torch.inference_mode():
        ref = model.generate(**enc, **gen.generate_kwargs(), pad_token_id=processor.tokenizer.pad_token_id)
        ours = generate(model, enc, gen, processor.tokenizer.pad_token_id, prompt_once=prompt_once)
    assert ours.shape == ref.shape and torch.equal(ours, ref)
    assert model.config.text_config._attn_implementation == "sdpa"  # the prompt-once attention was only lent


@pytest.mark.parametrize("settings", [dict(max_new_tokens=12), dict(max_new_tokens=40),
                                      dict(max_new_tokens=20, min_new_tokens=16), dict(max_new_tokens=30, padded=True)])
def test_greedy_with_graphed_steps_equals_transformers_greedy(llava, p1_records, settings):
    """cache="static+graphs" (hw3lib.llava.decoding.graphed_greedy): on the CPU its steps run without a graph, token
    for token what model.generate gives: short and long limits (rows ending early: padding after the end, the output
    cut where the last row ended), end-of-sequence blocked by min_new_tokens, left-padded prompts."""
    from hw3lib.llava.decoding import generate, graphs_supported

    model, processor = llava
    settings = dict(settings)
    padded = settings.pop("padded", False)
    instructions = [DEFAULT_INSTRUCTION, "Shapes?", "Name every shape and colour in this picture, one by one."]
    texts = [build_prompt(processor, instructions[i % 3] if padded else DEFAULT_INSTRUCTION) for i in range(6)]
    gen = LlavaGeneration(cache="static+graphs", **settings)
    assert graphs_supported(model, gen) and not graphs_supported(model, LlavaGeneration(num_beams=2))
    images = [Image.open(r.image_path).convert("RGB") for r in p1_records[:6]]
    enc = dict(processor(images=images, text=texts, padding=True, return_tensors="pt"))
    pad = processor.tokenizer.pad_token_id
    with torch.inference_mode():
        ref = model.generate(**enc, **LlavaGeneration(**settings).generate_kwargs(), pad_token_id=pad)
        ours = generate(model, enc, gen, pad)
    assert ours.shape == ref.shape and torch.equal(ours, ref)
    if settings.get("max_new_tokens") == 40:  # the captions end before the limit: generate stopped early
        assert ref.shape[1] < enc["input_ids"].shape[1] + 40


def test_greedy_graphs_are_kept_for_the_next_batch_of_that_shape(llava, p1_records):
    """caption_records keeps one GreedySteps (cache, buffers, graph) across its batches: each batch, reusing the
    last one's buffers, still gives model.generate's tokens, and a batch of another shape replaces them."""
    from hw3lib.llava.decoding import GreedySteps, graphed_greedy

    model, processor = llava
    pad = processor.tokenizer.pad_token_id
    gen = LlavaGeneration(cache="static+graphs", max_new_tokens=16)
    prompt = build_prompt(processor, DEFAULT_INSTRUCTION)
    reuse, held = {}, []
    for part in ([0, 1, 2], [3, 4, 5], [6, 7], [8, 9, 10]):  # the 2-image batch has another shape
        images = [Image.open(p1_records[i].image_path).convert("RGB") for i in part]
        enc = dict(processor(images=images, text=[prompt] * len(part), padding=True, return_tensors="pt"))
        with torch.inference_mode():
            ref = model.generate(**enc, **LlavaGeneration(max_new_tokens=16).generate_kwargs(), pad_token_id=pad)
            ours = graphed_greedy(model, enc, gen, pad, reuse=reuse)
        assert torch.equal(ours, ref)
        assert len(reuse) == 1 and isinstance(next(iter(reuse.values())), GreedySteps)
        held.append(next(iter(reuse.values())))
    assert held[0] is held[1] and held[2] is not held[1] and held[3] is not held[1]


def test_a_greedy_step_never_waits_for_the_host(llava, p1_records, monkeypatch):
    """A CUDA graph cannot capture an operation that reads a value back (``.item()``, ``int(tensor)``) or copies one
    from Python (``torch.tensor([...])``): a step that does either fails its capture on the GPU and runs uncaptured.
    The rehearsal's answer lengths once did both. The operations of one step, the rehearsal's included, on the CPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from hw3lib.llava.decoding import GreedySteps
    from hw3lib.rehearsal.answers import MARKER

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(str(func))
            return func(*args, **(kwargs or {}))

    model, processor = llava
    monkeypatch.setattr(model.config, MARKER, [2, 4], raising=False)
    images = [Image.open(r.image_path).convert("RGB") for r in p1_records[:3]]
    enc = dict(processor(images=images, text=[build_prompt(processor, DEFAULT_INSTRUCTION)] * 3, padding=True,
                         return_tensors="pt"))
    steps = GreedySteps(model, 3, enc["input_ids"].shape[1], LlavaGeneration(max_new_tokens=8, min_new_tokens=1),
                        processor.tokenizer.pad_token_id, torch.device("cpu"), graphs=False)
    steps(enc)  # fills the cache and the buffers
    with torch.inference_mode(), Ops() as ops:
        steps.step()
    assert "aten.argmax.default" in ops.seen and "aten.ge.Tensor" in ops.seen  # the step ran, the rehearsal's part too
    assert not ops.seen & {"aten._local_scalar_dense.default", "aten.lift_fresh.default", "aten.item.default",
                           "aten.nonzero.default"}


def test_prompt_once_cache_keeps_the_prompt_once_and_reorders_only_the_beams():
    """hw3lib.llava.decoding's prompt-once layer against a brute-force per-beam cache: the same keys for every beam
    after writes and reorders, while the prompt is stored once per image."""
    from transformers import DynamicCache

    from hw3lib.llava.decoding import attach_prompt_once

    B, K, H, P, D, T = 2, 3, 2, 5, 4, 4
    g = torch.Generator().manual_seed(0)
    prompt = torch.randn(B, H, P, D, generator=g)
    cache = DynamicCache()
    cache.update(prompt, prompt + 1, 0)
    attach_prompt_once(cache, torch.ones(B, P, dtype=torch.long), K, T)
    layer = cache.layers[0]
    ref = prompt.repeat_interleave(K, dim=0)  # (B*K, H, P, D): what transformers keeps
    for step in range(3):
        new = torch.randn(B * K, H, 1, D, generator=g)
        keys, _ = layer.update(new, new, 0)
        ref = torch.cat([ref, new], dim=2)
        layer.state.written += 1
        beam = torch.tensor([[2, 0, 0], [1, 1, 2]]) + torch.arange(B)[:, None] * K  # survivors, within each image
        layer.reorder_cache(beam.flatten())
        ref = ref[beam.flatten()]
        assert keys.shape == (B, H, P + K * T, D) and layer.get_seq_length() == P + step + 1
        got = layer._beams(layer.kbuf)[:, :, :step + 1]  # (B, K, t, H, D)
        assert torch.equal(got.reshape(B * K, step + 1, H, D).transpose(1, 2), ref[:, :, P:])
        assert torch.equal(layer.kbuf[:, :P].transpose(1, 2), prompt)
    mask = layer.state.step_mask(1)  # query of beam k sees the prompt and its own written slots (+ the new one)
    assert mask.shape == (B, 1, K, P + K * T)
    assert mask[0, 0, 1].tolist() == [True] * P + [False] * T + [True] * 4 + [False] * T


def test_killed_run_resumes_without_losing_or_redoing_captions(llava, p1_records, tmp_path):
    model, processor = llava
    recs = p1_records[:10]
    gen = LlavaGeneration(max_new_tokens=12)
    full = caption_folder(model, processor, recs, tmp_path / "full.json", generation=gen, batch_size=3,
                          progress=False)
    out = tmp_path / "pred.json"
    seen = []

    def killer(batch):
        seen.append(len(batch))
        if len(seen) == 2:
            raise KeyboardInterrupt  # killed after the second batch was written

    with pytest.raises(KeyboardInterrupt):
        caption_folder(model, processor, recs, out, generation=gen, batch_size=3, progress=False, on_batch=killer)
    partial = out.with_name("pred.json.partial.jsonl")
    assert partial.is_file() and not out.exists()
    with open(partial, "a") as f:  # and a torn line, as if killed in the middle of a write
        f.write('{"file_id": "0000')
    computed = []
    run = caption_folder(model, processor, recs, out, generation=gen, batch_size=3, progress=False,
                         on_batch=lambda b: computed.extend(b))
    assert run.reused == 6 and run.computed == 4 and len(computed) == 4
    assert not set(computed) & set(list(run.captions)[:6])  # nothing redone
    assert json.loads(out.read_text()) == full.captions  # nothing lost, same captions
    assert not partial.exists()
    # other settings never reuse a partial file
    seen.clear()
    with pytest.raises(KeyboardInterrupt):
        caption_folder(model, processor, recs, out, generation=gen, batch_size=3, progress=False, on_batch=killer)
    with pytest.warns(UserWarning, match="other settings"):
        run = caption_folder(model, processor, recs, out, instruction="Describe the image in detail.",
                             generation=gen, batch_size=5, progress=False)
    assert run.reused == 0 and run.computed == 10


def test_attention_equals_the_attentions_generate_records(llava, p1_records):
    """The teacher-forced pass gives, for every generated token, the attention generate() saw at that step."""
    model, processor = llava
    gen = LlavaGeneration(max_new_tokens=10)
    att = attention_maps(model, processor, p1_records[3].image_path, generation=gen)
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    T = len(att.token_ids)
    L, H = model.config.text_config.num_hidden_layers, model.config.text_config.num_attention_heads
    assert att.maps.shape == att.read_maps.shape == (T, L, H, grid, grid) and T >= 2
    assert "".join(att.tokens).strip() == att.caption
    from PIL import Image

    enc = processor(images=[Image.open(p1_records[3].image_path)],
                    text=[build_prompt(processor, "Describe this image in one sentence.")], return_tensors="pt")
    model.set_attn_implementation("eager")
    try:
        out = model.generate(**enc, **gen.generate_kwargs(), output_attentions=True, return_dict_in_generate=True,
                             pad_token_id=processor.tokenizer.pad_token_id)
    finally:
        model.set_attn_implementation("sdpa")
    s, e = att.span
    for t in range(T):
        for layer in range(L):
            ref = out.attentions[t][layer][0, :, -1, s:e].reshape(H, grid, grid)
            np.testing.assert_allclose(att.maps[t, layer], ref.float().numpy(), atol=1e-5)
            if t + 1 < len(out.attentions):  # the step that reads token t is the one that predicts token t + 1
                ref = out.attentions[t + 1][layer][0, :, -1, s:e].reshape(H, grid, grid)
                np.testing.assert_allclose(att.read_maps[t, layer], ref.float().numpy(), atol=1e-5)
    assert len(out.attentions) > T - 1 > 0
    assert np.all(att.maps.sum(axis=(-1, -2)) <= 1 + 1e-5)
    if len(out.attentions) > T:  # the answer ended with </s>: the end token's map is the step that predicted it
        for layer in range(L):
            ref = out.attentions[T][layer][0, :, -1, s:e].reshape(H, grid, grid)
            np.testing.assert_allclose(att.end_map[layer], ref.float().numpy(), atol=1e-5)


def test_entries_of_given_captions_are_teacher_forced(llava, p1_records):
    """The figures of notebooks 04 and 05 read the maps of the captions that were scored, not of new ones."""
    from hw3lib.attention import llava_entries

    model, processor = llava
    generated = llava_entries(model, processor, p1_records[:2], DEFAULT_INSTRUCTION, LlavaGeneration(max_new_tokens=12))
    given = llava_entries(model, processor, p1_records[:2], DEFAULT_INSTRUCTION,
                          captions=[e["caption"] for e in generated])
    tok = processor.tokenizer
    for rec, a, b in zip(p1_records, generated, given):
        assert a["caption"] == b["caption"] and a["words"] == b["words"] and a["words"][-1] == "</s>"
        assert " ".join(a["words"][:-1]) == " ".join(a["caption"].split())
        # the maps of the caption's own tokens (a generation may have split a word otherwise)
        forced = attention_maps(model, processor, rec.image_path,
                                generated_ids=tok(a["caption"], add_special_tokens=False).input_ids)
        np.testing.assert_allclose(b["predict_maps"][-1], forced.end_map, atol=1e-6)
        assert b["predict_maps"].shape[0] == len(b["words"])
    other = llava_entries(model, processor, p1_records[:1], DEFAULT_INSTRUCTION, captions=["a red circle"])[0]
    assert other["caption"] == "a red circle" and other["words"] == ["a", "red", "circle", "</s>"]


def test_clear_errors(tmp_path, llava):
    with pytest.raises(DataError, match="model folder not found"):
        load_llava(tmp_path / "no_such_model")
    (tmp_path / "empty_model").mkdir()
    with pytest.raises(DataError, match="no config.json"):
        load_llava(tmp_path / "empty_model")
    model, processor = llava
    (tmp_path / "imgs").mkdir()
    with pytest.raises(DataError, match="no images"):
        caption_folder(model, processor, tmp_path / "imgs", tmp_path / "p.json", progress=False)
    (tmp_path / "imgs" / "broken.jpg").write_text("not a jpeg")
    with pytest.raises(DataError, match="broken.jpg"):
        caption_folder(model, processor, tmp_path / "imgs", tmp_path / "p.json", progress=False)


def test_cli_llava_caption(models_dir, p1_records, tmp_path, capsys):
    from hw3lib.cli import main

    img = tmp_path / "imgs"
    img.mkdir()
    for r in p1_records[:3]:
        (img / r.image_path.name).write_bytes(r.image_path.read_bytes())
    out = tmp_path / "pred.json"
    rc = main(["llava-caption", str(img), str(out), "--model", str(models_dir / "llava"), "--num-workers", "0",
               "--num-beams", "2", "--device", "cpu"])
    assert rc == 0
    pred = json.loads(out.read_text())
    assert set(pred) == {r.file_id for r in p1_records[:3]} and all(pred.values())
    rc = main(["llava-caption", str(img), str(out), "--model", str(tmp_path / "nope")])
    assert rc == 2 and "model folder not found" in capsys.readouterr().err


def test_standin_captions_name_the_objects(llava, world):
    """The stand-in really learned: its one-sentence captions name exactly the objects of most p1 images."""
    from hw3lib.demo.world import caption_accuracy, load_objects

    model, processor = llava
    recs = list_images(world / "p1_data" / "images" / "val")[:40]
    pred = caption_records(model, processor, recs, batch_size=20, progress=False)
    acc, _ = caption_accuracy(pred, load_objects(world / "p1_data" / "val_objects.json"))
    assert acc >= 0.6, pred


def test_standin_vision_tower_is_the_demo_vit(models_dir, p1_records):
    """The stand-in's vision tower is the timm ViT converted to transformers: same features, same preprocessing."""
    import timm
    from timm.data import create_transform, resolve_data_config

    from hw3lib.demo.llava_standin import vision_tower_from_timm

    hf, image_processor = vision_tower_from_timm(models_dir / "vit")
    ref = timm.create_model(f"local-dir:{models_dir / 'vit'}", pretrained=True).eval()
    transform = create_transform(**resolve_data_config(model=ref), is_training=False)
    images = [load_image(r.image_path) for r in p1_records[:4]]
    px = image_processor(images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(px, torch.stack([transform(i) for i in images]), atol=2e-2, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(hf(px).last_hidden_state, ref.forward_features(px), atol=1e-4, rtol=1e-4)


def test_fast_kernels_serve_prompts_and_leave_single_tokens_to_pytorch():
    """hw3lib.llava.loading._prompt_only: the forward Liger binds to a module runs on prompts (several tokens);
    one-token decoding steps get the module's own forward."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from hw3lib.llava.loading import _prompt_only

    norm = LlamaRMSNorm(8)
    norm.forward = lambda x: torch.full_like(x, 7.0)  # stands for Liger's kernel
    _prompt_only(norm)
    prompt, token = torch.randn(2, 5, 8), torch.randn(2, 1, 8)
    assert torch.equal(norm(prompt), torch.full_like(prompt, 7.0))
    assert torch.allclose(norm(token), token * torch.rsqrt(token.pow(2).mean(-1, keepdim=True) + 1e-6))


def test_resume_does_not_depend_on_how_the_model_folder_is_spelt(llava, p1_records, tmp_path, monkeypatch):
    from hw3lib.demo import MODELS_DIR

    model, processor = llava
    recs, gen, out = p1_records[:4], LlavaGeneration(max_new_tokens=8), tmp_path / "pred.json"
    monkeypatch.chdir(MODELS_DIR.parent.parent.parent)  # the workbook's root: data/demo/models/llava is relative

    def killer(batch):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        caption_folder(model, processor, recs, out, generation=gen, batch_size=2, progress=False, on_batch=killer,
                       model_name="./data/demo/models/llava/")
    run = caption_folder(model, processor, recs, out, generation=gen, batch_size=2, progress=False,
                         model_name="data/demo/models/llava")
    assert run.reused == 2 and run.computed == 2


def test_ctrl_c_keeps_the_finished_batches_and_says_so(models_dir, world, tmp_path):
    """SIGINT (Ctrl-C) mid-run: exit 130 within seconds, no DataLoader worker left, the finished batches kept in
    the partial file (the JSON is not written), and one line that says so."""
    import sys

    from conftest import interrupt

    out, partial = tmp_path / "p1.json", tmp_path / "p1.json.partial.jsonl"
    cmd = [sys.executable, "-m", "hw3lib", "llava-caption", str(world / "p1_data/images/val"), str(out), "--model",
           str(models_dir / "llava"), "--device", "cpu", "--batch-size", "2", "--num-workers", "2"]
    run = interrupt(cmd, ready=lambda p: p.children() and partial.is_file() and partial.read_text().count("\n") >= 2)
    err = run["err"]
    assert run["code"] == 130 and run["seconds"] < 30 and run["family"], (run["code"], err[-2000:])
    said = [line for line in err.splitlines() if line.startswith("hw3 llava-caption:")]
    assert said == [f"hw3 llava-caption: interrupted: the captions of the finished batches are in {partial}; the "
                    f"same command goes on from them"], err[-2000:]
    assert "Traceback" not in err and not out.exists() and not run["left"]()


def test_sweep_findings_quote_the_rows_at_either_end():
    from hw3lib.llava import sweep_findings, sweep_summary

    rows = [{"name": n, "instruction": f"say {n}", "generation": "greedy", "cider": c, "clipscore": s,
             "mean_length": m} for n, c, s, m in (("a", 0.5, 2.0, 9.0), ("b", 1.25, 1.5, 30.0), ("c", 0.75, 2.5, 12.0))]
    text = sweep_findings(rows)
    assert "CIDEr runs from 0.500 (*a*) to 1.250 (*b*)" in text and "CLIPScore from 1.500 (*b*) to 2.500 (*c*)" in text
    assert "(*b*, 30.0 words on average) score CIDEr 1.250" in text
    assert f"Best by CIDEr: *{sweep_summary(rows, 'm', 3)['best']['instruction']}* with greedy." in text


def test_the_best_of_a_sweep_on_fewer_images_captions_only_the_others(llava, models_dir, p1_records, tmp_path,
                                                                       monkeypatch):
    """llava_sweep_images: the settings compete on the first 3 images; the best then captions all 7, keeping its
    captions of the 3 (made under the same settings) and captioning the 4 others; a second call captions none."""
    from hw3lib.llava import LlavaLoad, best_on_all, best_setting, sweep
    from hw3lib.llava import captioning

    model, processor = llava
    records, gens = p1_records[:7], {"greedy": LlavaGeneration(max_new_tokens=8)}
    instructions = {"one": "Describe this image in one sentence.", "few": "Describe the image in a few words."}
    refs = {r.file_id: list(r.references) or ["a shape"] for r in records}
    how = dict(batch_size=2, load=LlavaLoad(model=str(models_dir / "llava")), progress=False)
    rows = sweep(model, processor, records[:3], instructions, gens, tmp_path / "p1", refs, **how)
    best = best_setting(rows)
    compared = json.loads(Path(best["predictions"]).read_text())
    captioned, real = [], captioning.caption_records

    def counted(model, processor, todo, *args, **kwargs):
        captioned.extend(r.file_id for r in todo)
        return real(model, processor, todo, *args, **kwargs)

    monkeypatch.setattr(captioning, "caption_records", counted)
    row = best_on_all(best, model, processor, records, instructions, gens, tmp_path / "p1-best", refs, **how)
    assert captioned == [r.file_id for r in records[3:]]
    predictions = json.loads(Path(row["predictions"]).read_text())
    assert list(predictions) == [r.file_id for r in records]
    assert {k: predictions[k] for k in compared} == compared
    assert row["instruction_name"] == best["instruction_name"] and row["settings"]["images"] == list(predictions)
    assert not list((tmp_path / "p1-best").glob("*.partial*"))
    captioned.clear()
    assert best_on_all(best, model, processor, records, instructions, gens, tmp_path / "p1-best", refs, **how) == row
    assert captioned == []


def test_settings_without_beams_take_the_greedy_batch_size(llava, models_dir, p1_records, tmp_path, monkeypatch):
    """greedy_batch_size: the greedy setting is captioned 5 images a call, beam search 2 a call (its rows of KV cache
    are per beam); without it both take batch_size. The captions do not depend on it here (fp32 on the CPU)."""
    from hw3lib.llava import LlavaLoad, captioning, setting_batch_size, sweep

    model, processor = llava
    records = p1_records[:5]
    gens = {"greedy": LlavaGeneration(max_new_tokens=6), "beam 2": LlavaGeneration(num_beams=2, max_new_tokens=6)}
    refs = {r.file_id: list(r.references) or ["a shape"] for r in records}
    calls, real = [], captioning.caption_records

    def counted(model, processor, todo, instruction, generation, batch_size, *args, **kwargs):
        calls.append((generation.num_beams, batch_size))
        return real(model, processor, todo, instruction, generation, batch_size, *args, **kwargs)

    monkeypatch.setattr(captioning, "caption_records", counted)
    how = dict(batch_size=2, load=LlavaLoad(model=str(models_dir / "llava")), progress=False)
    rows = sweep(model, processor, records, {"one": "Describe this image in one sentence."}, gens, tmp_path / "a",
                 refs, greedy_batch_size=5, **how)
    assert calls == [(1, 5), (2, 2)]
    calls.clear()
    same = sweep(model, processor, records, {"one": "Describe this image in one sentence."}, gens, tmp_path / "b",
                 refs, **how)
    assert calls == [(1, 2), (2, 2)]
    for a, b in zip(rows, same):
        assert json.loads(Path(a["predictions"]).read_text()) == json.loads(Path(b["predictions"]).read_text())
    assert setting_batch_size(gens["beam 2"], 8, 24) == 8 and setting_batch_size(gens["greedy"], 8, 0) == 8


def test_four_and_eight_bits_at_once_is_refused_before_loading(tmp_path):
    # before anything is read: the folder does not even exist
    with pytest.raises(ValueError, match="load_in_4bit and load_in_8bit: choose one"):
        load_llava(tmp_path / "no_model", load_in_4bit=True, load_in_8bit=True)


@pytest.mark.skipif(all(importlib.util.find_spec(m) for m in ("bitsandbytes", "accelerate")),
                    reason="both installed: the load would go on")
def test_a_quantised_load_without_its_packages_says_which_in_one_line(tmp_path):
    from hw3lib.llava.loading import quantisation_missing

    missing = " and ".join(quantisation_missing())
    with pytest.raises(RuntimeError, match=rf'load_in_4bit needs {missing}: pip install -e "\.\[gpu\]"'):
        load_llava(tmp_path / "no_model", load_in_4bit=True)  # said before anything is read


def test_the_torchrun_spec_carries_each_settings_batch_size(llava, models_dir, p1_records, tmp_path, monkeypatch):
    """gpus > 1: the spec that every torchrun process reads gives each setting its own batch size (the launch itself
    is tests/test_distributed.py's); here the launch is stopped after the spec is read."""
    import subprocess

    from hw3lib.llava import LlavaLoad, prompt_sweep, sweep

    seen = []

    def launched(cmd, **kwargs):
        seen.append(json.loads(Path(cmd[-1]).read_text()))
        return subprocess.CompletedProcess(cmd, 1, stdout="stopped by the test")

    monkeypatch.setattr(prompt_sweep.subprocess, "run", launched)
    gens = {"greedy": LlavaGeneration(max_new_tokens=6), "beam 2": LlavaGeneration(num_beams=2, max_new_tokens=6)}
    refs = {r.file_id: ["a shape"] for r in p1_records[:3]}
    with pytest.raises(RuntimeError, match="stopped by the test"):
        sweep(None, None, p1_records[:3], {"one": "Describe this image in one sentence."}, gens, tmp_path, refs,
              batch_size=2, greedy_batch_size=5, load=LlavaLoad(model=str(models_dir / "llava")), gpus=2)
    [spec] = seen
    assert [(s["generation"]["num_beams"], s["batch_size"]) for s in spec["settings"]] == [(1, 5), (2, 2)]


def test_the_int8_cast_message_is_said_once(caplog):
    """bitsandbytes logs LLM.int8's bf16 -> fp16 cast at every product (78,643 lines in one GPU benchmark); the
    8-bit load lets the first through. Other messages of that logger pass."""
    import logging

    from hw3lib.llava.loading import _int8_cast_said_once

    _int8_cast_said_once()
    _int8_cast_said_once()  # a second load adds no second filter
    log = logging.getLogger("bitsandbytes.autograd._functions")
    with caplog.at_level(logging.WARNING, logger=log.name):
        for _ in range(3):
            log.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", torch.bfloat16)
        log.warning("something else")
    said = [r.getMessage() for r in caplog.records if r.name == log.name]
    assert said == ["MatMul8bitLt: inputs will be cast from torch.bfloat16 to float16 during quantization",
                    "something else"], said
