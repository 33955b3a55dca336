# %% [markdown]
# # 02 · A LoRA captioner: frozen ViT → projection → GPT-2 with LoRA (P2)
#
# The course's Problem 2. A frozen, pretrained **ViT** turns the image into patch tokens; a small trainable
# **projection** maps them into the embedding space of the course's **GPT-2 decoder**, where they stand *before* the
# caption as a visual prefix (the ClipCap recipe). The decoder stays frozen except for **LoRA** (Hu et al., 2021):
# each adapted weight `W` becomes `W + (alpha / r) · B A` with `A: r × in`, `B: out × r`, `B = 0` at the start, so the
# model begins exactly as the pretrained decoder. Only the projection and `A`, `B` train: fewer than 10 M parameters.
#
# ```
# image ─ ViT (frozen) ─ [CLS] + patch tokens ─ projection + LayerNorm ─┐
#                                                                       ├─ GPT-2 + LoRA ─ next-token loss on the caption
#                           <|endoftext|> a red circle and ... ─ wte ───┘
# ```

# %% tags=["parameters"]
data_root: str = "data/demo/hw3_data"  # hw3_data root: p2_data/ holds train/val, decoder_model.bin, encoder.json, vocab.bpe
encoder: str = "data/demo/models/vit"  # timm model name (e.g. vit_large_patch14_clip_224.openai_ft_in12k_in1k) or folder
pool: int = 2  # average-pool the patch grid (demo: 12 x 12 -> 6 x 6, 4x fewer visual tokens on the CPU); 1: all
visual_norm: bool = True  # LayerNorm the visual tokens to the text embeddings' scale
lora_r: int = 16  # LoRA rank
lora_alpha: int = 32  # LoRA scaling alpha (scale: alpha / r)
lora_targets: str = "c_attn,c_fc"  # comma-separated: c_attn, attn.c_proj, c_fc, mlp.c_proj, lm_head
num_epochs: int = 6  # passes over the training images
batch_size: int = 32  # captions per step (whole images: each image's visual prefix is computed once per step)
lr: float = 0.003  # peak learning rate (warm-up, then cosine)
captions_per_image: int = 2  # references per image per epoch (0: all five)
max_train_images: int = 0  # use only the first N training images (0: all; small values for quick checks)
eval_images: int = 32  # val images captioned (greedy) after each epoch for the curves
attempt_lora_r: int = 4  # LoRA attempt 1 for the report: this rank (alpha scaled with it), all else as the main run
attempt_lora_targets: str = "c_attn"  # LoRA attempt 2: these layers, all else as the main run
attempt_epochs: int = 1  # the attempts and the LayerNorm ablation train this many epochs of the main schedule (0: none)
num_beams: int = 3  # decoding of the whole-val scores, as notebook 03's (1: greedy) ...
max_new_tokens: int = 30  # ...
length_penalty: float = 1.0  # ...
no_repeat_ngram_size: int = 0  # ... (a flat config gives both notebooks the same values)
score_batch_size: int = 64  # val images per beam-search call in those scores (16 on a 12 GB card)
compile_scope: str = "step"  # torch.compile on a GPU: "step" (the whole step) or "blocks" (one decoder block, shared)
clip_model: str = "data/demo/models/clip"  # CLIP for validation CLIPScore: open_clip name or folder
clip_pretrained: str = ""  # open_clip tag ("openai") or file; "" for a folder
output_dir: str = "outputs/demo"  # set by `hw3 run`
seed: int = 0  # initialisation, data order
overwrite: bool = False  # replace a run of another configuration in output_dir/p2/ (else that is an error)

# %%
import math
from dataclasses import asdict
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from IPython.display import Markdown, display

from hw3lib import viz
from hw3lib.captioner import (CaptionerConfig, EncoderConfig, CaptionerGeneration, build, checked_trainable_count,
                              extract_features, load_adapter, parameter_groups, course_files)
