# %% [markdown]
# # 05 · The best and the worst caption by CLIPScore (P3)
#
# CLIPScore `2.5 · max(cos(image, caption), 0)` rates each of the captioner's validation captions (notebook 03
# saved them per image). The course asks for the **top-1 and last-1** image–caption pairs, with their attention
# maps, and for what they say about the model and about the metric. This notebook puts the numbers side by side:
# the two pairs, their CIDEr, their references, where each word looked, and, on the shapes world, whether each
# caption is right. The conclusions are yours to draw.

# %% tags=["parameters"]
data_root: str = "data/demo/hw3_data"  # hw3_data root
adapter: str = ""  # trained adapter; "": the best of notebook 02 in output_dir/p2/main/
attention_heads: str = "mean"  # "mean", "max" or a head index
clip_model: str = "data/demo/models/clip"  # CLIP for the by-hand CLIPScore: open_clip name or a local folder
clip_pretrained: str = ""  # "openai" for the real CLIP; "" for a folder
output_dir: str = "outputs/demo"  # set by `hw3 run`

# %%
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Markdown, display

from hw3lib import viz
from hw3lib.attention import aggregate, captioner_entries, choose_layer
from hw3lib.captioner import load_adapter
from hw3lib.data import hw3_split
from hw3lib.demo.world import caption_accuracy, ground_truth, object_set, parse_caption
from hw3lib.outputs import clip_scorer, start
from hw3lib.report import save_metrics

P, run = start(globals())  # the parameters, and the run's folders (hw3lib/outputs.py)
root, out = run.data_root, run.output_dir

# %% [markdown]
# ## Every caption's CLIPScore

# %%
per_image = run.per_image()  # notebook 03's captions and scores
val = {r.file_id: r for r in hw3_split(root, "p2_data")}
scores = np.array([v["clipscore"] for v in per_image.values()])
ranked = sorted(per_image, key=lambda k: per_image[k]["clipscore"])
top, bottom = ranked[-1], ranked[0]
fig = viz.score_histograms({"captioner on p2 val": scores}, title="CLIPScore of each validation caption",
                           marks={"top-1": per_image[top]["clipscore"], "last-1": per_image[bottom]["clipscore"]})
fig.savefig(out / "figures/05_clipscore_histogram.png", dpi=110)
plt.show()
print(f"{len(per_image)} captions; CLIPScore mean {scores.mean():.3f}, standard deviation {scores.std():.3f}, "
      f"min {scores.min():.3f}, max {scores.max():.3f}")

# %% [markdown]
# ## Open the box: the top-1 CLIPScore, by hand
#
# CLIP's image tower embeds the preprocessed image (resize, centre crop, normalise), its text tower the tokenised
# caption (at most 77 tokens); CLIPScore is `2.5 * max(cos, 0)` of the two embeddings. Below, the top-1 pair
# computed with the model's own two calls, against notebook 03's number.

# %%
import torch

from hw3lib.data import load_image

clip = clip_scorer(P.clip_model, P.clip_pretrained)
pixels = clip.preprocess(load_image(val[top].image_path))[None].to(clip.device, clip.dtype)
tokens = clip.tokenizer([per_image[top]["caption"]]).to(clip.device)
with torch.no_grad():
    image_emb, text_emb = clip.model.encode_image(pixels).float(), clip.model.encode_text(tokens).float()
cos = torch.nn.functional.cosine_similarity(image_emb, text_emb).item()
assert abs(2.5 * max(cos, 0.0) - per_image[top]["clipscore"]) < (2e-2 if clip.device.type == "cuda" else 1e-4)
print(f"cos {cos:.4f} -> CLIPScore {2.5 * max(cos, 0.0):.4f}; notebook 03: {per_image[top]['clipscore']:.4f}")

# %% [markdown]
# ## The two pairs, with the attention of every word
#
# The maps are read by teacher forcing the very captions that notebook 03 scored, with the layer and the query that
# notebook 04 chose for the captioner (its `layer_shown` and `query_shown`), so the two notebooks agree.

