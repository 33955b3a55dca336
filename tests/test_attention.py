"""hw3lib.attention: words from tokens, the model's view, upsampling, the layer shown; hw3lib.demo.pointing."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from hw3lib.attention import (aggregate, captioner_maps, choose_layer, choose_view, crop_box, model_view, upsample,
                              with_query, word_groups, words_and_maps)
from hw3lib.demo.pointing import hit_region, point, pointing_by_layer, view_labels


@pytest.mark.parametrize("tokens, groups", [
    ([" a", " red", " circ", "le", "."], [[0], [1], [2, 3, 4]]),  # GPT-2 BPE decoded pieces
    (["A", "Ġyellow", "Ġtri", "angle", "Ġon"], [[0], [1], [2, 3], [4]]),  # byte-level BPE token strings
    (["▁A", "▁yellow", "▁tri", "angle", ","], [[0], [1], [2, 3, 4]]),  # SentencePiece (the real LLaVA)
])
def test_word_groups_merge_sub_words(tokens, groups):
    assert word_groups(tokens) == groups


def test_words_and_maps_average_the_tokens_of_a_word():
    maps = np.arange(4 * 2 * 3 * 2 * 2, dtype=np.float32).reshape(4, 2, 3, 2, 2)
    pieces = [" a", " circ", "le", " !"]
    words, merged = words_and_maps(pieces, maps, lambda g: "".join(pieces[i] for i in g))
    assert words == ["a", "circle", "!"]
    np.testing.assert_allclose(merged[1], (maps[1] + maps[2]) / 2)
    assert merged.shape == (3, 2, 3, 2, 2)
    assert aggregate(maps, layer=1, heads="mean").shape == (4, 2, 2)
    np.testing.assert_allclose(aggregate(maps, "mean", "max"), maps.mean(1).max(1))
    np.testing.assert_allclose(aggregate(maps, 0, 2), maps[:, 0, 2])


@pytest.mark.parametrize("grid, size", [(12, 96), (24, 336), (6, 96)])
@pytest.mark.parametrize("rc", [(0, 0), (3, 5), (5, 2)])
def test_a_planted_peak_lands_on_its_patch(grid, size, rc):
    r, c = rc
    m = np.zeros((grid, grid), np.float32)
    m[r, c] = 1.0
    up = upsample(m, size)
    y, x = np.unravel_index(np.argmax(up), up.shape)
    p = size / grid
    assert r * p <= y < (r + 1) * p and c * p <= x < (c + 1) * p


@pytest.mark.parametrize("crop_pct", [1.0, 0.9])
def test_the_overlay_uses_the_models_crop_of_a_non_square_image(crop_pct):
    """A mark drawn where patch (5, 17) of a 24 x 24 grid sees a 640 x 480 photo is in that patch of the view."""
    size, grid, (r, c) = 336, 24, (5, 17)
    W, H = 640, 480
    left, top, right, bottom = crop_box(W, H, size, crop_pct)
    assert right - left == pytest.approx(bottom - top)  # square: never stretched
    assert (left + right) / 2 == pytest.approx(W / 2) and (top + bottom) / 2 == pytest.approx(H / 2)
    scale = size / (right - left)
    cx, cy = left + (c + 0.5) * size / grid / scale, top + (r + 0.5) * size / grid / scale
    image = Image.new("RGB", (W, H), "black")
    ImageDraw.Draw(image).ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill="white")
    view = np.asarray(model_view(image, size, crop_pct).convert("L"), dtype=np.float32)
    y, x = np.unravel_index(np.argmax(view), view.shape)
    p = size / grid
    assert r * p <= y < (r + 1) * p and c * p <= x < (c + 1) * p
    labels = np.zeros((H, W), np.uint8)
    labels[int(cy) - 3 : int(cy) + 4, int(cx) - 3 : int(cx) + 4] = 1
    lv = view_labels(labels, size, crop_pct)
    ys, xs = np.nonzero(lv)
    assert r * p <= ys.mean() < (r + 1) * p and c * p <= xs.mean() < (c + 1) * p


def test_pointing_hit_miss_and_chance():
    labels = np.zeros((96, 96), np.uint8)
    labels[8:24, 8:24] = 1  # a red square in the top-left
    labels[60:80, 60:80] = 2  # a blue circle in the bottom-right
    objects = [{"color": "red", "shape": "square"}, {"color": "blue", "shape": "circle"}]
    region = hit_region(labels, objects, "color", "red", radius=8)
    assert region[0, 0] and region[30, 30] and not region[33, 33] and not region[70, 70]
    m = np.zeros((12, 12))
    m[1, 1] = 1
    hit, chance = point(m, region)
    centres = (np.arange(12) + 0.5) * 8
    brute = np.mean([[region[int(y), int(x)] for x in centres] for y in centres])
    assert hit and chance == pytest.approx(brute)
    m = np.zeros((12, 12))
    m[9, 9] = 1
    assert not point(m, region)[0]
    assert not hit_region(labels, objects, "color", "green", 8).any()  # a colour no object has: never a hit
    maps = np.zeros((3, 2, 1, 12, 12))
    maps[1, :, 0, 1, 1] = 1  # "red" points at the red square in both layers
    maps[2, 0, 0, 9, 9] = 1  # "circle" at the circle in layer 0 only
    maps[2, 1, 0, 1, 1] = 1
    table = pointing_by_layer([{"words": ["a", "red", "circle"], "maps": maps, "objects": objects,
                                "labels": labels}], ["red", "blue"], ["square", "circle"], radius=8)
    assert (table["0"].hits, table["0"].total) == (2, 2) and table["1"].hits == 1


def test_captioner_maps_cover_the_pooled_grid_and_equal_the_generation_steps(models_dir, world):
    from hw3lib.captioner import CaptionerConfig, EncoderConfig, CaptionerGeneration, build, encoder_grid, course_files
    from hw3lib.data import list_images
    from hw3lib.decoder import LoraConfig
    from hw3lib.captioner import extract_features

    cfg = CaptionerConfig(encoder=EncoderConfig(name=str(models_dir / "vit"), pool=2),
                          lora=LoraConfig(r=4, alpha=8, targets=("c_attn",)), **course_files(world))
    model, encoder, transform = build(cfg)
    recs = list_images(world / "p3_data" / "images")[:2]
    feats = extract_features(encoder, transform, recs, cfg.encoder)
    torch.manual_seed(0)
    gen = CaptionerGeneration(max_new_tokens=8)
    out = captioner_maps(model, feats, encoder_grid(encoder), gen, batch_size=1)
    n_layer, n_head = model.decoder.cfg.n_layer, model.decoder.cfg.n_head
    # the teacher-forced pass equals what generate records step by step (the CLS position dropped)
    ref = model.generate(feats, gen, output_attentions=True)
    for i, res in enumerate(out):
        T = len(res["token_ids"])
        assert res["token_ids"] == ref.token_ids[i] and T >= 2
        assert res["maps"].shape == res["read_maps"].shape == (T, n_layer, n_head, 6, 6)
        steps = ref.attentions[i][:, :, :, 1:].reshape(-1, n_layer, n_head, 6, 6).numpy()
        np.testing.assert_allclose(res["maps"], steps[:T], atol=1e-5)
        np.testing.assert_allclose(res["read_maps"][: len(steps) - 1], steps[1:T + 1], atol=1e-5)
        assert np.all(res["maps"].sum(axis=(-1, -2)) < 1 + 1e-5)  # the CLS and text positions take the rest
        np.testing.assert_allclose(res["end_map"], steps[T], atol=1e-5)  # the step that predicted the end
    # given the captions (the ones that were scored), the same maps by teacher forcing, no generation
    given = captioner_maps(model, feats, encoder_grid(encoder), batch_size=2, captions=[r["caption"] for r in out])
    for a, b in zip(out, given):
        assert a["caption"] == b["caption"] and a["token_ids"] == b["token_ids"]
        for key in ("maps", "read_maps", "end_map"):
            np.testing.assert_allclose(a[key], b[key], atol=1e-5)
    with pytest.raises(ValueError, match="1 captions for 2 images"):
        captioner_maps(model, feats, encoder_grid(encoder), captions=["a red circle"])


def test_word_figure_has_one_colour_scale_and_the_end_token():
    from hw3lib.attention import END_WORD, with_end
    from hw3lib.viz import word_attention

    maps = np.zeros((2, 3, 3), np.float32)
    maps[0, 0, 0], maps[1] = 0.5, 0.01  # a sharp word and a spread-out one
    words, maps = with_end(["red", "the"], maps, END_WORD, np.full((3, 3), 0.02, np.float32))
    assert words == ["red", "the", END_WORD] and maps.shape == (3, 3, 3)
    fig = word_attention(Image.new("RGB", (48, 48)), words, maps, title="t")
    overlays = [im for ax in fig.axes for im in ax.get_images() if im.get_cmap().name == "jet"]
    assert len(overlays) == 3 and {im.get_clim() for im in overlays} == {(0.0, 0.5)}
    assert any(ax.get_ylabel() == "attention weight" for ax in fig.axes)  # the colour bar
    assert "one colour scale for all panels" in fig._suptitle.get_text()
    assert [ax.get_title() for ax in fig.axes[:4]] == ["<image>", "red", "the", END_WORD]


def test_browser_controls_hold_values_across_images():
    """ipywidgets 8 leaves a Dropdown at None when its options are replaced: the browser then drew nothing."""
    from hw3lib.viz import attention_browser

    def entry(n_layers, n_words, first=None):
        e = {"view": Image.new("RGB", (32, 32)), "words": [f"w{i}" for i in range(n_words)],
             "maps": np.random.default_rng(0).random((n_words, n_layers, 2, 4, 4)),
             "layers": [str(i) for i in range(n_layers)]}
        return e if first is None else {**e, "layer": first}

    box = attention_browser({"a / captioner": entry(3, 4, first=1), "a / llava": entry(5, 2)}, show=False)
    (pick, layer, heads), word, image = box.children[0].children, box.children[1], box.children[-1]
    assert (layer.value, heads.value, word.max) == (1, "mean", 3)  # the entry's own first layer
    first = bytes(image.value)
    assert first.startswith(b"\x89PNG")  # drawn into an Image widget, no Output widget (docs/rehearsal.md)
    word.value = 2
    assert bytes(image.value).startswith(b"\x89PNG") and bytes(image.value) != first  # another word: redrawn
    heads.value, word.value = 1, 3
    pick.value = "a / llava"
    assert (layer.value, heads.value, word.max, word.value) == (1, 1, 1, 1)  # kept where they still exist
    layer.value = 4
    pick.value = "a / captioner"
    assert layer.value == 1 and len(layer.options) == 4  # layer 4 is not there: back to the entry's first


def test_with_query_and_choose_view():
    p, r = np.zeros((2, 1, 1, 2, 2)), np.ones((2, 1, 1, 2, 2))
    entry = {"predict_maps": p, "read_maps": r, "words": ["a", "b"]}
    assert with_query(entry, "predict")["maps"] is p and with_query(entry, "read")["maps"] is r
    assert np.all(with_query(entry, "both")["maps"] == 0.5) and with_query(entry, "both")["query"] == "both"
    with pytest.raises(ValueError, match="attention_query 'next'"):
        with_query(entry, "next")
    acc = {"predict": {"0": 0.7, "1": 0.6, "mean": 0.8}, "read": {"0": 0.5, "1": 0.75, "mean": 0.6},
           "both": {"0": 0.9, "1": 0.55, "mean": 0.99}}
    assert choose_view("best", "best", 2, acc) == ("both", 0)  # "mean" is not a layer
    assert choose_view("1", "best", 2, acc) == ("read", 1)
    assert choose_view("best", "read", 2, acc) == ("read", 1)
    assert choose_view("best", "best", 2, None) == ("predict", 1)  # unmeasured: the course's choice
    with pytest.raises(ValueError, match="attention_query"):
        choose_view("best", "first", 2, acc)


def test_choose_layer():
    assert choose_layer("best", 4, {"0": 0.2, "2": 0.9, "3": 0.5, "mean": 0.95}) == 2  # "mean" is not a layer
    assert choose_layer("best", 4, None) == 3 and choose_layer("mean", 4) == "mean"
    assert choose_layer("1", 4) == 1 and choose_layer(-1, 4) == 3
    with pytest.raises(ValueError, match="has 4 layers"):
        choose_layer(7, 4)
    with pytest.raises(ValueError, match="'best', 'mean' or a layer index"):
        choose_layer("last", 4)


def test_aggregate_names_a_bad_head():
    maps = np.zeros((2, 3, 4, 2, 2))
    assert aggregate(maps, 1, "3").shape == (2, 2, 2)
    with pytest.raises(ValueError, match="expected 'mean', 'max' or a head index"):
        aggregate(maps, 1, "sideways")
    with pytest.raises(ValueError, match="has 4 heads"):
        aggregate(maps, 1, 9)


def test_at_view_gives_every_entry_the_query_and_layer_shown():
    from hw3lib.attention import at_view

    predict, read = np.zeros((2, 1, 1, 2, 2)), np.ones((2, 1, 1, 2, 2))
    entries = [{"file_id": str(i), "predict_maps": predict, "read_maps": read} for i in range(3)]
    shown = at_view(entries, "both", 0)
    assert [(e["file_id"], e["query"], e["layer"]) for e in shown] == [(str(i), "both", 0) for i in range(3)]
    assert all(np.array_equal(e["maps"], (predict + read) / 2) for e in shown)
    assert "maps" not in entries[0]  # the entries themselves are left as they were


def test_scored_settings_read_what_03_and_01_recorded_and_say_when_they_have_not_run(tmp_path):
    from hw3lib.attention import scored_settings
    from hw3lib.report import save_metrics

    none = scored_settings(tmp_path)
    assert "notebook 03 has not run" in none.captioner_label and "notebook 01 has not run" in none.llava_label
    save_metrics(tmp_path, "captioner", {"generation": {"num_beams": 3, "max_new_tokens": 12}})
    save_metrics(tmp_path, "llava", {"best": {"instruction": "Say it.", "generation_config": {"num_beams": 2}},
                                     "first_sentence": True})
    got = scored_settings(tmp_path)
    assert (got.captioner.num_beams, got.captioner.max_new_tokens, got.llava.num_beams) == (3, 12, 2)
    assert (got.llava_instruction, got.llava_first_sentence) == ("Say it.", True)
    assert got.captioner_label.startswith("beam 3") and "notebook 01's best setting" in got.llava_label