from hw3lib.data import hw3_split, relative
from hw3lib.decoder import LoraConfig
from hw3lib.metrics import score_split
from hw3lib.outputs import clip_scorer, start
from hw3lib.report import save_metrics
from hw3lib.train import (TrainConfig, attempt_configs, attempt_metrics, attempt_row, attempt_schedule, row_adapter,
                          train)

# %%
P, run = start(globals())  # the parameters, and the run's folders (hw3lib/outputs.py)
torch.manual_seed(P.seed)
root, out = run.data_root, run.output_dir
device = "cuda" if torch.cuda.is_available() else "cpu"
cfg = CaptionerConfig(
    encoder=EncoderConfig(name=P.encoder, pool=P.pool),  # with the CLS token; hw3 train has the other options
    lora=LoraConfig(r=P.lora_r, alpha=P.lora_alpha, targets=LoraConfig.parse_targets(P.lora_targets)),
    visual_norm=P.visual_norm, **course_files(root))
train_cfg, attempt_cfg = attempt_schedule(TrainConfig(num_epochs=P.num_epochs, batch_size=P.batch_size, lr=P.lr,
                                                     captions_per_image=P.captions_per_image,
                                                     eval_images=P.eval_images, seed=P.seed,
                                                     compile_scope=P.compile_scope), P.attempt_epochs)
gen = CaptionerGeneration(num_beams=1)  # greedy for the per-epoch curves (notebook 03 decodes with the final config)

# %% [markdown]
# ## The model and what trains
#
# LoRA layers are built inside the decoder *before* the course checkpoint is loaded into it (doing it the other way
# round leaves a randomly initialised base). The count below is what the assignment limits.

# %%
model, encoder_model, transform = build(cfg, seed=P.seed)
n_trainable = checked_trainable_count(model)  # fails at the assignment's 10 M
display(Markdown(viz.markdown_table(parameter_groups(model, encoder_model))))

# %% [markdown]
# ## Data, and one forward pass
#
# The encoder is frozen, so its output for an image never changes: training runs it **once per image** and keeps
# the features, instead of once per caption per epoch. Here it runs on eight validation images to show the shapes
# that flow through the model, and the loss of the untrained model.

# %%
train_records = hw3_split(root, "p2_data", "train")
train_records = train_records[: P.max_train_images] if P.max_train_images else train_records
val_records = hw3_split(root, "p2_data")
sample = extract_features(encoder_model, transform, val_records[:8], cfg.encoder).float()
ids, tgt = model.batch_captions([r.references[0] for r in val_records[:8]])
with torch.no_grad():
    first = model(sample, ids, tgt)
print(f"{len(train_records)} train / {len(val_records)} val images")
print(f"features {tuple(sample.shape)} (batch, visual tokens, width); input_ids {tuple(ids.shape)}; "
      f"logits {tuple(first.logits.shape)}")
V = model.decoder.cfg.vocab_size
display(Markdown(
    f"The loss before training, **{first.loss.item():.3f}**, is the course decoder's own, with the visual tokens "
    f"still meaningless to it: it already knows the language of the captions, so it is far below "
    f"ln({V:,}) = {math.log(V):.2f}, the loss of a uniform guess over this decoder's {V:,}-token vocabulary. What "
    "is left to learn is to read the image."))

# %% [markdown]
# ## Visual tokens and text embeddings live at different scales
#
# A pitfall every HW3 report hit: the ViT's features, linearly projected, have norms far from those of GPT-2's token
# embeddings, so the visual prefix either drowns the caption or vanishes next to it. A LayerNorm after the projection,
# with its gain set to the text embeddings' scale, puts them on the same footing from step one.

# %%
with torch.no_grad():
    raw = model.proj(sample).flatten(0, 1)
    normed = model.visual_norm(raw) if P.visual_norm else torch.nn.functional.layer_norm(raw, raw.shape[-1:])
    text = model.decoder.transformer.wte.weight
norms = {"text embeddings (wte)": text.norm(dim=-1).numpy(), "visual tokens, projected": raw.norm(dim=-1).numpy(),
         "visual tokens, + LayerNorm": normed.norm(dim=-1).numpy()}