# %%
adapter = run.adapter(P.adapter)
captioner, encoder, transform = load_adapter(adapter, decoder_checkpoint=run.decoder_checkpoint)
shown, query = run.attention_view()  # notebook 04's layer and query

# %%
entries = dict(zip(("top", "bottom"), captioner_entries(captioner, encoder, transform, [val[top], val[bottom]],
                                                       query=query, captions=[per_image[top]["caption"],
                                                                              per_image[bottom]["caption"]])))
NAMES = {"top": "top-1", "bottom": "last-1"}  # the course's names
pairs = {label: {"image": key, **per_image[key], "references": list(val[key].references)}
         for label, key in (("top", top), ("bottom", bottom))}
for label, e in entries.items():
    pair, layer = pairs[label], choose_layer(shown.get("captioner", "best"), len(e["layers"]))
    pair["figure"], pair["words"] = f"figures/05_{label}.png", e["words"]  # the panels: the scored caption's words
    display(Markdown(f"**{NAMES[label]}: {pair['image']}**, CLIPScore {pair['clipscore']:.3f}, CIDEr {pair['cider']:.3f}"
                     f"\n\n- caption: *{pair['caption']}*\n" + "".join(f"- reference: {r}\n" for r in pair["references"])))
    fig = viz.word_attention(e["view"], e["words"], aggregate(e["maps"], layer, P.attention_heads),
                             title=f"{NAMES[label]} by CLIPScore ({pair['clipscore']:.3f}): {e['caption']}",
                             note=f"captioner, layer {layer}, {query} query, heads {P.attention_heads}")
    fig.savefig(out / pair["figure"], dpi=100)
    plt.show()

# %% [markdown]
# ## The numbers to reason from

# %%
t, b, rank_cider = pairs["top"], pairs["bottom"], {k: i for i, k in enumerate(sorted(per_image, key=lambda k:
                                                                                  per_image[k]["cider"]), 1)}
facts = [f"- CLIPScore: top {t['clipscore']:.3f}, bottom {b['clipscore']:.3f}; the whole set {scores.mean():.3f} "
         f"± {scores.std():.3f}. The two extremes lie {(t['clipscore'] - scores.mean()) / scores.std():.1f} and "
         f"{(b['clipscore'] - scores.mean()) / scores.std():.1f} standard deviations from the mean.",
         f"- CIDEr: top {t['cider']:.3f} (rank {rank_cider[top]} of {len(per_image)} by CIDEr), bottom "
         f"{b['cider']:.3f} (rank {rank_cider[bottom]}).",
         f"- Caption length: top {len(t['caption'].split())} words, bottom {len(b['caption'].split())} words."]
objects = ground_truth(root / "p2_data")  # None on the course's data
if objects:
    _, correct = caption_accuracy({k: v["caption"] for k, v in per_image.items()}, objects)
    for label, key in (("top", top), ("bottom", bottom)):
        pairs[label]["correct"] = bool(correct[key])
        facts.append(f"- The {label} caption names {sorted(parse_caption(per_image[key]['caption']))}; the scene "
                     f"holds {sorted(object_set(objects[key]))}.")
    ok, bad = (np.array([v["clipscore"] for k, v in per_image.items() if correct[k] == want]) for want in (1, 0))
    facts.append(f"- Over all captions: {len(ok)} correct ones average CLIPScore {np.mean(ok):.3f}, {len(bad)} "
                 f"wrong ones {np.mean(bad) if len(bad) else float('nan'):.3f}.")
display(Markdown("\n".join(facts)))
save_metrics(out, "best_worst", pairs)

