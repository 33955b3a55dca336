# %% [markdown]
# # 04 · Where does each word look? Attention maps (P3)
#
# For every generated word, the attention of the query that produced it over the image patches, for both models:
# the P2 captioner (its ViT grid, pooled as in training) and LLaVA (the vision tower's grid: 24 × 24 for
# llava-1.5 at 336 px / patch 14). Three things are easy to get wrong, and the workbook does them as follows:
#
# * **Positions.** The captioner's visual tokens are the first positions of its decoder input (CLS first, when
#   used). LLaVA's image positions are found from the image token id in `input_ids`, never from a fixed offset.
#   The attention of token *t* is the attention row of the position that *predicted* it.
# * **Grid.** The map is reshaped to the encoder's own grid, row-major, and drawn over the image **as the
#   encoder saw it**: the same resize of the shorter side and the same centre crop. It is never stretched over a
#   different aspect.
# * **Words.** Sub-word tokens are merged into words; a word's map is the mean of its tokens' maps.
#
# On the shapes world the answer is known. A colour or shape word *points* correctly when the peak of its map
# lies inside, or within one encoder patch of, an object with that colour or shape. **Pointing accuracy** per layer,
# next to the chance rate (the fraction of patches that would count as a hit), says which layer gives faithful
# maps. The layer is measured, not guessed.

# %% tags=["parameters"]
data_root = "data/demo/hw3_data"  # hw3_data root
adapter = ""  # trained adapter; "": the best of notebook 02 in output_dir/p2/main/
llava_model = "data/demo/models/llava"  # local folder or hub id (configs/hw3.yaml names the real one)
llava_instruction = ""  # "": the best instruction of notebook 01
attention_layer = "best"  # layer index, "mean" over layers, or "best" (highest pointing accuracy; else the last)
attention_heads = "mean"  # "mean", "max" or a head index
pointing_images = 100  # val images scored for pointing accuracy (shapes world only)
output_dir = "outputs/demo"  # set by `hw3 run`

# %%
import json
from pathlib import Path

import matplotlib.pyplot as plt
from IPython.display import Markdown, display

from hw3lib import viz
from hw3lib.attention import aggregate, captioner_entries, llava_entries, pointing_by_layer, pointing_items
from hw3lib.captioner import load_adapter
from hw3lib.data import list_images, load_split
from hw3lib.llava import DEFAULT_INSTRUCTION, load_llava
from hw3lib.params import typed
from hw3lib.report import save_metrics

P = typed(dict(data_root=str, adapter=str, llava_model=str, llava_instruction=str, attention_layer=(int, str),
               attention_heads=(int, str), pointing_images=int, output_dir=str), globals())
root, out = Path(P.data_root), Path(P.output_dir)
(out / "figures").mkdir(parents=True, exist_ok=True)
adapter = Path(P.adapter) if P.adapter else out / "p2/main/best.safetensors"
llava_metrics = out / "metrics/llava.json"
instruction = P.llava_instruction or (json.loads(llava_metrics.read_text())["best"]["instruction"]
                                      if llava_metrics.is_file() else DEFAULT_INSTRUCTION)
captioner, encoder, transform = load_adapter(adapter, decoder_checkpoint=str(root / "p2_data/decoder_model.bin"))
llava, processor = load_llava(P.llava_model)
print(f"captioner: {adapter}\nLLaVA: {P.llava_model}, instruction {instruction!r}")

# %% [markdown]
# ## Pointing accuracy by layer (shapes world)
#
# Each model captions the first validation images (the captioner on p2 val, LLaVA on p1 val). Every colour or
# shape word in the captions is scored at every layer, with the heads averaged.

# %%
sidecar = root / "p2_data/val_objects.json"
summary, chosen = {}, {}
if sidecar.is_file():
    from hw3lib.demo.world import COLORS, SHAPES, load_masks, load_objects

    tables = {}
    for name, split in (("captioner", "p2_data"), ("llava", "p1_data")):
        recs = load_split(root / split / "val.json", root / split / "images/val")[: P.pointing_images]
        entries = (captioner_entries(captioner, encoder, transform, recs) if name == "captioner" else
                   llava_entries(llava, processor, recs, instruction))
        items = pointing_items(entries, load_objects(root / split / "val_objects.json"),
                               load_masks(root / split / "val_masks.npz"))
        tables[name] = pointing_by_layer(items, COLORS, SHAPES, radius=entries[0]["patch_px"],
                                         heads=P.attention_heads)
    rows = [{"model": name, "layer": layer, "words": p.total, "pointing accuracy": p.accuracy,
             "chance": p.chance, "x chance": p.accuracy / p.chance} for name, t in tables.items()
            for layer, p in t.items()]
    display(Markdown(viz.markdown_table(rows)))
    chance_sum = sum(t["mean"].chance_sum for t in tables.values())
    words = sum(t["mean"].total for t in tables.values())
    summary = {"chance": chance_sum / words, "heads": str(P.attention_heads),
               **{name: {layer: p.accuracy for layer, p in t.items()} for name, t in tables.items()},
               "chance_by_model": {name: t["mean"].chance for name, t in tables.items()},
               "words": {name: t["mean"].total for name, t in tables.items()}}
    fig = viz.pointing_table_plot({name: summary[name] for name in tables}, summary["chance"])
    fig.savefig(out / "figures/04_pointing.png", dpi=110)
    plt.show()
    if P.attention_layer == "best":
        chosen = {name: max((k for k in t if k != "mean"), key=lambda k: t[k].accuracy) for name, t in tables.items()}
else:
    print("not the shapes world: no ground truth for pointing accuracy")

def layer_for(name, n_layers):
    if P.attention_layer == "best":
        return int(chosen[name]) if name in chosen else n_layers - 1
    return P.attention_layer if P.attention_layer == "mean" else int(P.attention_layer)


# %% [markdown]
# ## The five P3 images, both models
#
# Each figure is the course's report layout: the image as the model saw it, then one panel per word. Its title
# says the layer and the head aggregation.

# %%
p3 = list_images(root / "p3_data/images")
p3_entries = {"captioner": captioner_entries(captioner, encoder, transform, p3),
              "llava": llava_entries(llava, processor, p3, instruction)}
for name, entries in p3_entries.items():
    for e in entries:
        e["layer"] = layer = layer_for(name, len(e["layers"]))  # the browser below starts there too
        maps = aggregate(e["maps"], layer, P.attention_heads)
        note = (f"{name}: layer {layer} of {len(e['layers'])}, heads {P.attention_heads}; "
                f"{maps.shape[1]} x {maps.shape[2]} grid")
        fig = viz.word_attention(e["view"], e["words"], maps, title=f"{e['file_id']}: {e['caption']}", note=note)
        fig.savefig(out / f"figures/04_{name}_{e['file_id']}.png", dpi=100)
        plt.show()

# %% [markdown]
# ## Browse them
#
# Pick an image and a model, a layer and a head aggregation, then slide over the words. This needs a live
# kernel: widget state does not survive papermill or the HTML export, which is why the static figures above exist.

# %%
viz.attention_browser({f"{e['file_id']} / {name}": e for name, entries in p3_entries.items() for e in entries})

# %%
summary["layer_shown"] = {name: str(layer_for(name, len(p3_entries[name][0]["layers"]))) for name in p3_entries}
summary["p3_captions"] = {name: {e["file_id"]: e["caption"] for e in entries} for name, entries in p3_entries.items()}
save_metrics(out, "attention", summary)
{k: v for k, v in summary.items() if k != "p3_captions"}