fig = viz.token_norms(norms, title="per-token norms at initialisation")
fig.savefig(out / "figures/02_token_norms.png", dpi=110)
plt.show()
print("mean norms: " + ", ".join(f"{k} {float(v.mean()):.2f}" for k, v in norms.items()))

# %% [markdown]
# > **Pitfall: two fixes for the scale, and which one acts.** The seed report of this homework fixed the scale by
# > cutting the visual positions out of the decoder's output *before* its final LayerNorm `ln_f`, so that only text
# > positions reach `ln_f` and the vocabulary projection. A LayerNorm normalises each position on its own, so that
# > cut changes no text logit, as the cell below checks on this model: it saves work, but the visual tokens' scale
# > has already acted in every attention layer before `ln_f`. The LayerNorm on the projected visual tokens acts
# > before the first layer; the ablation row of the attempts table below measures what it buys.

# %%
with torch.no_grad():
    x = torch.cat([model.visual_tokens(sample), model.decoder.embed(ids)], 1)  # visual prefix, then the caption
    hidden = model.decoder(inputs_embeds=x, logits=False).logits  # the last block's output, before ln_f
    n_visual, head, ln_f = x.shape[1] - ids.shape[1], model.decoder.lm_head, model.decoder.transformer.ln_f
    after = head(ln_f(hidden))[:, n_visual:]  # ln_f on every position, the text kept afterwards
    before = head(ln_f(hidden[:, n_visual:]))  # the text cut out first, as the seed report did
assert torch.allclose(after, before, atol=1e-5)
print(f"text logits {tuple(before.shape)}: the same with the cut before ln_f or after it (max difference "
      f"{(after - before).abs().max().item():.1e})")

# %% [markdown]
# ## Training
#
# AdamW on the trainable parameters, linear warm-up then cosine decay, gradient clipping, bf16 autocast on a GPU.
# Every epoch ends with validation captions, CIDEr and CLIPScore, an atomic checkpoint (`last.pt`, so a killed run
# resumes where it stopped) and the best adapter so far (`best.safetensors` + `best.json`: trained weights only).
# Re-running the notebook with the same configuration and data picks up the finished run instead of training again;
# any change of configuration starts over.

# %%
clip = clip_scorer(P.clip_model, P.clip_pretrained)
result = train(model, encoder_model, transform, train_records, val_records, train_cfg, out / "p2/main", gen,
               clip=clip, overwrite=P.overwrite)
fig = viz.training_curves(result.history, title=f"LoRA r={P.lora_r} on {P.lora_targets}")
fig.savefig(out / "figures/02_training_curves.png", dpi=110)
plt.show()
last = result.history[-1]
print(f"{len(result.history)} epochs in {result.seconds:.0f}s: loss {result.history[0]['loss']:.3f} -> "
      f"{last['loss']:.3f}, val CIDEr {result.history[0]['val_cider']:.3f} -> {last['val_cider']:.3f}; "
      f"best epoch {result.best_epoch}")

# %% [markdown]
# > **Pitfall: save what you trained, not the model.** The course loads its own `decoder_model.bin` and a pretrained
# > encoder when it grades; your checkpoint needs only the projection and the LoRA matrices. `torch.save(model.
# > state_dict())` would store the frozen decoder (and the ViT, if it is a submodule) again, and the frozen weights
# > count toward nothing but the file's size. The 10 M limit is on the *trainable* parameters: count those
# > (`requires_grad`), as the check above does, not the model's.

# %%
ckpt = Path(cfg.decoder_checkpoint)
print(f"best.safetensors: {result.best_path.stat().st_size / 2**20:.2f} MiB, the trained weights only; the course "
      f"decoder it adapts, {ckpt.name}: {ckpt.stat().st_size / 2**20:.1f} MiB, read from hw3_data/ at every load")

