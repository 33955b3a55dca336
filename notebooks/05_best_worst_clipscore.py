# %% [markdown]
# # 05 · The best and the worst caption by CLIPScore (P3)
#
# CLIPScore `2.5 · max(cos(image, caption), 0)` rates each of the captioner's validation captions (notebook 03
# saved them per image). The course asks for the **top-1 and last-1** image–caption pairs, with their attention
# maps, and for what they say about the model and about the metric.

# %% tags=["parameters"]
data_root = "data/demo/hw3_data"  # hw3_data root
adapter = ""  # trained adapter; "": the best of notebook 02 in output_dir/p2/main/
attention_heads = "mean"  # "mean", "max" or a head index
output_dir = "outputs/demo"  # set by `hw3 run`

# %%
import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Markdown, display

from hw3lib import viz
from hw3lib.attention import aggregate, captioner_entries
from hw3lib.captioner import load_adapter
from hw3lib.data import load_split
from hw3lib.params import typed
from hw3lib.report import save_metrics

P = typed(dict(data_root=str, adapter=str, attention_heads=(int, str), output_dir=str), globals())
root, out = Path(P.data_root), Path(P.output_dir)
(out / "figures").mkdir(parents=True, exist_ok=True)
per_image_file = out / "p2_val_per_image.json"
if not per_image_file.is_file():
    raise FileNotFoundError(f"{per_image_file}: run notebook 03 first (it writes the per-image scores)")
per_image = json.loads(per_image_file.read_text())
val = {r.file_id: r for r in load_split(root / "p2_data/val.json", root / "p2_data/images/val")}
scores = np.array([v["clipscore"] for v in per_image.values()])
ranked = sorted(per_image, key=lambda k: per_image[k]["clipscore"])
top, bottom = ranked[-1], ranked[0]
print(f"{len(per_image)} captions; CLIPScore mean {scores.mean():.3f}, median {np.median(scores):.3f}, "
      f"min {scores.min():.3f}, max {scores.max():.3f}")

# %%
fig = viz.score_histograms({"captioner on p2 val": scores}, title="CLIPScore of each validation caption")
ax = fig.axes[0]
for key, label in ((top, "top-1"), (bottom, "last-1")):
    ax.axvline(per_image[key]["clipscore"], color="k", ls="--", lw=1)
    ax.text(per_image[key]["clipscore"], ax.get_ylim()[1] * 0.9, f" {label}", fontsize=8)
fig.savefig(out / "figures/05_clipscore_histogram.png", dpi=110)
plt.show()

# %% [markdown]
# ## The two pairs, with the attention of every word

# %%
adapter = Path(P.adapter) if P.adapter else out / "p2/main/best.safetensors"
captioner, encoder, transform = load_adapter(adapter, decoder_checkpoint=str(root / "p2_data/decoder_model.bin"))
attention_file = out / "metrics/attention.json"
shown = json.loads(attention_file.read_text()).get("layer_shown", {}) if attention_file.is_file() else {}
entries = captioner_entries(captioner, encoder, transform, [val[top], val[bottom]])
pairs = {}
for label, key, e in (("top", top, entries[0]), ("bottom", bottom, entries[1])):
    layer = shown.get("captioner", str(len(e["layers"]) - 1))
    layer = layer if layer == "mean" else int(layer)
    pairs[label] = {"image": key, "caption": per_image[key]["caption"], "clipscore": per_image[key]["clipscore"],
                    "cider": per_image[key]["cider"], "references": list(val[key].references)}
    display(Markdown(f"**{label}: {key}**, CLIPScore {per_image[key]['clipscore']:.3f}, CIDEr "
                     f"{per_image[key]['cider']:.3f}\n\n- caption: *{per_image[key]['caption']}*\n"
                     + "".join(f"- reference: {ref}\n" for ref in val[key].references)))
    maps = aggregate(e["maps"], layer, P.attention_heads)
    fig = viz.word_attention(e["view"], e["words"], maps, title=f"{label}-1 by CLIPScore: {e['caption']}",
                             note=f"captioner, layer {layer}, heads {P.attention_heads}")
    fig.savefig(out / f"figures/05_{label}.png", dpi=100)
    plt.show()

# %% [markdown]
# ## What the numbers say

# %%
lines = []
t, b = pairs["top"], pairs["bottom"]
lines.append(f"- The top pair scores {t['clipscore']:.3f} and the bottom one {b['clipscore']:.3f}; the spread of the "
             f"whole set is {scores.std():.3f} (standard deviation) around {scores.mean():.3f}.")
lines.append(f"- CIDEr of the two captions: {t['cider']:.3f} (top) and {b['cider']:.3f} (bottom), i.e. "
             + ("the two metrics agree on the order." if t["cider"] > b["cider"] else
                "CIDEr orders them the other way: the metrics measure different things (n-gram overlap with the "
                "references vs. image-text similarity)."))
sidecar = root / "p2_data/val_objects.json"
if sidecar.is_file():
    from hw3lib.demo.world import caption_accuracy, load_objects, object_set, parse_caption

    objects = load_objects(sidecar)
    _, correct = caption_accuracy({k: v["caption"] for k, v in per_image.items()}, objects)
    ok = np.array([per_image[k]["clipscore"] for k in per_image if correct[k]])
    bad = np.array([per_image[k]["clipscore"] for k in per_image if not correct[k]])
    for label, key in (("top", top), ("bottom", bottom)):
        said, truth = sorted(parse_caption(per_image[key]["caption"])), sorted(object_set(objects[key]))
        pairs[label]["correct"] = bool(correct[key])
        lines.append(f"- The {label} caption names {said}; the scene holds {truth}: "
                     + ("correct." if correct[key] else "**wrong**."))
    if len(bad):
        lines.append(f"- Over all {len(per_image)} captions, correct ones average CLIPScore {ok.mean():.3f} and wrong "
                     f"ones {bad.mean():.3f}: CLIPScore does separate right from wrong on average, but a single score "
                     "is a noisy verdict, and the extremes mix caption quality with how typical the image is.")
display(Markdown("\n".join(lines)))
save_metrics(out, "best_worst", pairs)
pairs
