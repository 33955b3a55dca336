# %% [markdown]
# # 01 · Zero-shot captioning with LLaVA-1.5 (P1)
#
# **LLaVA** (*Visual Instruction Tuning*, Liu et al. 2023; v1.5: *Improved Baselines with Visual Instruction
# Tuning*) turns a chat language model into an image chat model with three parts:
#
# | part | LLaVA-1.5-7B | role |
# |---|---|---|
# | vision encoder | CLIP ViT-L/14 at 336 px (OpenAI), **frozen** | 24 × 24 = 576 patch features, taken from the *second-to-last* layer, CLS dropped |
# | projector | 2-layer MLP with GELU (v1.0: one linear layer) | maps each 1024-d patch feature to a 4096-d *visual token* |
# | language model | Vicuna-7B (a LLaMA fine-tuned on ShareGPT chats) | reads `USER: <image>\n{instruction} ASSISTANT:` with the 576 visual tokens in place of `<image>`, writes the answer |
#
# It is trained in **two stages**:
# 1. **Feature alignment** — only the projector learns, on 558 K image–caption pairs (LAION/CC/SBU), with a brief
#    "describe the image" instruction: the visual tokens learn to live in the language model's embedding space.
# 2. **Visual instruction tuning** — projector **and** language model learn on instruction-following data: 158 K
#    conversations, detailed descriptions and reasoning questions that a *text-only* GPT-4 wrote from each COCO
#    image's captions and object boxes (**GPT-assisted instruction data**), plus academic VQA sets in v1.5 (665 K).
#
# Zero-shot captioning is therefore a matter of *asking well*: the instruction selects which of the learned answer
# styles comes out, and the generation config (greedy, beam search, sampling, length limits) shapes it. This notebook
# sweeps both on the P1 validation images and scores every setting with CIDEr and CLIPScore.
#
# On the **demo profile** the model is a stand-in built the same way (`hw3lib/demo/llava_standin.py`): the demo's
# ViT (`data/demo/models/vit`, the encoder of notebook 02) converted into a transformers `CLIPVisionModel`, a small
# Llama pre-trained on the world's text,
# then stage 1 (projector only, captions) and stage 2 (projector + LM, five instruction styles: one-sentence caption,
# short phrase, detailed description, a colours question, a count question). It loads with the same
# `LlavaForConditionalGeneration.from_pretrained` / `AutoProcessor.from_pretrained` calls as the real model.

# %% tags=["parameters"]
data_root: str = "data/demo/hw3_data"  # hw3_data root (p1_data/ inside)
llava_model: str = "data/demo/models/llava"  # local folder or hub id (configs/hw3.yaml names the real one)
llava_instructions: dict = {"one sentence": "Describe this image in one sentence.", "short caption": "Write a short caption for this image.", "few words": "Describe the image in a few words.", "detailed": "Describe the image in detail.", "question": "What is in this picture?"}  # name -> instruction
llava_generations: dict = {"greedy": {"max_new_tokens": 60}, "beam 3": {"num_beams": 3, "max_new_tokens": 60}}  # name -> LlavaGeneration fields
llava_first_sentence: bool = False  # keep only the first sentence of each answer
llava_num_images: int = 0  # caption only the first N p1 images (0: all)
llava_sweep_images: int = 0  # compare the settings on the first N of them (0: all); the best then captions all
llava_batch_size: int = 16  # images per generate() call
llava_greedy_batch_size: int = 0  # images per call of the settings without beam search (0: llava_batch_size)
llava_num_workers: int = 2  # DataLoader workers decoding images
llava_load_in_4bit: bool = False  # 4-bit language model (needs bitsandbytes and a GPU)
llava_fast_kernels: bool = False  # Liger's fused kernels in the prefill (pip install liger-kernel; GPU)
llava_cache: str = ""  # KV cache of the generations that name none ("": LlavaGeneration's default, dynamic)
llava_gpus: int = 1  # >1: the sweep captions under torchrun, one process per GPU (this many)
clip_model: str = "data/demo/models/clip"  # open_clip name (ViT-B-32-quickgelu) or a local folder
clip_pretrained: str = ""  # "openai" for the real CLIP; "" for a folder
llava_num_show: int = 4  # images whose captions are shown for every setting
output_dir: str = "outputs/demo"  # set by `hw3 run`

# %%
import gc
import json
import shutil
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from IPython.display import Markdown, display