# %% [markdown]
# ## Two LoRA attempts, and an ablation
#
# The report asks for two LoRA settings with their scores. Each attempt below changes **one** knob of the main run
# and keeps everything else, the schedule too (learning rate, warm-up and data order), so a difference in the table
# is that knob's: attempt 1 the rank (alpha scaled with it, so the update's scale `alpha / r` stays the main run's),
# attempt 2 the adapted layers. A third run drops the visual LayerNorm: an ablation of the projection, not a LoRA
# setting. Each row's adapter captions the **whole** validation split with the final decoding, then CIDEr and
# CLIPScore, the way notebook 03 scores the main run.
#
# The three runs train the first `attempt_epochs` epochs of the main schedule. When that is all of it, every row
# scores its run's best epoch. When it is fewer (the demo trains them for 1 of its 6 epochs, to stay within a few
# minutes on a CPU), the runs stop early on the same learning-rate curve, and the row "main, epoch K" scores the main
# run's own adapter after that same epoch: compare the attempts with that row, not with the finished run.

# %%
final = CaptionerGeneration(num_beams=P.num_beams, max_new_tokens=P.max_new_tokens,
                            length_penalty=P.length_penalty, no_repeat_ngram_size=P.no_repeat_ngram_size)
val_features = extract_features(encoder_model, transform, val_records, cfg.encoder, device=device)
# the card's memory goes to the beam search: the training step's compiled CUDA graphs are let go and the trained
# model (its adapter is on disk) leaves it; the encoder (1.2 GB, for the samples below) stays: in the host's RAM it
# would push the notebook's peak towards a 16 GB machine's, on a 12 GB card the scores leave room for it
torch.compiler.reset(), model.cpu(), torch.cuda.empty_cache()


def score(adapter: Path):  # the whole val split, decoded as notebook 03 decodes
    return score_split(load_adapter(adapter, with_encoder=False)[0], encoder_model, transform, val_records, final,
                       clip, root / "p2_data/images/val", P.score_batch_size, features=val_features)


rows = [attempt_row("main", "-", cfg, n_trainable, len(result.history), score(result.best_path))]
at = (attempt_cfg.stop_after or None) if attempt_cfg else None  # the epoch where the attempts stop (None: the end)
if at:
    rows.append(attempt_row(f"main, epoch {at}", "-", cfg, n_trainable, at,
                            score(row_adapter(result, at, out / "p2/main"))))

# %%
runs = attempt_configs(cfg, P.attempt_lora_r, LoraConfig.parse_targets(P.attempt_lora_targets)) if attempt_cfg else {}
for name, (changed, a_cfg) in runs.items():
    a_model, _, _ = build(a_cfg, with_encoder=False, encoder_dim=encoder_model.num_features, seed=P.seed)
    folder = out / f"p2/{name.replace(' ', '')}"
    print(f"{name}: {changed}, epochs 1-{at or P.num_epochs} of the schedule -> {relative(folder)}")
    a_result = train(a_model, encoder_model, transform, train_records, val_records, attempt_cfg, folder, gen,
                     clip=clip, overwrite=P.overwrite)
    a_model.cpu(), torch.cuda.empty_cache()
    rows.append(attempt_row(name, changed, a_cfg, checked_trainable_count(a_model), len(a_result.history),
                            score(row_adapter(a_result, at, folder))))
display(Markdown(viz.markdown_table(rows)))
print(f"val CIDEr and CLIPScore: all {len(val_records)} val images, "
      f"{'greedy' if final.num_beams == 1 else f'beam {final.num_beams}'}; "
      + ("each run's best epoch" if at is None else f"main: its best epoch, the other rows: after epoch {at}"))

# %% [markdown]
# Which knob costs more CIDEr: a quarter of the rank, or fewer adapted layers (against the main run at the same
# epoch)? Does the trainable-parameter count predict it? Is the difference larger than the epoch-to-epoch noise you
# see in the training curves?
#
# ## Sample captions next to the references

