# %% [markdown]
# # 04 · Where does each word look? Attention maps (P3)
#
# For every generated word, its attention over the image patches, for both models:
# the P2 captioner (its ViT grid, pooled as in training) and LLaVA (the vision tower's grid: 24 × 24 for
# llava-1.5 at 336 px / patch 14). Three things are easy to get wrong, and the workbook does them as follows:
#
# * **Positions.** The captioner's visual tokens are the first positions of its decoder input (CLS first, when
#   used). LLaVA's image positions are found from the image token id in `input_ids`, never from a fixed offset.
#   Two attention rows belong to token *t*: that of the position that *predicted* it (the course's convention)
#   and that of its own position, which *reads* it. `attention_query` picks one, or their mean (`"both"`).
# * **Grid.** The map is reshaped to the encoder's own grid, row-major, and drawn over the image **as the
#   encoder saw it**: the same resize of the shorter side and the same centre crop. It is never stretched over a
#   different aspect.
# * **Words.** Sub-word tokens are merged into words; a word's map is the mean of its tokens' maps.
#
# On the shapes world the answer is known. A colour or shape word *points* correctly when the peak of its map
# lies inside, or within one encoder patch of, an object with that colour or shape. **Pointing accuracy** per layer,
# next to the chance rate (the fraction of patches that would count as a hit), says which layer and which query
# give faithful maps. They are measured, not guessed.

# %% tags=["parameters"]
data_root: str = "data/demo/hw3_data"  # hw3_data root
adapter: str = ""  # trained adapter; "": the best of notebook 02 in output_dir/p2/main/
llava_model: str = "data/demo/models/llava"  # local folder or hub id (configs/hw3.yaml names the real one)
llava_instruction: str = ""  # "": the best instruction of notebook 01
llava_load_in_4bit: bool = False  # 4-bit language model (bitsandbytes, GPU): configs/hw3-12gb.yaml
attention_layer: str = "best"  # a layer index, "mean" over layers, or "best" (highest pointing accuracy; else the last)
attention_heads: str = "mean"  # "mean", "max" or a head index
attention_query: str = "best"  # "predict" (the course's), "read", "both" (their mean), or "best" (else "predict")
pointing_images: int = 100  # val images scored for pointing accuracy (shapes world only)
output_dir: str = "outputs/demo"  # set by `hw3 run`

# %%
import matplotlib.pyplot as plt
from IPython.display import Markdown, display

from hw3lib import viz
from hw3lib.attention import (QUERIES, aggregate, at_view, captioner_entries, check_query, choose_view, llava_entries,
                              scored_settings)
from hw3lib.captioner import caption_images, load_adapter
from hw3lib.data import hw3_split, list_images, relative
from hw3lib.demo.world import ground_truth
from hw3lib.llava import LlavaLoad, caption_records
from hw3lib.outputs import start
from hw3lib.report import save_metrics

P, run = start(globals())  # the parameters, and the run's folders (hw3lib/outputs.py)
check_query(P.attention_query, allow_best=True)  # a misspelt name stops here, before any captioning
root, out = run.data_root, run.output_dir

# %% [markdown]
# ## The two models, and the captions that were scored
#
# The captioner is the best adapter of notebook 02, decoding as notebook 03 decoded when it scored the captions
# (its `generation` in `metrics/captioner.json`); LLaVA asks notebook 01's best instruction with its best generation
# config. Each P3 figure below shows the caption those settings give, and its maps are read by teacher forcing that
# very caption: what you see is what was scored.

# %%
adapter = run.adapter(P.adapter)
settings = scored_settings(out)
instruction = P.llava_instruction or settings.llava_instruction
captioner, encoder, transform = load_adapter(adapter, decoder_checkpoint=run.decoder_checkpoint)
llava, processor = LlavaLoad(P.llava_model, load_in_4bit=P.llava_load_in_4bit).load()
display(Markdown(viz.markdown_table([
    {"model": "captioner", "weights": relative(adapter), "decoding": settings.captioner_label},
    {"model": "LLaVA", "weights": P.llava_model, "decoding": f"{instruction!r}, {settings.llava_label}"}])))