from hw3lib import viz
from hw3lib.data import hw3_split, load_image
from hw3lib.demo.world import world_scores
from hw3lib.llava import (LlavaGeneration, LlavaLoad, best_on_all, best_setting, build_prompt, image_token_span,
                          sweep, sweep_findings, sweep_summary)
from hw3lib.outputs import clip_scorer, start
from hw3lib.report import save_metrics

# %%
P, run = start(globals())  # the parameters, and the run's folders (hw3lib/outputs.py)
root, out = run.data_root, run.output_dir
generations = {name: LlavaGeneration.from_dict({"cache": P.llava_cache, **g} if P.llava_cache else g)
               for name, g in P.llava_generations.items()}
records = hw3_split(root, "p1_data")
records = records[: P.llava_num_images] if P.llava_num_images else records
references = {r.file_id: list(r.references) for r in records}
compared = records[: P.llava_sweep_images] if P.llava_sweep_images else records  # the images the settings compete on
print(f"{len(compared)} p1 val images, {len(P.llava_instructions)} instructions x {len(generations)} generation "
      f"configs = {len(P.llava_instructions) * len(generations)} settings"
      + (f"; the best then captions all {len(records)}" if len(compared) < len(records) else ""))

# %% [markdown]
# ## The model

# %%
load = LlavaLoad(P.llava_model, load_in_4bit=P.llava_load_in_4bit, fast_kernels=P.llava_fast_kernels)
model, processor = load.load()
cfg = model.config
parts = {"vision tower": model.model.vision_tower, "projector": model.model.multi_modal_projector,
         "language model": model.model.language_model, "lm head": model.lm_head}
display(Markdown(viz.markdown_table([{"part": k, "parameters": sum(p.numel() for p in m.parameters())}
                                     for k, m in parts.items()])))
fig = viz.llava_data_flow(cfg, next(iter(P.llava_instructions.values())))
fig.savefig(out / "figures/01_llava_data_flow.png", dpi=110)
plt.show()

# %% [markdown]
# ## The prompt, and where the image sits in it
#
# The processor's chat template writes the conversation; the processor then expands the single `<image>`
# placeholder into one token per visual token. Where those tokens are is read from `input_ids` (the image token id),
# never assumed: it moves with the instruction, the padding of a batch and the processor version.

# %%
prompt = build_prompt(processor, next(iter(P.llava_instructions.values())))
enc = processor(images=[load_image(records[0].image_path)], text=[prompt], return_tensors="pt")
start, stop = image_token_span(enc["input_ids"][0], cfg.image_token_id)
ids = enc["input_ids"][0].tolist()
tok = processor.tokenizer
print(repr(prompt))
print(f"{len(ids)} tokens; image tokens at [{start}, {stop}) = {stop - start} positions; "
      f"pixel_values {tuple(enc['pixel_values'].shape)}")
print("before:", tok.convert_ids_to_tokens(ids[:start]))
print("after: ", tok.convert_ids_to_tokens(ids[stop:]))

# %% [markdown]
# ## Open the box: one generated word's attention over the image
#
# Two pitfalls first. **Batches are padded on the left**: a decoder-only model continues the last position of each
# row, so a right-padded short prompt would continue from padding (the processor is set to left padding, and
# `hw3 llava-caption` batches with it). **Attention weights need the eager implementation**: the fused kernels
# (`sdpa`, flash attention) never form the attention matrix and return none.
#
# Below, LLaVA answers the prompt above; then one forward pass over prompt + answer with eager attention gives, per
# layer, a `(heads, positions, positions)` matrix. The row of the position that predicted the answer's second token,
# cut to the image positions found above and laid out on the vision tower's grid, is that token's map in notebook 04.

# %%
from hw3lib.llava import attention_maps

att = attention_maps(model, processor, load_image(records[0].image_path), next(iter(P.llava_instructions.values())),
                     LlavaGeneration(max_new_tokens=6))
full = torch.cat([enc["input_ids"], torch.tensor([att.token_ids])], dim=1).to(model.device)  # prompt + answer
before = {k: getattr(cfg, k)._attn_implementation for k in ("text_config", "vision_config")}
t, layer = min(1, len(att.token_ids) - 1), cfg.text_config.num_hidden_layers - 1
model.set_attn_implementation("eager")
try:
    with torch.no_grad():  # every layer's (1, heads, positions, positions) matrix; the last layer's is kept
        last = model(input_ids=full, pixel_values=enc["pixel_values"].to(model.device, model.dtype),
                     attention_mask=torch.ones_like(full), output_attentions=True, logits_to_keep=1).attentions[layer]