# %%
best, _, _ = load_adapter(result.best_path, with_encoder=False)
shown = val_records[:8]
captions = best.generate(extract_features(encoder_model, transform, shown, cfg.encoder, device=device).float().cpu(),
                         gen).captions  # the encoder where it is (on a GPU: not moved into RAM), the captioner here
fig = viz.image_grid(shown, captions=[f"{c}\n(ref: {r.references[0]})" for c, r in zip(captions, shown)])
fig.savefig(out / "figures/02_samples.png", dpi=110)
plt.show()

# %% [markdown]
# ## Open the box: one LoRA layer, by hand
#
# Each adapted linear of the decoder is a loralib layer: the frozen weight `W` (out x in) and bias `b`, and the two
# trained matrices `A` (r x in) and `B` (out x r). Its forward is `W x + b + (alpha / r) B A x`. Below, one layer of
# the best adapter computed with plain matrix products, against the layer's own output; then the number of trainable
# parameters from the shapes alone, against the count above.

# %%
import loralib

plain = [m for m in best.decoder.modules() if type(m) is loralib.Linear]  # c_attn is a MergedLinear (q and v)
if plain:
    lin = plain[0]
    lin.eval()  # no dropout (loralib's train() returns None, not the layer)
    x = torch.randn(4, lin.in_features)
    with torch.no_grad():
        by_hand = x @ lin.weight.T + lin.bias + (lin.lora_alpha / lin.r) * (x @ lin.lora_A.T @ lin.lora_B.T)
        assert torch.allclose(by_hand, lin(x), atol=1e-5)
    print(f"W {tuple(lin.weight.shape)}, A {tuple(lin.lora_A.shape)}, B {tuple(lin.lora_B.shape)}, "
          f"alpha / r = {lin.lora_alpha / lin.r:g}: by hand equals loralib's output")

# %%
C, r, n_layer = best.decoder.cfg.n_embd, cfg.lora.r, best.decoder.cfg.n_layer
per_block = {"c_attn": 2 * r * C + 2 * C * r,  # A (2r x C), B (2C x r): only q and v of the fused q, k, v
             "attn.c_proj": r * C + C * r, "c_fc": r * C + 4 * C * r, "mlp.c_proj": r * 4 * C + C * r}
lora = n_layer * sum(per_block[t] for t in cfg.lora.targets if t in per_block)
lora += r * C + V * r if "lm_head" in cfg.lora.targets else 0
assert lora == sum(p.numel() for name, p in best.named_parameters() if "lora_" in name)
parts = ", ".join(f"{per_block[t]:,} ({t})" for t in cfg.lora.targets if t in per_block)
display(Markdown(f"LoRA: {n_layer} blocks x [{parts}] = **{lora:,}**; the projection and its LayerNorm: "
                 f"{n_trainable - lora:,}; in all {n_trainable:,} trainable parameters, {n_trainable / 1e7:.1%} of "
                 "the course's 10 M limit."))

# %%
save_metrics(out, "captioner_training", {
    "trainable_params": n_trainable, "best_epoch": result.best_epoch, "adapter": relative(result.best_path),
    "history": result.history, "seconds": round(result.seconds, 1), "attempts": attempt_metrics(rows),
    "config": {"encoder": P.encoder, "pool": P.pool, "visual_norm": P.visual_norm, "lora_r": P.lora_r,
               "lora_alpha": P.lora_alpha, "lora_dropout": cfg.lora.dropout, "lora_targets": P.lora_targets,
               "num_epochs": P.num_epochs, "batch_size": P.batch_size, "lr": P.lr,
               "captions_per_image": P.captions_per_image, "train_images": len(train_records),
               "visual_tokens": int(sample.shape[1]), "projection": cfg.projection},
    "optimizer": "AdamW, linear warm-up then cosine decay, gradient clipping", "decoding": asdict(final)})

