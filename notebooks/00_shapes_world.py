# %% [markdown]
# # 00 · The data at a glance (and the shapes world)
#
# The workbook runs on two profiles. **hw3** points at the course's `hw3_data/` and the real models; **demo** runs on
# the *shapes world*: a captioning data set generated from a seed, written in exactly the HW3 layout
# (`p1_data/`, `p2_data/`, `p3_data/`, COCO-format JSON, 12-digit file names), with small stand-in models trained on it.
#
# Because the world is synthetic its ground truth is known: every object's colour, shape, size, box and mask. That
# turns *"does the caption name the right objects?"* and *"does this attention map point at the object?"* into
# numbers. This notebook shows the data, its captions, and checks the CLIP model that CLIPScore uses.
#
# > **What is yours to write.** The course grades *your* code (`hw3_1.sh`, `hw3_2.sh` and what they run) and *your*
# > report. This workbook is for exploring, checking and measuring alongside: run the real settings, see what each
# > knob does, compare your own numbers with its. It is not something to hand in in place of your work, and the
# > report it assembles (`hw3 report`) leaves the analysis to you.

# %% tags=["parameters"]
data_root: str = "data/demo/hw3_data"  # an hw3_data folder: the demo world or the course's data
clip_model: str = "data/demo/models/clip"  # CLIPScore model: open_clip name (ViT-B-32-quickgelu) or a local folder
clip_pretrained: str = ""  # open_clip tag ("openai") or checkpoint file; "" for a local folder
output_dir: str = "outputs/demo"  # where figures and metrics go (set by `hw3 run`)
num_show: int = 12  # images in the grid
seed: int = 0  # which images are shown, which captions get shuffled

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import Markdown, display

from hw3lib import viz
from hw3lib.data import hw3_split, load_image
from hw3lib.demo.world import ground_truth, object_set, parse_caption
from hw3lib.metrics import clip_check
from hw3lib.outputs import clip_scorer, start
from hw3lib.report import save_metrics

P, run = start(globals())  # the parameters, and the run's folders (hw3lib/outputs.py)
root, out = run.data_root, run.output_dir

# %% [markdown]
# ## The splits
#
# P1 (zero-shot LLaVA) captions `p1_data/images/val`; P2 (the LoRA captioner) trains on `p2_data/images/train` and is
# scored on `p2_data/images/val`; P3 draws attention maps on the five images of `p3_data/images`.

# %%
splits = {"p1/val": hw3_split(root, "p1_data"), "p2/train": hw3_split(root, "p2_data", "train"),
          "p2/val": hw3_split(root, "p2_data")}
p3_images = sorted((root / "p3_data/images").glob("*.jpg"))
for name, records in splits.items():
    n_caps = sum(len(r.references) for r in records)
    print(f"{name:9s} {len(records):5d} images  {n_caps:6d} captions  e.g. {records[0].image_path.name}")
print(f"p3        {len(p3_images):5d} images")

# %% [markdown]
# ## A grid of validation images
#
# On the demo profile each object's ground-truth box is drawn with its label; the title is the first reference.

# %%
val = splits["p2/val"]
rng = np.random.default_rng(P.seed)
shown = [val[i] for i in rng.choice(len(val), size=min(P.num_show, len(val)), replace=False)]
objects = ground_truth(root / "p2_data")  # None on the course's data
fig = viz.image_grid(shown, boxes=[objects[r.file_id] for r in shown] if objects else None)
fig.savefig(out / "figures/00_val_grid.png", dpi=110)
plt.show()

# %% [markdown]
# ## Captions
#
# Five references per image, like COCO's five annotators. Their length and vocabulary decide a lot about CIDEr:
# a model that copies the most common phrasing scores well on n-gram overlap without seeing the image.

# %%
train_refs = {r.file_id: list(r.references) for r in splits["p2/train"]}
fig = viz.caption_statistics(train_refs)
fig.savefig(out / "figures/00_caption_statistics.png", dpi=110)
plt.show()
lengths = np.array([len(c.split()) for cs in train_refs.values() for c in cs])
print(f"{len(lengths):,} training captions, {lengths.mean():.1f} words on average ({np.percentile(lengths, 5):.0f} "
      f"to {np.percentile(lengths, 95):.0f} for 90% of them). For example, one validation image's five:")
for caption in splits["p2/val"][0].references:
    print("-", caption)