# %% [markdown]
# **Questions to answer from these numbers** (they are what the course's report asks for):
#
# - Do CIDEr and CLIPScore agree on the two captions? Where they disagree, which one is right, judging by the image
#   and the references?
# - Is the bottom caption wrong, or is its image hard (small objects, clutter, unusual colours)? On the shapes world
#   the ground-truth line answers this directly.
# - How far apart are correct and wrong captions on average, compared with the spread of the scores? Could a
#   threshold on CLIPScore tell a wrong caption from a right one?
# - In the attention figures: do the colour and shape words of the top caption look at their objects? Do the
#   bottom caption's words look anywhere in particular?
#
# ## Try it yourself
#
# **Change and watch** (no check: these are questions for your report; a notebook run again with `-p NAME VALUE`,
# or its parameters cell edited in JupyterLab). Then three exercises that **check themselves**: write the code, run
# its cell, and it says `correct` or what is wrong; a hint and the solution are folded under each.
#
# 1. Set `attention_heads = "max"`: do the maps of the two pairs tell a different story?
# 2. Open `p2_val_per_image.json` and find the image with the highest CIDEr. Is it near the top by CLIPScore?
# 3. Re-run notebook 03 with the other decoding (`num_beams = 3` on the demo, `1` on the hw3 config), then this
#    notebook. Do the same images stay at the extremes?

# %% [markdown]
# **Write it yourself: the two extremes.** Write `top_and_last(per_image)`, which takes notebook 03's
# per-image scores (`{image id: {"caption", "clipscore", "cider"}}`, as `per_image` above) and returns the ids of the
# top-1 and the last-1 image by CLIPScore.
#
# <details><summary>Hint</summary>
#
# `max(per_image, key=lambda k: per_image[k]["clipscore"])`, and `min` for the other one.
#
# </details>
# <details><summary>Solution</summary>
#
# ```python
# def top_and_last(per_image):
#     score = lambda k: per_image[k]["clipscore"]  # noqa: E731
#     return max(per_image, key=score), min(per_image, key=score)
# ```
#
# </details>

# %%
from hw3lib.exercises import check


def top_and_last(per_image):
    raise NotImplementedError  # your code: (top-1 id, last-1 id) by CLIPScore


check("top_and_last", top_and_last)

# %% [markdown]
# **Write it yourself: do the two metrics agree at the top?** Write `clipscore_rank_of_best_cider(per_image)`:
# find the image with the highest CIDEr, and return its rank by CLIPScore (1 for the highest CLIPScore). Run it on
# this run's `per_image`: is CIDEr's favourite near CLIPScore's top?
#
# <details><summary>Hint</summary>
#
# `best = max(per_image, key=lambda k: per_image[k]["cider"])`; its rank is one plus the number of images with
# a higher CLIPScore.
#
# </details>
# <details><summary>Solution</summary>
#
# ```python
# def clipscore_rank_of_best_cider(per_image):
#     best = max(per_image, key=lambda k: per_image[k]["cider"])
#     return 1 + sum(v["clipscore"] > per_image[best]["clipscore"] for v in per_image.values())
# ```
#
# </details>

# %%
def clipscore_rank_of_best_cider(per_image):
    raise NotImplementedError  # your code: CLIPScore rank (1 = highest) of the highest-CIDEr image


check("clipscore_rank_of_best_cider", clipscore_rank_of_best_cider)

# %% [markdown]
# **Write it yourself: how extreme are the extremes?** Write `zscore(value, scores)`: how many standard
# deviations `value` lies from the mean of the array `scores` (NumPy's `std`, as the facts above use). Run it on the
# top-1 and last-1 CLIPScores: which extreme is further from the crowd?
#
# <details><summary>Hint</summary>
#
# `(value - scores.mean()) / scores.std()`.
#
# </details>
# <details><summary>Solution</summary>
#
# ```python
# def zscore(value, scores):
#     return (value - scores.mean()) / scores.std()
# ```
#
# </details>

# %%
def zscore(value, scores):
    raise NotImplementedError  # your code: standard deviations from the mean


check("zscore", zscore)
