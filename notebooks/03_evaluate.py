# %% [markdown]
# # 03 · Evaluating the captioner (P2)
#
# Caption the validation split with the best adapter of notebook 02 and score it exactly as the course's
# `evaluate.py` does: **CIDEr-D** (pycocoevalcap, PTB-tokenised, over the whole set) and **CLIPScore**
# `2.5 · max(cos(image, text), 0)` averaged over images. Per-image CLIPScores are saved for notebook 05.
#
# Two references keep the numbers honest: a **baseline** that gives every image the single most common training
# caption (what CIDEr awards for knowing the phrasing but not the image), and — on the demo profile, where the scenes
# are known — **caption accuracy**: the fraction of images whose caption names exactly the right (colour, shape) set.

# %% tags=["parameters"]
data_root = "data/demo/hw3_data"  # hw3_data root
adapter = ""  # trained adapter (.safetensors); "": the best of notebook 02 in output_dir/p2/main/
num_beams = 3  # 1: greedy
max_new_tokens = 30  # caption length limit (tokens)
length_penalty = 1.0  # beam score: sum log p / length ** length_penalty
no_repeat_ngram_size = 0  # forbid repeated n-grams (0: off)
batch_size = 64  # images per generate() call
clip_model = "data/demo/models/clip"  # open_clip name (ViT-B-32-quickgelu) or a local folder
clip_pretrained = ""  # "openai" for the real CLIP; "" for a folder
num_show = 8  # example captions shown
output_dir = "outputs/demo"  # set by `hw3 run`

# %%
import json
from collections import Counter
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Markdown, display

from hw3lib import viz
from hw3lib.captioner import GenerationConfig, caption_folder, load_adapter
from hw3lib.data import load_split, write_json_atomic
from hw3lib.metrics import ClipConfig, ClipScorer, cider, clip_score
from hw3lib.params import typed
from hw3lib.report import save_metrics

P = typed(dict(data_root=str, adapter=str, num_beams=int, max_new_tokens=int, length_penalty=float,
               no_repeat_ngram_size=int, batch_size=int, clip_model=str, clip_pretrained=str, num_show=int,
               output_dir=str), globals())
root, out = Path(P.data_root), Path(P.output_dir)
(out / "figures").mkdir(parents=True, exist_ok=True)
adapter = Path(P.adapter) if P.adapter else out / "p2/main/best.safetensors"
gen = GenerationConfig(num_beams=P.num_beams, max_new_tokens=P.max_new_tokens, length_penalty=P.length_penalty,
                       no_repeat_ngram_size=P.no_repeat_ngram_size)

# %% [markdown]
# ## Caption the validation images
#
# The same call as `hw3 caption IMAGES OUT.json DECODER --adapter ADAPTER` (the course's `hw3_2.sh`).

# %%
model, encoder_model, transform = load_adapter(adapter, decoder_checkpoint=str(root / "p2_data/decoder_model.bin"))
val = load_split(root / "p2_data/val.json", root / "p2_data/images/val")
predictions = caption_folder(model, encoder_model, transform, root / "p2_data/images/val", gen, P.batch_size)
predictions = {r.file_id: predictions[r.file_id] for r in val}
write_json_atomic(out / "p2_val_predictions.json", predictions)
print(f"{len(predictions)} captions -> {out / 'p2_val_predictions.json'}")

# %%
references = {r.file_id: list(r.references) for r in val}
score, per_cider = cider(predictions, references)
scorer = ClipScorer(ClipConfig(model=P.clip_model, pretrained=P.clip_pretrained or None))
clip_mean, per_clip = clip_score(scorer, predictions, root / "p2_data/images/val")
train_refs = [c for r in load_split(root / "p2_data/train.json", root / "p2_data/images/train") for c in r.references]
common, count = Counter(train_refs).most_common(1)[0]
baseline, _ = cider({k: common for k in references}, references)
write_json_atomic(out / "p2_val_per_image.json", {k: {"caption": predictions[k], "clipscore": per_clip[k],
                                                      "cider": per_cider[k]} for k in predictions})
summary = {"cider": score, "clipscore": clip_mean, "baseline_cider": baseline,
           "baseline_caption": common, "trainable_params": model.trainable_parameters()}
display(Markdown(viz.markdown_table([{"captions": "the adapter", "CIDEr": score, "CLIPScore": clip_mean},
                                    {"captions": f"baseline: '{common}' for every image", "CIDEr": baseline,
                                     "CLIPScore": float("nan")}])))

# %% [markdown]
# ## Caption accuracy (demo profile)

# %%
sidecar = root / "p2_data/val_objects.json"
if sidecar.is_file():
    from hw3lib.demo.world import caption_accuracy, load_objects, parse_caption

    objects = load_objects(sidecar)
    accuracy, per_image = caption_accuracy(predictions, objects)
    summary["caption_accuracy"] = accuracy
    by_count = {}
    for k, ok in per_image.items():
        by_count.setdefault(len(objects[k]), []).append(ok)
    rows = [{"objects in the scene": n, "images": len(v), "caption accuracy": float(np.mean(v))}
            for n, v in sorted(by_count.items())]
    display(Markdown(viz.markdown_table(rows)))
    wrong = [k for k, ok in per_image.items() if not ok][:5]
    for k in wrong:
        truth = sorted((o["color"], o["shape"]) for o in objects[k])
        print(f"{k}: {predictions[k]!r}\n    names {sorted(parse_caption(predictions[k]))}, truth {truth}")
else:
    print("not the shapes world: no ground truth for caption accuracy")

# %% [markdown]
# ## Caption lengths and examples

# %%
fig = viz.caption_lengths({"predictions": list(predictions.values()),
                           "references": [c for cs in references.values() for c in cs]})
fig.savefig(out / "figures/03_caption_lengths.png", dpi=110)
plt.show()
shown = val[: P.num_show]
fig = viz.image_grid(shown, captions=[f"{predictions[r.file_id]}\nCLIPScore {per_clip[r.file_id]:.2f}"
                                      for r in shown])
fig.savefig(out / "figures/03_examples.png", dpi=110)
plt.show()

# %%
training_file = out / "metrics/captioner_training.json"
training = json.loads(training_file.read_text()) if training_file.is_file() else {}
summary["variants"] = training.get("variants", [])
summary["generation"] = {"num_beams": P.num_beams, "max_new_tokens": P.max_new_tokens,
                         "length_penalty": P.length_penalty, "no_repeat_ngram_size": P.no_repeat_ngram_size}
save_metrics(out, "captioner", summary)
{k: v for k, v in summary.items() if k != "variants"}
