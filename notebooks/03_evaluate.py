# %% [markdown]
# # 03 · Evaluating the captioner (P2)
#
# Caption the validation split with the best adapter of notebook 02 and score it exactly as the course's
# `evaluate.py` does: **CIDEr-D** (pycocoevalcap, PTB-tokenised, over the whole set) and **CLIPScore**
# `2.5 · max(cos(image, text), 0)` averaged over images. Per-image CLIPScores are saved for notebook 05.
#
# Two references keep the numbers honest: a **baseline** that gives every image the single most common training
# caption (what CIDEr awards for knowing the phrasing but not the image), and, on the demo profile, where the scenes
# are known, **caption accuracy**: the fraction of images whose caption names exactly the right (colour, shape) set.

# %% tags=["parameters"]
data_root: str = "data/demo/hw3_data"  # hw3_data root
adapter: str = ""  # trained adapter (.safetensors); "": the best of notebook 02 in output_dir/p2/main/
num_beams: int = 3  # 1: greedy
max_new_tokens: int = 30  # caption length limit (tokens)
length_penalty: float = 1.0  # beam score: sum log p / length ** length_penalty
no_repeat_ngram_size: int = 0  # forbid repeated n-grams (0: off)
batch_size: int = 64  # images per generate() call
clip_model: str = "data/demo/models/clip"  # open_clip name (ViT-B-32-quickgelu) or a local folder
clip_pretrained: str = ""  # "openai" for the real CLIP; "" for a folder
num_show: int = 8  # example captions shown
output_dir: str = "outputs/demo"  # set by `hw3 run`

# %%
from dataclasses import asdict

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Markdown, display

from hw3lib import viz
from hw3lib.captioner import CaptionerGeneration, load_adapter
from hw3lib.data import hw3_split, relative, write_json_atomic
from hw3lib.demo.world import accuracy_report, ground_truth, world_scores
from hw3lib.metrics import common_caption_baseline, score_split
from hw3lib.outputs import clip_scorer, start
from hw3lib.report import save_metrics

# %%
P, run = start(globals())  # the parameters, and the run's folders (hw3lib/outputs.py)
root, out = run.data_root, run.output_dir
adapter = run.adapter(P.adapter)
gen = CaptionerGeneration(num_beams=P.num_beams, max_new_tokens=P.max_new_tokens, length_penalty=P.length_penalty,
                          no_repeat_ngram_size=P.no_repeat_ngram_size)

# %% [markdown]
# ## Caption the validation images, and score them
#
# The captions are those `hw3 caption IMAGES OUT.json DECODER --adapter ADAPTER` (the course's `hw3_2.sh`) writes;
# `score_split` scores them as the course's `evaluate.py` does. Notebook 02 scores its LoRA attempts with the same
# function and the same decoding, so its table and this notebook agree.

# %%
model, encoder_model, transform = load_adapter(adapter, decoder_checkpoint=run.decoder_checkpoint)
val = hw3_split(root, "p2_data")
scorer = clip_scorer(P.clip_model, P.clip_pretrained)
scored = score_split(model, encoder_model, transform, val, gen, scorer, root / "p2_data/images/val", P.batch_size)
predictions, score, per_cider, clip_mean, per_clip = (scored.predictions, scored.cider, scored.per_cider,
                                                      scored.clipscore, scored.per_clip)
write_json_atomic(out / "p2_val_predictions.json", predictions)
print(f"{len(predictions)} captions -> {relative(out / 'p2_val_predictions.json')}")

# %% [markdown]
# ## Against a baseline that does not look at the image
#
# > **Read CLIPScores against this run's own.** The demo's stand-in CLIP scores near 2.5 where the course's CLIP
# > ViT-B/32 gives about 0.7 to 0.8 for good COCO captions (notebook 00 explains why). Compare the adapter with the
# > baseline below, both scored by the same CLIP, never with a number from another model.

# %%
references = {r.file_id: list(r.references) for r in val}
base = common_caption_baseline(hw3_split(root, "p2_data", "train"), val, scorer, root / "p2_data/images/val")
write_json_atomic(out / "p2_val_per_image.json", {k: {"caption": predictions[k], "clipscore": per_clip[k],
                                                      "cider": per_cider[k]} for k in predictions})
