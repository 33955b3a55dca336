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
data_root = "data/demo/hw3_data"  # hw3_data root: p2_data/ holds train/val, decoder_model.bin, encoder.json, vocab.bpe
encoder = "data/demo/models/vit"  # timm model name (e.g. vit_large_patch14_clip_224.openai_ft_in12k_in1k) or folder
encoder_checkpoint = ""  # local weights file for `encoder` ("": timm cache / hub / the folder)
pool = 2  # average-pool the patch grid (demo: 12 x 12 -> 6 x 6, 4x fewer visual tokens on the CPU); 1: all
use_cls = True  # keep the CLS token in the prefix
projection = "mlp"  # "linear" or "mlp"
visual_norm = True  # LayerNorm the visual tokens to the text embeddings' scale
lora_r = 16  # LoRA rank
lora_alpha = 32  # LoRA scaling alpha (scale: alpha / r)
lora_dropout = 0.0  # dropout on the LoRA branch
lora_targets = "c_attn,c_fc"  # comma-separated: c_attn, attn.c_proj, c_fc, mlp.c_proj, lm_head
num_epochs = 5  # passes over the training captions
batch_size = 64  # captions per step (whole images: each image's visual prefix is computed once per step)
lr = 0.003  # peak learning rate (warm-up, then cosine)
captions_per_image = 0  # references per image per epoch (0: all five)
max_train_images = 0  # use only the first N training images (0: all; small values for quick checks)
eval_images = 100  # val images captioned (greedy) after each epoch for the curves
max_new_tokens = 30  # caption length limit (tokens)
variant_lora_r = 4  # a second LoRA variant for the report's table: rank ...
variant_lora_targets = "c_attn"  # ... and targets
variant_epochs = 2  # epochs for each variant (the main run above is variant 1)
clip_model = "data/demo/models/clip"  # CLIP for validation CLIPScore: open_clip name or folder
clip_pretrained = ""  # open_clip tag ("openai") or file; "" for a folder
max_trainable = 10_000_000  # the assignment's limit
output_dir = "outputs/demo"  # set by `hw3 run`
seed = 0  # initialisation, data order

# %%
from dataclasses import replace
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from IPython.display import Markdown, display

from hw3lib import viz
from hw3lib.captioner import CaptionerConfig, EncoderConfig, GenerationConfig, build, count_check, paths_for
from hw3lib.data import load_split
from hw3lib.decoder import LoraConfig
from hw3lib.metrics import ClipConfig, ClipScorer
from hw3lib.params import typed
from hw3lib.report import save_metrics
from hw3lib.train import TrainConfig, extract_features, train

P = typed(dict(data_root=str, encoder=str, encoder_checkpoint=str, pool=int, use_cls=bool, projection=str,
               visual_norm=bool, lora_r=int, lora_alpha=int, lora_dropout=float, lora_targets=str, num_epochs=int,
               batch_size=int, lr=float, captions_per_image=int, max_train_images=int, eval_images=int,
               max_new_tokens=int,
               variant_lora_r=int, variant_lora_targets=str, variant_epochs=int, clip_model=str, clip_pretrained=str,
               max_trainable=int, output_dir=str, seed=int), globals())
root, out = Path(P.data_root), Path(P.output_dir)
(out / "figures").mkdir(parents=True, exist_ok=True)
targets = lambda s: tuple(t.strip() for t in s.split(",") if t.strip())  # noqa: E731
cfg = CaptionerConfig(
    encoder=EncoderConfig(name=P.encoder, checkpoint=P.encoder_checkpoint, use_cls=P.use_cls, pool=P.pool),
    lora=LoraConfig(r=P.lora_r, alpha=P.lora_alpha, dropout=P.lora_dropout, targets=targets(P.lora_targets)),
    projection=P.projection, visual_norm=P.visual_norm, **paths_for(root))
train_cfg = TrainConfig(num_epochs=P.num_epochs, batch_size=P.batch_size, lr=P.lr,
                        captions_per_image=P.captions_per_image, eval_images=P.eval_images, seed=P.seed)
gen = GenerationConfig(num_beams=1, max_new_tokens=P.max_new_tokens)  # greedy for the per-epoch curves
torch.manual_seed(P.seed)

# %% [markdown]
# ## The model and what trains
#
# LoRA layers are built inside the decoder *before* the course checkpoint is loaded into it (doing it the other way
# round leaves a randomly initialised base). The count below is what the assignment limits.

# %%
model, encoder_model, transform = build(cfg, seed=P.seed)
n_trainable = count_check(model, P.max_trainable)
groups = {}
for name, p in model.named_parameters():
    if p.requires_grad:
        key = "projection" if name.startswith(("proj.", "visual_norm.")) else "LoRA " + name.split(".")[-3]
        groups[key] = groups.get(key, 0) + p.numel()
frozen = (sum(p.numel() for p in model.parameters() if not p.requires_grad)
          + sum(p.numel() for p in encoder_model.parameters()))
display(Markdown(viz.markdown_table([{"group": k, "parameters": v} for k, v in groups.items()]
                                    + [{"group": "**trainable**", "parameters": n_trainable},
                                       {"group": "frozen (ViT + GPT-2)", "parameters": frozen}])))

# %% [markdown]
# ## Data, and the encoder's features, once
#
# The encoder is frozen, so its output for an image never changes: it runs **once per image** and the features are
# cached, instead of once per caption per epoch.