# %% [markdown]
# ## Pointing accuracy by layer (shapes world)
#
# Each model captions the first validation images (the captioner on p2 val, LLaVA on p1 val), decoding as above.
# Every colour or shape word in the captions is scored at every layer, with each query's maps.

# %%
tables = {}
if ground_truth(root / "p2_data") is not None:
    from hw3lib.demo.pointing import pointing_findings, pointing_summary, pointing_table

    for name, part in (("captioner", "p2_data"), ("llava", "p1_data")):
        recs = hw3_split(root, part)[: P.pointing_images]
        entries = (captioner_entries(captioner, encoder, transform, recs, settings.captioner) if name == "captioner"
                   else llava_entries(llava, processor, recs, instruction, settings.llava))
        tables[name] = {q: pointing_table(entries, root / part, P.attention_heads, q) for q in QUERIES}
    summary, _ = pointing_summary(tables, P.attention_heads)  # its rows: the numbers of the figure, in metrics
    fig = viz.pointing_table_plot({f"{name}, {q}": summary[name][q] for name in tables for q in QUERIES},
                                  summary["chance"])
    fig.savefig(out / "figures/04_pointing.png", dpi=110)
    plt.show()
    display(Markdown(pointing_findings(summary, list(tables))))
else:
    summary = {}
    print("not the shapes world: no ground truth for pointing accuracy")

# %% [markdown]
# Read the bars against the dashed `chance` line: a map that ignored the image would still point correctly that
# often. Which layer and which query point best for each model, and how far above chance are they? The maps drawn
# below follow the `attention_layer` and `attention_query` parameters; `"best"` takes the layer and query with the
# highest pointing accuracy (all the numbers are in `metrics.json`, under `attention`).
#
# ## The five P3 images, both models
#
# Each figure is the course's report layout: the image as the model saw it, then one panel per word, the end token
# last. Its title says the layer, the query and the head aggregation; all its panels share one colour scale.

# %%
p3 = list_images(root / "p3_data/images")
# the caption *text* is teacher-forced (as in 05): the box below recomputes its maps from that text
p3_captions = {
    "captioner": caption_images(captioner, encoder, transform, root / "p3_data/images", settings.captioner),
    "llava": caption_records(llava, processor, p3, instruction, settings.llava, batch_size=len(p3),
                             first_sentence=settings.llava_first_sentence, progress=False)}
p3_entries = {"captioner": captioner_entries(captioner, encoder, transform, p3,
                                             captions=[p3_captions["captioner"][r.file_id] for r in p3]),
              "llava": llava_entries(llava, processor, p3, instruction,
                                     captions=[p3_captions["llava"][r.file_id] for r in p3])}
for name, entries in p3_entries.items():
    query, layer = choose_view(P.attention_layer, P.attention_query, len(entries[0]["layers"]), summary.get(name))
    p3_entries[name] = entries = at_view(entries, query, layer)
    for e in entries:
        maps = aggregate(e["maps"], layer, P.attention_heads)
        note = f"{name}: layer {layer} of {len(e['layers'])}, {query} query, heads {P.attention_heads}; " \
               f"{maps.shape[1]} x {maps.shape[2]} grid"
        fig = viz.word_attention(e["view"], e["words"], maps, title=f"{e['file_id']}: {e['caption']}", note=note)
        fig.savefig(out / f"figures/04_{name}_{e['file_id']}.png", dpi=100)
        plt.show()