# %% [markdown]
# ## The caption parser (demo profile)
#
# `parse_caption` maps a caption back to the set of (colour, shape) objects it names. *Caption accuracy* in the later
# notebooks is the fraction of images whose generated caption names exactly the right set. Here it is checked on the
# references themselves, which must all agree with the ground truth.

# %%
world = {}
if objects:
    agree = [parse_caption(c) == object_set(objects[r.file_id]) for r in val for c in r.references]
    world = {"num_train": len(splits["p2/train"]), "num_val": len(val), "num_p1": len(splits["p1/val"]),
             "parser_agreement": float(np.mean(agree))}
    print(f"the parser agrees with the ground truth on {world['parser_agreement']:.1%} of the {len(agree):,} "
          f"validation references")
else:
    print("no *_objects.json sidecar: not the shapes world, nothing to parse")

# %% [markdown]
# ## Does the CLIP model see the captions? (`clip_check`)
#
# CLIPScore (Hessel et al., 2021) embeds the image and the caption with CLIP and takes their cosine similarity:
# `CLIPScore = w * max(cos(image, text), 0)` with `w = 2.5`. The weight only stretches the scale (real CLIP's
# cosines between an image and a fitting caption sit around 0.3); the `max(., 0)` sends every caption that CLIP finds
# unrelated to exactly 0. The caption is cut at CLIP's 77 tokens, so a long answer is judged on its beginning only.
# No reference caption takes part: CLIPScore asks "does this text fit this image?", not "does it say what people
# said".
#
# Before trusting it, check that it separates each validation image's own caption from a caption of another image:
# the AUC is the probability that the own caption scores higher.

# %%
scorer = clip_scorer(P.clip_model, P.clip_pretrained)
checked = clip_check(scorer, val, seed=P.seed)
fig = viz.score_histograms({"own caption": checked["true"], "another image's caption": checked["shuffled"]},
                           title=f"{Path(P.clip_model).name}: AUC {checked['auc']:.3f}")
fig.savefig(out / "figures/00_clip_check.png", dpi=110)
plt.show()
clip_metrics = {k: round(checked[k], 4) for k in ("auc", "mean_true", "mean_shuffled")}
display(Markdown(f"AUC **{clip_metrics['auc']:.3f}**: an image's own caption scores {clip_metrics['mean_true']:.3f} "
                 f"on average, another image's {clip_metrics['mean_shuffled']:.3f}."))

# %% [markdown]
# > **The demo's CLIP has a scale of its own.** The stand-in CLIP was trained on the shapes world only, and its
# > cosines are far larger than real CLIP's: its CLIPScores come near 2.5, while the course's CLIP ViT-B/32 gives
# > about 0.7 to 0.8 for good COCO captions (the range students of this homework reported). Nothing is broken when
# > the demo's numbers look high: compare CLIPScores of one CLIP with each other, never across models.

# %% [markdown]
# ## Open the box: what CLIP's image tower receives
#
# CLIPScore never sees the file as it is: CLIP's preprocessing resizes the shorter side to the model's input size
# (bicubic), crops the centre square, scales the pixels to [0, 1] and normalises each channel with CLIP's mean and
# standard deviation. A caption about something near an edge of a wide image may be about pixels CLIP never saw.
# Below, that preprocessing by hand, against the transform that CLIPScore uses.

# %%
from PIL import Image

image, size = load_image(val[0].image_path), scorer.preprocess.transforms[1].size
size = size[0] if isinstance(size, (tuple, list)) else size
w, h = image.size
scale = size / min(w, h)  # the shorter side becomes `size` (torchvision truncates the longer one)
resized = image.resize((size if w <= h else int(w * scale), size if h <= w else int(h * scale)), Image.BICUBIC)
left, top = round((resized.width - size) / 2), round((resized.height - size) / 2)  # the centre crop
pixels = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32) / 255
mean, std = (np.array(v, dtype=np.float32) for v in (scorer.preprocess.transforms[-1].mean,
                                                         scorer.preprocess.transforms[-1].std))
by_hand = torch.from_numpy(((pixels - mean) / std).transpose(2, 0, 1))
assert torch.allclose(by_hand, scorer.preprocess(image), atol=1e-6)
print(f"{w} x {h} pixels -> {tuple(by_hand.shape)}; by hand equals CLIP's preprocessing (largest difference "
      f"{(by_hand - scorer.preprocess(image)).abs().max():.1e})")