finally:
    model.set_attn_implementation(before)
side = cfg.vision_config.image_size // cfg.vision_config.patch_size  # the vision tower's grid: side x side
row = last[0, :, len(ids) - 1 + t, start:stop]  # (heads, image positions): the query predicting t
by_hand = row[:, -side * side:].float().reshape(-1, side, side)  # a leading CLS position, if kept, left out
assert torch.allclose(by_hand.cpu(), torch.as_tensor(att.maps[t, layer]), atol=1e-3)
print(f"token {t} of the answer {tok.convert_ids_to_tokens(att.token_ids)}: its map in the last layer, "
      f"{tuple(by_hand.shape)} (heads x grid), equals hw3lib's")

# %% [markdown]
# ## The sweep: instructions × generation configs
#
# Every setting captions the same images in batches (left padding; `hw3 llava-caption` is the same code) and is
# scored with CIDEr and CLIPScore; on the demo profile also with **caption accuracy** (the caption names exactly the
# scene's (colour, shape) objects). Finished settings are reused when the notebook runs again with the same values.

# %%
scorer = clip_scorer(P.clip_model, P.clip_pretrained)
extra = world_scores(root / "p1_data")  # caption accuracy on the shapes world; nothing on the course's data
if P.llava_gpus > 1:  # a process per GPU loads the model: this process's copy would crowd GPU 0
    model = parts = None
    gc.collect()
    torch.cuda.empty_cache()
how = dict(scorer=scorer, extra_scores=extra, batch_size=P.llava_batch_size, num_workers=P.llava_num_workers,
           first_sentence=P.llava_first_sentence, load=load, gpus=P.llava_gpus,
           greedy_batch_size=P.llava_greedy_batch_size)
rows = sweep(model, processor, compared, P.llava_instructions, generations, out / "p1", references, **how)
columns = ["instruction_name", "generation", "cider", "clipscore", "mean_length", *extra, "seconds"]
display(Markdown(viz.markdown_table([{k: r[k] for k in columns} for r in rows])))

# %%
fig = viz.sweep_plot(rows)
fig.savefig(out / "figures/01_sweep.png", dpi=110)
plt.show()

# %% [markdown]
# ## What each setting writes

# %%
predictions = {r["name"]: json.loads(Path(r["predictions"]).read_text()) for r in rows}
shown = compared[: P.llava_num_show]
fig = viz.image_grid(shown, captions=[" / ".join(r.references[:1]) for r in shown])
plt.show()
for rec in shown:
    table = [{"setting": name, "caption": pred[rec.file_id]} for name, pred in predictions.items()]
    display(Markdown(f"**{rec.file_id}** — a reference: *{rec.references[0]}*\n\n" + viz.markdown_table(table)))

# %% [markdown]
# ## The best setting
#
# Chosen by CIDEr (the course's primary metric); its predictions become `p1_predictions.json`, the file the course's
# `hw3_1.sh` must produce, and its settings are recorded for the attention notebook. With `llava_sweep_images` the
# settings compete on the first N images only (the 12 and 24 GB configs: ten settings on all 500 images take long on
# such a card), and the winner then captions the other images too (its captions of the first N, made under the same
# settings, are kept): its scores on all of them are the ones recorded.

# %%
best = best_setting(rows)
if len(compared) < len(records):  # compared on fewer images: the best now captions the others too (keeping its own)
    best = best_on_all(best, model, processor, records, P.llava_instructions, generations, out / "p1-best",
                       references, **how)
summary = {**sweep_summary(rows, P.llava_model, len(compared), best, len(records)),
           "first_sentence": P.llava_first_sentence}
shutil.copyfile(best["predictions"], out / "p1_predictions.json")
save_metrics(out, "llava", summary)
display(Markdown(sweep_findings(rows)))