# %% [markdown]
# ## Open the box: one word's map from the raw attention
#
# > **Pitfall: only eager attention returns its weights.** PyTorch's fused attention (`sdpa`) and flash attention
# > never form the attention matrix, so `output_attentions=True` gets nothing from them. The captioner's decoder
# > trains and generates with `sdpa` and forms the matrix itself only when asked (`output_attentions=True`, in
# > `hw3lib/decoder.py`); for LLaVA, hw3lib switches the model to `attn_implementation="eager"` for the one
# > teacher-forced pass and back afterwards (notebook 01's box does the same by hand).
#
# The captioner's decoder reads `[visual tokens (CLS first), <|endoftext|>, caption tokens]`. Its attention in one
# layer is a `(heads, positions, positions)` tensor; a word's map under the course's convention is the row of the
# position that *predicted* the word (for the first word: the `<|endoftext|>` position), cut to the columns of the
# patch grid (the CLS column left out) and laid out row-major. Below, the first word of the first P3 caption, from
# one forward pass, against what the figures drew.

# %%
import torch

from hw3lib.captioner import encoder_grid, extract_features

e, device = p3_entries["captioner"][0], next(captioner.parameters()).device
ids, first = captioner.tokenizer.encode(e["caption"]), captioner.tokenizer.encode(e["words"][0])
feats = extract_features(encoder, transform, p3[:1], captioner.cfg.encoder, device=device).float()
with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
    res = captioner(feats.to(device), torch.tensor([[captioner.tokenizer.eot_id, *ids]], device=device),
                    output_attentions=True)