# %%
train_records = load_split(root / "p2_data/train.json", root / "p2_data/images/train")
if P.max_train_images:
    train_records = train_records[: P.max_train_images]
val_records = load_split(root / "p2_data/val.json", root / "p2_data/images/val")
sample = extract_features(encoder_model, transform, val_records[:8], cfg.encoder).float()
ids, tgt = model.batch_captions([r.references[0] for r in val_records[:8]])
with torch.no_grad():
    first = model(sample, ids, tgt)
print(f"{len(train_records)} train / {len(val_records)} val images")
print(f"features {tuple(sample.shape)} (batch, visual tokens, width); input_ids {tuple(ids.shape)}; "
      f"logits {tuple(first.logits.shape)}")
print(f"loss before training: {first.loss.item():.3f}  (the decoder alone, blind to the image)")

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
fig = viz.token_norms({"text embeddings (wte)": text.norm(dim=-1).numpy(),
                       "visual tokens, projected": raw.norm(dim=-1).numpy(),
                       "visual tokens, + LayerNorm": normed.norm(dim=-1).numpy()},
                      title="per-token norms at initialisation")
fig.savefig(out / "figures/02_token_norms.png", dpi=110)
plt.show()

# %% [markdown]
# ## Training
#
# AdamW on the trainable parameters, linear warm-up then cosine decay, gradient clipping, bf16 autocast on a GPU.
# Every epoch ends with validation captions, CIDEr and CLIPScore, an atomic checkpoint (`last.pt`, so a killed run
# resumes where it stopped) and the best adapter so far (`best.safetensors` + `best.json`: trained weights only).
# Re-running the notebook with the same configuration and data picks up the finished run instead of training again;
# any change of configuration starts over.

# %%
clip = ClipScorer(ClipConfig(model=P.clip_model, pretrained=P.clip_pretrained or None)) if P.clip_model else None
run_dir = out / "p2" / "main"
result = train(model, encoder_model, transform, train_records, val_records, train_cfg, run_dir, gen, clip=clip,
               overwrite=True)
fig = viz.training_curves(result.history, title=f"LoRA r={P.lora_r} on {P.lora_targets}")
fig.savefig(out / "figures/02_training_curves.png", dpi=110)
plt.show()

# %% [markdown]
# ## LoRA variants
#
# The report asks for at least two LoRA settings. The main run above is the first; the second changes the rank and
# the adapted layers. A third drops the visual LayerNorm, to measure the scale pitfall above instead of asserting
# it. To keep the workbook fast the variants train for fewer epochs, so the table compares every row after the same
# number of epochs (`val CIDEr @ N`), next to the main run's final score.

# %%
variants = [dict(name="main", lora=cfg.lora, visual_norm=cfg.visual_norm, epochs=P.num_epochs, result=result)]
for name, lora, norm in [(f"r={P.variant_lora_r} on {P.variant_lora_targets}",
                          replace(cfg.lora, r=P.variant_lora_r, alpha=2 * P.variant_lora_r,
                                  targets=targets(P.variant_lora_targets)), cfg.visual_norm),
                         ("main, no visual LayerNorm", cfg.lora, False)]:
    v_model, _, _ = build(replace(cfg, lora=lora, visual_norm=norm), with_encoder=False,
                          encoder_dim=encoder_model.num_features, seed=P.seed)
    count_check(v_model, P.max_trainable)
    v_result = train(v_model, encoder_model, transform, train_records, val_records,
                     replace(train_cfg, num_epochs=P.variant_epochs), out / "p2" / f"variant{len(variants)}", gen,
                     clip=clip, overwrite=True)
    variants.append(dict(name=name, lora=lora, visual_norm=norm, epochs=P.variant_epochs, result=v_result,
                         params=v_model.trainable_parameters()))
variants[0]["params"] = n_trainable
at = min(P.variant_epochs, P.num_epochs)
rows = [{"variant": v["name"], "LoRA r": v["lora"].r, "targets": ", ".join(v["lora"].targets),
         "visual norm": v["visual_norm"], "trainable params": v["params"],
         f"val CIDEr @ {at}": v["result"].history[at - 1]["val_cider"],
         f"val CLIPScore @ {at}": v["result"].history[at - 1].get("val_clipscore", float("nan")),
         "epochs": v["epochs"], "val CIDEr (last)": v["result"].history[-1]["val_cider"]} for v in variants]
display(Markdown(viz.markdown_table(rows)))

# %% [markdown]
# ## Sample captions next to the references

# %%
from hw3lib.captioner import load_adapter

best, _, _ = load_adapter(result.best_path, with_encoder=False)
shown = val_records[:8]
feats = extract_features(encoder_model, transform, shown, cfg.encoder).float()
captions = best.generate(feats, gen).captions
fig = viz.image_grid(shown, captions=[f"{c}\n(ref: {r.references[0]})" for c, r in zip(captions, shown)])
fig.savefig(out / "figures/02_samples.png", dpi=110)
plt.show()

# %%
variant_rows = [{k.replace(" @ ", "_at_").replace(" ", "_").replace("(", "").replace(")", "").lower(): v
                 for k, v in r.items()} for r in rows]
save_metrics(out, "captioner_training", {"trainable_params": n_trainable, "best_epoch": result.best_epoch,
                                         "adapter": str(result.best_path), "history": result.history,
                                         "seconds": round(result.seconds, 1), "variants": variant_rows})