display(Markdown(viz.markdown_table([
    {"captions": "the adapter", "CIDEr": score, "CLIPScore": clip_mean},
    {"captions": f"baseline: '{base.caption}' for every image", "CIDEr": base.cider, "CLIPScore": base.clipscore}])))

# %%
display(Markdown(
    f"**Reading it.** The baseline caption, *{base.caption}*, is the most common of the {base.of} training "
    f"captions ({base.count} times). Written under every image, it scores CIDEr {base.cider:.3f} and CLIPScore "
    f"{base.clipscore:.3f}; the adapter's captions score {score:.3f} and {clip_mean:.3f}. CIDEr weights each n-gram "
    "by how rare it is across the references (TF-IDF), so a caption that is right for every image earns little "
    f"of it: the gap ({score - base.cider:+.3f}) is what looking at the image buys. CLIPScore has no references and "
    f"no such weighting: the same gap there is {clip_mean - base.clipscore:+.3f}."))

# %% [markdown]
# ## Open the box: CIDEr-D of one caption, by hand
#
# What pycocoevalcap computes for one image, in five steps (Vedantam et al., 2015; "-D" is the variant COCO uses):
#
# 1. **Tokens.** Every caption goes through the PTB tokenizer (lower case, punctuation removed), then its **n-grams**
#    for n = 1 to 4 are counted.
# 2. **TF-IDF.** Each n-gram `g` of a caption gets the weight `tf(g) * log(N / df(g))`: `tf` is its count in the
#    caption, `N` the number of images, `df(g)` the number of images whose references contain it. An n-gram that
#    every image's references use (`df = N`) weighs nothing: "a", "on a plain background".
# 3. **Cosine per n, clipped.** For each reference and each n, the caption's and the reference's TF-IDF vectors are
#    compared by their cosine, where the caption's weight of each n-gram is first clipped to the reference's
#    (`min`): saying "red red red" earns no more than the reference's one "red".
# 4. **Length penalty.** Each cosine is multiplied by `exp(-(l_c - l_r)^2 / (2 * 6^2))`, a Gaussian of the
#    difference in length between caption and reference (sigma = 6 words).
# 5. **Average.** Over n = 1..4 and over the references, times 10.

# %%
import math
from collections import Counter

from hw3lib.cider import tokenize

tok = tokenize({k: [{"caption": c} for c in [predictions[k], *references[k]]] for k in references})  # as evaluate.py


def grams(s):  # step 1: the 1- to 4-grams of a tokenised caption, with their counts
    w = s.split()
    return Counter(tuple(w[i:i + n]) for n in range(1, 5) for i in range(len(w) - n + 1))


df = Counter(g for k in tok for g in set().union(*(grams(r) for r in tok[k][1:])))


def tfidf(s):  # step 2: per n, {n-gram: weight}; the norms; the length (pycocoevalcap counts the bigrams)
    v = [{g: tf * (math.log(len(tok)) - math.log(max(1.0, df[g]))) for g, tf in grams(s).items() if len(g) == n}
         for n in range(1, 5)]
    return v, [math.sqrt(sum(x * x for x in d.values())) for d in v], sum(grams(s)[g] for g in v[1])