V = res.logits.shape[1] - len(ids) - 1  # visual positions come first
rows, cols = (g // captioner.cfg.encoder.pool for g in encoder_grid(encoder))
layer = e["layer"] if isinstance(e["layer"], int) else len(e["layers"]) - 1
raw = res.attentions[layer][0]  # (heads, positions, positions) of this layer
by_hand = raw[:, V : V + len(first), V - rows * cols : V].float().mean(1).reshape(-1, rows, cols)  # its tokens' mean
assert torch.allclose(by_hand.cpu(), torch.as_tensor(e["predict_maps"][0, layer]), atol=2e-2 if device.type ==
                      "cuda" else 1e-5)
print(f"{e['words'][0]!r} in layer {layer}: heads x grid {tuple(by_hand.shape)}, equal to the figure's map")

# %% [markdown]
# ## Browse them
#
# Pick an image and a model, a layer and a head aggregation, then slide over the words. The browser redraws from
# the maps computed above; nothing runs the models again. It needs a live kernel (JupyterLab, `hw3 lab`): widget
# state does not survive papermill or the HTML export, which is why the static figures above exist.

# %%
# displayed once: the call shows it, and an assignment is not a cell value that Jupyter would show again
browser = viz.attention_browser({f"{e['file_id']} / {name}": e for name, entries in p3_entries.items()
                                 for e in entries})

# %%
summary["layer_shown"] = {name: str(entries[0]["layer"]) for name, entries in p3_entries.items()}
summary["query_shown"] = {name: entries[0]["query"] for name, entries in p3_entries.items()}
summary["p3_captions"] = {name: {e["file_id"]: e["caption"] for e in entries} for name, entries in p3_entries.items()}
summary["p3_words"] = {name: {e["file_id"]: e["words"] for e in entries} for name, entries in p3_entries.items()}
summary["p3_decoding"] = {"captioner": settings.captioner_label, "llava": f"{instruction!r}, {settings.llava_label}"}
summary["heads"] = P.attention_heads
save_metrics(out, "attention", summary)
display(Markdown(viz.markdown_table([{"model": name, "layer shown": summary["layer_shown"][name],
                                      "query shown": summary["query_shown"][name], "heads": P.attention_heads,
                                      "decoding": summary["p3_decoding"][name]} for name in p3_entries])))

# %% [markdown]
# ## Try it yourself
#
# **Change and watch** (no check: these are questions for your report; a notebook run again with `-p NAME VALUE`,
# or its parameters cell edited in JupyterLab). Then three exercises that **check themselves**: write the code, run
# its cell, and it says `correct` or what is wrong; a hint and the solution are folded under each.
#
# 1. Set `attention_heads = "max"` and run again. Does the best layer change? Do the maps get sharper or noisier?
# 2. Set `attention_query = "predict"` (the course's convention) and compare the P3 figures with `"both"`. At the
#    step that predicts "red", the model has not said "red" yet; at the step that reads it, it has. Which of the
#    two looks at the red object in the first layer, and why might their mean point better than either?
# 3. Set `attention_layer = "0"` (the first layer), then `"mean"`. Compare the P3 figures with the best layer's:
#    which words stop pointing at their object?
# 4. In the browser, pick a word like "the" or "and" and compare it with a colour word. Where do function words
#    look, and why might that be?
# 5. Set `llava_instruction = "Describe the image in detail."`: longer captions, more words to score. Does LLaVA's
#    pointing accuracy hold up over a long answer?

# %% [markdown]
# **Write it yourself: from tokens to words.** GPT-2 splits a rare word into pieces (`" circ"`, `"le"`);
# the figures show one panel per word. Write `word_maps(token_strings, maps)`: a token that starts with a space
# (or the first token) starts a new word, any other token continues the word before it; return the words (without
# their spaces) and, per word, the mean of its tokens' maps (`maps` is an array with one map per token).
#
# <details><summary>Hint</summary>
#
# Collect the token indices of each word in a list of lists first; then
# `np.stack([maps[group].mean(axis=0) for group in groups])`.
#
# </details>
# <details><summary>Solution</summary>
#
# ```python
# def word_maps(token_strings, maps):
#     groups = []
#     for i, token in enumerate(token_strings):
#         if not groups or token.startswith(" "):
#             groups.append([i])
#         else:
#             groups[-1].append(i)
#     words = ["".join(token_strings[i] for i in group).strip() for group in groups]
#     return words, np.stack([maps[group].mean(axis=0) for group in groups])
# ```
#
# </details>

# %%
import numpy as np
from hw3lib.exercises import check


def word_maps(token_strings, maps):
    raise NotImplementedError  # your code: (words, one mean map per word)


check("word_maps", word_maps)

# %% [markdown]
# **Write it yourself: from an attention row to a map.** One query's attention over the visual positions is
# a flat row: the CLS position first (when the encoder keeps it), then the patches row by row. Write `to_grid(row,
# rows, cols, has_cls)`, which returns the (rows, cols) map of the patches. A map built from the wrong slice is off by
# one patch everywhere, and still looks plausible.
#
# <details><summary>Hint</summary>
#
# Drop the first entry when `has_cls`, then `reshape(rows, cols)`: row-major is NumPy's default order.
#
# </details>
# <details><summary>Solution</summary>
#
# ```python
# def to_grid(row, rows, cols, has_cls):
#     return row[1:].reshape(rows, cols) if has_cls else row.reshape(rows, cols)
# ```
#
# </details>

# %%
def to_grid(row, rows, cols, has_cls):
    raise NotImplementedError  # your code: the patches' (rows, cols) map, CLS left out


check("to_grid", to_grid)

# %% [markdown]
# **Write it yourself: where a map peaks.** Pointing accuracy asks whether a word's map *peaks* on its object.
# Write `peak_patch(grid_map)`, which returns the `(row, col)` of the largest value of a (rows, cols) map. Then look at
# the figures: does "red" peak on the red object?
#
# <details><summary>Hint</summary>
#
# `np.argmax` gives the flat index; `np.unravel_index(index, grid_map.shape)` turns it into (row, col).
#
# </details>
# <details><summary>Solution</summary>
#
# ```python
# def peak_patch(grid_map):
#     return tuple(int(v) for v in np.unravel_index(np.argmax(grid_map), grid_map.shape))
# ```
#
# </details>

# %%
def peak_patch(grid_map):
    raise NotImplementedError  # your code: (row, col) of the maximum


check("peak_patch", peak_patch)