# %% [markdown]
# ## Try it yourself
#
# **Change and watch** (no check: these are questions for your report; a notebook run again with `-p NAME VALUE`,
# or its parameters cell edited in JupyterLab). Then three exercises that **check themselves**: write the code, run
# its cell, and it says `correct` or what is wrong; a hint and the solution are folded under each.
#
# 1. Set `attempt_lora_r = 64` and run the notebook again: four times the main run's rank, with the same scale.
#    Compare the trainable-parameter count and the attempts table with this run. Does a larger rank buy CIDEr?
# 2. Set `visual_norm = False` for the main run and look at the token-norm histogram and the first epochs of the
#    training curves. What happens to the loss in the first epoch?
# 3. Set `pool = 1` (all 144 patch tokens instead of 36): each step is slower. Is the caption better for it? Check
#    in notebook 03 (caption accuracy) and notebook 04 (pointing accuracy).
# 4. Set `lora_targets = "c_attn,c_fc,lm_head"`: does the count stay under the assignment's 10 M? Then try
#    `lora_r = 256`: what does the check say?

# %% [markdown]
# **Write it yourself: merge the update into the weight.** At inference a LoRA layer need not run its two small
# matmuls: the update can be added to the frozen weight once, `W' = W + (alpha / r) B A`, and the layer becomes a
# plain linear layer again (loralib does this in `eval()` when `merge_weights=True`). Write `merge_lora(W, A, B,
# alpha, r)`, which returns `W'`; the check compares it with loralib's own merge.
#
# <details><summary>Hint</summary>
#
# `B @ A` has the shape of `W` (out x in). The box above computed `x @ A.T @ B.T`, which is `x @ (B @ A).T`.
#
# </details>
# <details><summary>Solution</summary>
#
# ```python
# def merge_lora(W, A, B, alpha, r):
#     return W + (alpha / r) * (B @ A)
# ```
#
# </details>

# %%
from hw3lib.exercises import check


def merge_lora(W, A, B, alpha, r):
    raise NotImplementedError  # your code: the frozen weight plus the scaled low-rank update, as one matrix


check("merge_lora", merge_lora)

# %% [markdown]
# **Work it out: attempt 1's parameter count.** Before you look at the attempts table, compute how many
# parameters attempt 1 trains (rank `attempt_lora_r`, the main run's targets), from the shapes in the box above: each
# target's `A` and `B` at the new rank, in every block, plus the projection and its LayerNorm, which do not change.
#
# <details><summary>Hint</summary>
#
# At rank r, a block adds `4 r C` for `c_attn` (q and v), `2 r C` for `attn.c_proj`, `5 r C` for `c_fc` and
# `mlp.c_proj`. The box computed `lora` and `n_trainable` for the main run.
#
# </details>
# <details><summary>Solution</summary>
#
# ```python
# r1 = P.attempt_lora_r
# per_block = {"c_attn": 4, "attn.c_proj": 2, "c_fc": 5, "mlp.c_proj": 5}
# my_count = n_layer * sum(per_block[t] * r1 * C for t in cfg.lora.targets) + (n_trainable - lora)
# ```
#
# </details>

# %%
my_count = 0  # your number


check("attempt_parameters", my_count, rows=rows)

# %% [markdown]
# **Write it yourself: the learning-rate schedule.** The training above warms the learning rate up linearly,
# then lets it fall along a cosine to 0. Write `warmup_cosine(step, total, warmup)`, the factor that multiplies the
# peak rate at optimiser step `step` (0-based) of `total`: `(step + 1) / warmup` during the warm-up, then
# `0.5 * (1 + cos(pi * progress))`, with `progress` running from 0 after the warm-up to 1 at `total`.
#
# <details><summary>Hint</summary>
#
# `progress = min(1, (step - warmup) / max(1, total - warmup))`; guard `warmup = 0` with `max(1, warmup)`.
#
# </details>
# <details><summary>Solution</summary>
#
# ```python
# import math
#
#
# def warmup_cosine(step, total, warmup):
#     if step < warmup:
#         return (step + 1) / max(1, warmup)
#     return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
# ```
#
# </details>

# %%
def warmup_cosine(step, total, warmup):
    raise NotImplementedError  # your code: the factor at this step


check("warmup_cosine", warmup_cosine)