# %%
def cider_d(k, sigma=6.0):
    (vc, nc, lc), total = tfidf(tok[k][0]), 0.0
    for ref in tok[k][1:]:
        vr, nr, lr = tfidf(ref)
        for n in range(4):  # step 3, clipped cosine; step 4, the length penalty
            dot = sum(min(x, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, x in vc[n].items())
            cos = dot / (nc[n] * nr[n]) if nc[n] and nr[n] else dot
            total += cos * math.exp(-((lc - lr) ** 2) / (2 * sigma**2))
    return 10.0 * total / 4 / len(tok[k][1:])  # step 5


k = max(per_cider, key=per_cider.get)
assert abs(cider_d(k) - per_cider[k]) < 1e-9, (cider_d(k), per_cider[k])
print(f"{k}: by hand {cider_d(k):.6f}, pycocoevalcap {per_cider[k]:.6f}\n  caption: {tok[k][0]}\n  first reference: "
      f"{tok[k][1]}")

# %% [markdown]
# The length penalty is what sinks a long answer. Notebook 01's "detailed" instruction makes LLaVA write several
# sentences: at the mean lengths below, a caption 20 words longer than its references keeps `exp(-400 / 72)` =
# 0.4% of its n-gram credit, whatever it says.

# %%
llava_run = run.metrics("llava")  # notebook 01's sweep
if llava_run:
    ref_len = np.mean([len(c.split()) for r in hw3_split(root, "p1_data") for c in r.references])
    display(Markdown(viz.markdown_table([
        {"P1 setting": row["name"], "CIDEr": row["cider"], "mean length": row["mean_length"],
         "minus the references' mean": row["mean_length"] - ref_len,
         "penalty at the mean lengths": f"{math.exp(-((row['mean_length'] - ref_len) ** 2) / 72):.2g}"}
        for row in llava_run["sweep"]])))
else:
    print("notebook 01 has not run: no P1 rows to compare")

# %% [markdown]
# ## How the scores spread over the images
#
# A mean hides its spread. CIDEr-D is computed over the whole set (its IDF comes from all the references), but
# pycocoevalcap also returns each image's share; CLIPScore is a plain mean of per-image scores.

# %%
c, s = np.array(list(per_cider.values())), np.array(list(per_clip.values()))
fig = viz.score_histograms({"CLIPScore": s}, title="CLIPScore per validation image")
fig.savefig(out / "figures/03_clipscore_spread.png", dpi=110)
plt.show()
corr = float(np.corrcoef(c, s)[0, 1])
display(Markdown(
    f"Per image, CIDEr runs from {c.min():.2f} to {c.max():.2f} (median {np.median(c):.2f}); "
    f"{(c == 0).mean():.0%} of the images score 0, sharing no n-gram with any reference. CLIPScore runs from "
    f"{s.min():.3f} to {s.max():.3f} (standard deviation {s.std():.3f}). The two agree per image with a "
    f"correlation of {corr:.2f}. Is that high enough to trust one metric in place of the other?"))

# %% [markdown]
# ## Caption accuracy (shapes world)
#
# CIDEr and CLIPScore are proxies. On the shapes world the truth is known, so the right question can be asked
# directly: does the caption name exactly the objects in the scene? Scenes with more objects are harder.

# %%
objects = ground_truth(root / "p2_data")  # None on the course's data
summary = {"cider": score, "clipscore": clip_mean, "baseline_cider": base.cider, "baseline_clipscore": base.clipscore,
           "baseline_caption": base.caption, "trainable_params": model.trainable_parameters(), "per_image_cider_zero":
           float((c == 0).mean()), "cider_clipscore_correlation": corr}
summary.update({name: f(predictions) for name, f in world_scores(root / "p2_data").items()})
if objects:
    rows, wrong = accuracy_report(predictions, objects)
    display(Markdown(viz.markdown_table(rows)))
    print(f"caption accuracy {summary['caption_accuracy']:.3f}; some wrong captions:\n  " + "\n  ".join(wrong))
else:
    print("not the shapes world: no ground truth for caption accuracy")

# %% [markdown]
# ## Caption lengths and examples
#
# CIDEr-D multiplies each n-gram match by a Gaussian penalty on the length difference to the reference, so a model
# that writes captions much shorter or longer than the references loses CIDEr even when every word is right.

# %%
fig = viz.caption_lengths({"predictions": list(predictions.values()),
                           "references": [c for cs in references.values() for c in cs]})
fig.savefig(out / "figures/03_caption_lengths.png", dpi=110)
plt.show()
pred_len = np.mean([len(p.split()) for p in predictions.values()])
ref_len = np.mean([len(r.split()) for rs in references.values() for r in rs])
print(f"mean length: predictions {pred_len:.1f} words, references {ref_len:.1f} words")
shown = val[: P.num_show]
fig = viz.image_grid(shown, captions=[f"{predictions[r.file_id]}\nCLIPScore {per_clip[r.file_id]:.2f}"
                                      for r in shown])
fig.savefig(out / "figures/03_examples.png", dpi=110)
plt.show()

# %%
summary["attempts"] = (run.metrics("captioner_training") or {}).get("attempts", [])  # notebook 02's
summary["generation"] = asdict(gen)
save_metrics(out, "captioner", summary)

# %% [markdown]
# ## Try it yourself
#
# **Change and watch** (no check: these are questions for your report; a notebook run again with `-p NAME VALUE`,
# or its parameters cell edited in JupyterLab). Then three exercises that **check themselves**: write the code, run
# its cell, and it says `correct` or what is wrong; a hint and the solution are folded under each.
#
# 1. Switch the decoding: `num_beams = 3` if this run decoded greedily (the demo's config does), `num_beams = 1` if it
#    used beam search (the hw3 config). Compare CIDEr, CLIPScore and the mean caption length. Which metric moves
#    more, and in which direction?
# 2. Set `length_penalty = 2.0` with `num_beams = 3`: beam search now favours longer captions. Watch the length
#    histogram and CIDEr's length penalty at work.
# 3. Set `max_new_tokens = 8`: captions are cut. Which scene sizes lose caption accuracy first?
# 4. Score the baseline caption against a caption of your own with `hw3 evaluate --pred YOUR.json --annotation
#    data/demo/hw3_data/p2_data/val.json --images data/demo/hw3_data/p2_data/images/val --clip-model
#    data/demo/models/clip --clip-pretrained ""`. Can you write one fixed caption that beats the baseline's CIDEr?

# %% [markdown]
# **Write it yourself: beat the baseline with one caption.** The baseline writes the most common training caption
# under every image. Write one caption of your own, the same for every image, that scores a higher CIDEr than the
# baseline on this validation split. What does CIDEr's TF-IDF weighting make you write, and does CLIPScore agree?
#
# <details><summary>Hint</summary>
#
# An n-gram that appears in the references of every image has an IDF of 0: it earns nothing. Words that many
# references use, but not all images', earn the most for a caption that says them everywhere. Look at the caption
# statistics of notebook 00.
#
# </details>
# <details><summary>Solution</summary>
#
# One answer on the demo world (on the course's data, try a frequent COCO phrase such as "a man riding a horse"):
#
# ```python
# my_caption = "a red circle and a blue square on a plain background"
# ```
#
# </details>

# %%
from hw3lib.exercises import check

my_caption = ""  # your caption

check("beat_the_baseline", my_caption, references=references, baseline=base.cider)

# %% [markdown]
# **Write it yourself: CIDEr-D's length penalty.** Write `cider_length_penalty(candidate_length, reference_length,
# sigma=6.0)`, the factor `exp(-(l_c - l_r)^2 / (2 sigma^2))` that multiplies every n-gram match. What does a
# 35-word answer keep against 10-word references?
#
# <details><summary>Hint</summary>
#
# `math.exp(-((candidate_length - reference_length) ** 2) / (2 * sigma**2))`.
#
# </details>
# <details><summary>Solution</summary>
#
# ```python
# import math
#
#
# def cider_length_penalty(candidate_length, reference_length, sigma=6.0):
#     return math.exp(-((candidate_length - reference_length) ** 2) / (2 * sigma**2))
# ```
#
# </details>

# %%
def cider_length_penalty(candidate_length, reference_length, sigma=6.0):  # not the parameter length_penalty
    raise NotImplementedError  # your code: the Gaussian of the length difference


check("length_penalty", cider_length_penalty)

# %% [markdown]
# **Write it yourself: the IDF of an n-gram.** In the box above, an n-gram's TF-IDF weight is its count times
# `log(N / df)`: `N` images, `df` of them with the n-gram among their references (at least 1). Write `idf(df,
# num_images)`. What is the IDF of an n-gram that every image's references contain, and what does that say about
# "on a plain background"?
#
# <details><summary>Hint</summary>
#
# `math.log(num_images) - math.log(max(1.0, df))`.
#
# </details>
# <details><summary>Solution</summary>
#
# ```python
# import math
#
#
# def idf(df, num_images):
#     return math.log(num_images) - math.log(max(1.0, df))
# ```
#
# </details>

# %%
def idf(df, num_images):
    raise NotImplementedError  # your code: log(N / max(1, df))


check("idf", idf)