# %% [markdown]
# **Reading the table.** CIDEr rewards the n-grams that the references use, weighted by how rare they are, and its
# Gaussian length penalty punishes captions much longer or shorter than the references. CLIPScore ignores the
# references: it asks the CLIP model whether the text matches the image. Questions to answer from the table:
#
# - Does the setting with the highest CIDEr also have the highest CLIPScore? If not, which metric agrees with
#   the caption accuracy column (demo), and why would it?
# - How does CIDEr change with the mean length? Compare the detailed instruction with the one-sentence one.
# - Does beam search help or hurt, and for which instructions?
#
# ## Try it yourself
#
# **Change and watch** (no check: these are questions for your report; a notebook run again with `-p NAME VALUE`,
# or its parameters cell edited in JupyterLab). Then three exercises that **check themselves**: write the code, run
# its cell, and it says `correct` or what is wrong; a hint and the solution are folded under each.
#
# 1. Ask LLaVA for a detailed description only: `hw3 run --only 01_llava_prompts -p llava_instructions
#    '{"detailed": "Describe the image in detail."}'`. Watch CIDEr against CLIPScore: which one notices that the
#    caption is long?
# 2. Set `llava_first_sentence = True` and run the sweep again. Which rows move most, and does the best setting
#    change?
# 3. Add a sampling config to `llava_generations`, e.g. `"sample t=0.7": {"do_sample": true, "temperature": 0.7,
#    "max_new_tokens": 60}`, and compare it with greedy. Run it twice with another `seed` field: how much do the
#    scores move?
# 4. Write your own instruction (for example "Write a caption of at most ten words.") and add it to
#    `llava_instructions`. Can you beat the best row?

# %% [markdown]
# **Write it yourself: where the image sits in the prompt.** The processor expands `<image>` into one
# placeholder token per visual token (576 for LLaVA-1.5). Write `image_positions(input_ids, image_token_id)`, which
# returns `(start, stop)` of that run in a 1-D tensor of ids, so that `input_ids[start:stop]` are all image tokens.
# Attention maps slice the attention rows at exactly these positions: an offset by one shifts every map.
#
# <details><summary>Hint</summary>
#
# `(input_ids == image_token_id).nonzero()` gives the positions; the run starts at the first and stops one
# after the last.
#
# </details>
# <details><summary>Solution</summary>
#
# ```python
# def image_positions(input_ids, image_token_id):
#     positions = (input_ids == image_token_id).nonzero().flatten()
#     return int(positions[0]), int(positions[-1]) + 1
# ```
#
# </details>

# %%
from hw3lib.exercises import check


def image_positions(input_ids, image_token_id):
    raise NotImplementedError  # your code: (start, stop) of the image placeholder tokens


check("image_positions", image_positions)

# %% [markdown]
# **Write it yourself: pad a batch on the left.** A decoder-only model continues each row from its *last*
# position, so the rows of a batch must end where their prompts end: the padding goes on the left, and the attention
# mask marks it with 0. Write `left_pad(sequences, pad_id)`, which takes lists of token ids of different lengths and
# returns `(input_ids, attention_mask)` as two tensors of shape (batch, longest).
#
# <details><summary>Hint</summary>
#
# Each row is `[pad_id] * (width - len(q)) + q`, with `width` the longest length; its mask row is `[0] * (width -
# len(q)) + [1] * len(q)`. `torch.tensor` turns the lists of lists into tensors.
#
# </details>
# <details><summary>Solution</summary>
#
# ```python
# import torch
#
#
# def left_pad(sequences, pad_id):
#     width = max(len(q) for q in sequences)
#     ids = [[pad_id] * (width - len(q)) + list(q) for q in sequences]
#     mask = [[0] * (width - len(q)) + [1] * len(q) for q in sequences]
#     return torch.tensor(ids), torch.tensor(mask)
# ```
#
# </details>

# %%
def left_pad(sequences, pad_id):
    raise NotImplementedError  # your code: (input_ids, attention_mask), padded on the left


check("left_pad", left_pad)

# %% [markdown]
# **Write it yourself: keep the first sentence.** `llava_first_sentence = True` cuts every answer after its
# first sentence. Write `first_sentence(text)`: collapse the whitespace, then keep everything up to the first `.`, `!`
# or `?` that is followed by a space or ends the text ("3.5 m" does not end a sentence). Which rows of the sweep
# would it change most?
#
# <details><summary>Hint</summary>
#
# `" ".join(text.split())` collapses the whitespace; then walk the characters and stop at a mark whose next
# character is a space or the end.
#
# </details>
# <details><summary>Solution</summary>
#
# ```python
# def first_sentence(text):
#     text = " ".join(text.split())
#     for i, ch in enumerate(text):
#         if ch in ".!?" and (i + 1 == len(text) or text[i + 1] == " "):
#             return text[: i + 1]
#     return text
# ```
#
# </details>

# %%
def first_sentence(text):
    raise NotImplementedError  # your code: the first sentence, whitespace collapsed


check("first_sentence", first_sentence)