# %% [markdown]
# The AUC above is the number to read: 0.5 would mean the CLIP model cannot tell an image's own caption from a
# random one, and CLIPScore would then rank captions by chance. The two histograms show how far apart the two kinds of
# caption sit on average, and how much they overlap: a single CLIPScore is a noisy verdict on one caption, and a mean
# over hundreds of images is a stable one.

# %%
save_metrics(out, "clip_check", clip_metrics)
if world:
    save_metrics(out, "world", world)

# %% [markdown]
# ## Try it yourself
#
# **Change and watch** (no check: these are questions for your report; a notebook run again with `-p NAME VALUE`,
# or its parameters cell edited in JupyterLab). Then three exercises that **check themselves**: write the code, run
# its cell, and it says `correct` or what is wrong; a hint and the solution are folded under each.
#
# 1. Set `seed = 3` and run the notebook again: another grid, and other shuffled captions in `clip_check`. How much
#    does the AUC move? That spread is the noise of the check itself.
# 2. Point `clip_model` at the stand-in ViT's folder, `data/demo/models/vit`. The notebook stops with a clear error:
#    CLIPScore needs a model with a text tower. Which models in `data/demo/models/` have one?
# 3. On the course's data (`data_root = "hw3_data"`, `clip_model = "ViT-B-32-quickgelu"`, `clip_pretrained =
#    "openai"`): the parser cell says there is nothing to parse. Compare the caption statistics with the demo's: which
#    words dominate COCO-style captions, and what would a caption built from the ten most common words score?

# %% [markdown]
# **Write it yourself: CLIPScore from cosine similarities.** CLIP embeds the image and the caption; their
# cosine similarity `cos` becomes CLIPScore `w * max(cos, 0)` with `w = 2.5` (Hessel et al., 2021). Write
# `clipscore(cos)` for a NumPy array of cosines. Why does the clip at 0 make a spike in the histogram of
# `00_clip_check.png`?
#
# <details><summary>Hint</summary>
#
# `np.maximum(cos, 0)` clips element-wise; multiply by 2.5. A caption that CLIP finds unrelated (a negative
# cosine) scores exactly 0, however unrelated it is: all of them land in one bar.
#
# </details>
# <details><summary>Solution</summary>
#
# ```python
# def clipscore(cos):
#     return 2.5 * np.maximum(cos, 0)
# ```
#
# </details>

# %%
import numpy as np
from hw3lib.exercises import check


def clipscore(cos):
    raise NotImplementedError  # your code: CLIPScore of each cosine in the array `cos`


check("clipscore", clipscore)

# %% [markdown]
# **Write it yourself: the CLIP check's AUC.** Given the CLIPScores of the images' own captions (`own`) and of
# other images' captions (`other`), the AUC is the fraction of all (own, other) pairs in which the own caption scores
# higher, a tie counting half. Write `auc(own, other)` for two NumPy arrays; the check compares it with the AUC this
# notebook printed for its check.
#
# <details><summary>Hint</summary>
#
# Broadcasting compares every pair at once: `own[:, None] > other[None, :]` is a matrix of booleans.
#
# </details>
# <details><summary>Solution</summary>
#
# ```python
# def auc(own, other):
#     greater = (own[:, None] > other[None, :]).sum()
#     ties = (own[:, None] == other[None, :]).sum()
#     return (greater + 0.5 * ties) / (len(own) * len(other))
# ```
#
# </details>

# %%
def auc(own, other):
    raise NotImplementedError  # your code: P(own > other) over all pairs, ties half


check("auc", auc)

# %% [markdown]
# **Write it yourself: the most common caption.** Notebook 03's baseline writes one caption under every image:
# the one the annotators wrote most often. Write `most_common_caption(references)` for `{image id: [captions]}` (as
# `train_refs` above); it returns `(caption, count)`. Run it on `train_refs`: how often does it occur?
#
# <details><summary>Hint</summary>
#
# `collections.Counter` over all captions of all images, then `.most_common(1)[0]`.
#
# </details>
# <details><summary>Solution</summary>
#
# ```python
# from collections import Counter
#
#
# def most_common_caption(references):
#     return Counter(c for captions in references.values() for c in captions).most_common(1)[0]
# ```
#
# </details>

# %%
def most_common_caption(references):
    raise NotImplementedError  # your code: (caption, count) over all images' references


check("most_common_caption", most_common_caption)
