"""The LLaVA stand-in: a small ``LlavaForConditionalGeneration`` trained on the shapes world, the LLaVA way.

* **Vision tower**: the demo's timm ViT (patch 8 at 96 px: a 12 x 12 grid) converted weight for weight into a
  transformers ``ViTModel``; frozen, as LLaVA-1.5 keeps its CLIP ViT-L/14-336. Not the stand-in CLIP's image tower:
  a linear probe of its patch tokens reads colour (0.96) but not shape (0.34; chance 0.25) -- contrastive training
  on 32-token captions pooled shape into the CLS token only -- and a LLaVA built on it named the right objects in
  12 % of the p1 images.
* **Language model**: a small Llama with its own byte-level BPE, first trained as a plain chat language model on
  the world's text (the role Vicuna plays).
* **Stage 1** (feature alignment): only the projector learns, on image -> brief caption pairs.
* **Stage 2** (visual instruction tuning): projector + language model learn on instruction -> answer pairs in
  five styles: one-sentence caption, short phrase, detailed description, colours question, count question.

Saved with ``save_pretrained`` (model + processor with its chat template) so ``hw3lib.llava`` loads it with the
same ``from_pretrained`` calls as ``llava-hf/llava-1.5-7b-hf``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data import load_annotations, load_image, write_json_atomic
from ..train import warmup_cosine
from .world import load_objects

# The llava-1.5 conversation: "USER: <image>\n{instruction} ASSISTANT: {answer}</s>"
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}USER: {% elif message['role'] == 'assistant' -%}ASSISTANT: {% endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }} {% else -%}"
    "{%- for item in message['content'] if item['type'] == 'image' -%}<image>\n{% endfor -%}"
    "{%- for item in message['content'] if item['type'] == 'text' -%}{{ item['text'] }} {% endfor -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}ASSISTANT:{%- endif -%}"
)

# Instruction styles used in training (several wordings each). The P1 sweep also tries wordings not seen here.
INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "caption": ("Write a one-sentence caption for this image.", "Describe this image in one sentence.",
                "Give a short caption of the picture.", "Caption the image in one sentence."),
    "phrase": ("Name the shapes in a few words.", "List the objects in a short phrase.",
               "What shapes are shown? Answer with a short phrase."),
    "detailed": ("Describe the image in detail.", "Give a detailed description of this picture.",
                 "Explain everything you see in the image, in detail."),
    "colors": ("What colors are in the image?", "Which colors appear in this picture?"),
    "count": ("How many shapes are there?", "How many objects can you see in the image?"),
}
STAGE2_MIX = {"caption": 0.4, "phrase": 0.15, "detailed": 0.2, "colors": 0.125, "count": 0.125}
_NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}


def _where(box: list[int], size: int) -> str:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    row = "top" if cy < size / 3 else "bottom" if cy > 2 * size / 3 else ""
    col = "left" if cx < size / 3 else "right" if cx > 2 * size / 3 else ""
    if not row and not col:
        return "in the center"
    return f"in the {row} {col}" if row and col else f"on the {row or col}"


def _phrase(o: dict, with_size: bool = False) -> str:
    words = [o["size"], o["color"], o["shape"]] if with_size else [o["color"], o["shape"]]
    return f"{'an' if words[0][0] in 'aeiou' else 'a'} {' '.join(words)}"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def answer(style: str, objects: list[dict], captions: list[str], size: int, rng: np.random.Generator) -> str:
    """The target answer of one instruction style for a scene (``objects`` in the sidecar format)."""
    n = len(objects)
    if style == "caption":
        return str(captions[rng.integers(len(captions))])
    if style == "phrase":
        return _join([_phrase(objects[i]) for i in rng.permutation(n)])
    if style == "detailed":
        lead = f"The image shows {_NUMBERS[n]} shape{'s' if n > 1 else ''} on a plain light background."
        parts = [f"{_phrase(o, True).capitalize()} is {_where(o['box'], size)}."
                 for o in sorted(objects, key=lambda o: o["box"][0])]
        return " ".join([lead, *parts, "There is nothing else in the picture."])
    if style == "colors":
        colors = sorted({o["color"] for o in objects})
        return f"The only color is {colors[0]}." if len(colors) == 1 else f"The colors are {_join(colors)}."
    if style == "count":
        return "There is one shape." if n == 1 else f"There are {_NUMBERS[n]} shapes."
    raise ValueError(f"unknown instruction style {style!r}")


# ----------------------------------------------------------------------------------------------- vision tower
def vision_tower_from_timm(vit_dir: Path):
    """The demo's timm ViT as a transformers ``ViTModel`` (same numbers, transformers' layout), with the image
    processor that reproduces its preprocessing."""
    from safetensors.torch import load_file
    from transformers import CLIPImageProcessor, ViTConfig, ViTModel

    tcfg = json.loads((vit_dir / "config.json").read_text())
    args, pre = tcfg["model_args"], tcfg["pretrained_cfg"]
    size = args["img_size"][0] if isinstance(args["img_size"], list) else args["img_size"]
    width, depth = args["embed_dim"], args["depth"]
    config = ViTConfig(image_size=size, patch_size=args["patch_size"], hidden_size=width, num_hidden_layers=depth,
                       num_attention_heads=args["num_heads"], intermediate_size=4 * width, hidden_act="gelu",
                       layer_norm_eps=1e-6, qkv_bias=True)
    src = {k: t.float() for k, t in load_file(vit_dir / "model.safetensors").items()}
    sd = {"embeddings.cls_token": src["cls_token"], "embeddings.position_embeddings": src["pos_embed"],
          "embeddings.patch_embeddings.projection.weight": src["patch_embed.proj.weight"],
          "embeddings.patch_embeddings.projection.bias": src["patch_embed.proj.bias"],
          "layernorm.weight": src["norm.weight"], "layernorm.bias": src["norm.bias"]}
    for i in range(depth):
        a, b = f"blocks.{i}.", f"layers.{i}."
        for name, part in zip(("q_proj", "k_proj", "v_proj"), range(3)):
            sd[b + f"attention.{name}.weight"] = src[a + "attn.qkv.weight"][part * width : (part + 1) * width]
            sd[b + f"attention.{name}.bias"] = src[a + "attn.qkv.bias"][part * width : (part + 1) * width]
        sd.update({
            b + "attention.o_proj.weight": src[a + "attn.proj.weight"],
            b + "attention.o_proj.bias": src[a + "attn.proj.bias"],
            b + "layernorm_before.weight": src[a + "norm1.weight"], b + "layernorm_before.bias": src[a + "norm1.bias"],
            b + "layernorm_after.weight": src[a + "norm2.weight"], b + "layernorm_after.bias": src[a + "norm2.bias"],
            b + "mlp.fc1.weight": src[a + "mlp.fc1.weight"], b + "mlp.fc1.bias": src[a + "mlp.fc1.bias"],
            b + "mlp.fc2.weight": src[a + "mlp.fc2.weight"], b + "mlp.fc2.bias": src[a + "mlp.fc2.bias"],
        })
    model = ViTModel(config, add_pooling_layer=False)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"ViT conversion (transformers' ViTModel layout changed?): missing {missing}, "
                           f"unexpected {unexpected}")
    processor = CLIPImageProcessor(size={"shortest_edge": size}, do_center_crop=True,
                                   crop_size={"height": size, "width": size}, image_mean=pre["mean"],
                                   image_std=pre["std"], resample=3, do_convert_rgb=True)
    return model.eval(), processor


# ----------------------------------------------------------------------------------------------- tokenizer
def build_llava_tokenizer(corpus: list[str], vocab_size: int = 640):
    """A Llama-like fast tokenizer: byte-level BPE, ``<s>`` prepended, ``</s>`` ends answers, ``<image>`` special,
    left padding for batched generation."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", padding_side="left", extra_special_tokens=["<image>"],
                                   model_max_length=1024)


# ----------------------------------------------------------------------------------------------- training
def _records(world: Path, split: str = "train"):
    p2 = world / "p2_data"
    refs = load_annotations(p2 / f"{split}.json")
    objects = load_objects(p2 / f"{split}_objects.json")
    ids = list(refs)
    size = json.loads((world / "world.json").read_text())["config"]["image_size"]
    return ids, [p2 / "images" / split / f"{k}.jpg" for k in ids], [list(refs[k]) for k in ids], \
        [objects[k] for k in ids], size


def _batch(tokenizer, prompts: list[str], answers: list[str], n_image: int, image_token: str):
    """Right-padded token ids with the image placeholder expanded, and labels on the answer + ``</s>`` only."""
    seqs, labels = [], []
    for p, a in zip(prompts, answers):
        p_ids = tokenizer(p.replace(image_token, image_token * n_image))["input_ids"]
        a_ids = tokenizer(" " + a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seqs.append(p_ids + a_ids)
        labels.append([-100] * len(p_ids) + a_ids)
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
    lab = torch.full((len(seqs), width), -100)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, lb) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)], lab[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), torch.tensor(lb), 1
    return ids, lab, mask


def _loss(model, ids, labels, mask, feats, image_token_id):
    embeds = model.get_input_embeddings()(ids)
    if feats is not None:
        projected = model.model.multi_modal_projector(feats).to(embeds.dtype)
        embeds = embeds.masked_scatter((ids == image_token_id).unsqueeze(-1), projected)
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    logits = model.lm_head(hidden[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1))


def build_llava(world: Path, out: Path, vit_dir: Path | None = None, seed: int = 0, hidden: int = 192,
                layers: int = 3, lm_steps: int = 300, stage1_steps: int = 250, stage2_steps: int = 1500,
                batch_size: int = 32, vision_layer: int = -2, device: str | None = None) -> dict:
    """Train the stand-in (LM pre-training, stage 1, stage 2) and save model + processor under ``out``."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    t_start = time.time()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    vit_dir = Path(vit_dir) if vit_dir is not None else out.parent / "vit"
    vision, image_processor = vision_tower_from_timm(vit_dir)
    vcfg = vision.config
    ids, paths, captions, objects, size = _records(world)

    corpus = [c for caps in captions for c in caps] + [i for v in INSTRUCTIONS.values() for i in v]
    corpus += [answer(s, objects[i], captions[i], size, rng) for i in range(len(ids)) for s in INSTRUCTIONS]
    corpus += ["USER: ASSISTANT:"] * 50
    tokenizer = build_llava_tokenizer(corpus)
    image_token = "<image>"
    image_token_id = tokenizer.convert_tokens_to_ids(image_token)
    n_image = (vcfg.image_size // vcfg.patch_size) ** 2

    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=vcfg.patch_size,
                               vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                               num_additional_image_tokens=1)

    text_cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 16 * 16,
                           num_hidden_layers=layers, num_attention_heads=hidden // 48, num_key_value_heads=hidden // 48,
                           max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vcfg.to_dict(), text_config=text_cfg.to_dict(), image_token_index=image_token_id,
                         image_seq_length=n_image, projector_hidden_act="gelu", vision_feature_layer=vision_layer,
                         vision_feature_select_strategy="default", pad_token_id=tokenizer.pad_token_id)
    model = LlavaForConditionalGeneration(config)
    missing, unexpected = model.model.vision_tower.load_state_dict(vision.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("pooler.") for k in missing), (missing, unexpected)  # pooler: unused
    model.to(device)
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)

    # the frozen tower runs once per image: layer -2 patch features (CLS dropped), as LLaVA selects them
    feats = []
    with torch.no_grad():
        for b in range(0, len(paths), 256):
            px = image_processor([load_image(p) for p in paths[b : b + 256]],
                                 return_tensors="pt")["pixel_values"].to(device)
            hs = model.model.vision_tower(px, output_hidden_states=True).hidden_states[vision_layer][:, 1:]
            feats.append(hs.cpu())
    feats = torch.cat(feats)
    log: dict = {"seconds": {}}

    def run(stage: str, steps: int, params, lr: float, styles: dict[str, float], with_image: bool):
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, steps, steps // 10))
        names, weights = list(styles), np.array(list(styles.values()))
        t0, losses = time.time(), []
        for step in range(steps):
            idx = rng.integers(len(ids), size=batch_size)
            st = rng.choice(names, size=batch_size, p=weights / weights.sum())
            instr = [INSTRUCTIONS[s][rng.integers(len(INSTRUCTIONS[s]))] for s in st]
            prompts = [f"USER: {image_token}\n{q} ASSISTANT:" if with_image else f"USER: {q} ASSISTANT:"
                       for q in instr]
            answers = [answer(s, objects[i], captions[i], size, rng) for s, i in zip(st, idx)]
            tok_ids, labels, mask = (t.to(device) for t in
                                     _batch(tokenizer, prompts, answers, n_image if with_image else 0, image_token))
            loss = _loss(model, tok_ids, labels, mask, feats[idx].to(device) if with_image else None, image_token_id)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            if step % 50 == 0 or step == steps - 1:
                print(f"  llava {stage} step {step} loss {np.mean(losses[-50:]):.3f} ({time.time() - t0:.0f}s)",
                      flush=True)
        log[stage] = [round(float(np.mean(losses[i : i + 50])), 4) for i in range(0, steps, 50)]
        log["seconds"][stage] = round(time.time() - t0)

    lm = model.model.language_model
    lm_params = list(lm.parameters()) + list(model.lm_head.parameters())
    proj_params = list(model.model.multi_modal_projector.parameters())
    model.train()
    # 0: the language model learns the chat format and the world's language, without images ("Vicuna")
    run("lm", lm_steps, lm_params, 2e-3, STAGE2_MIX, with_image=False)
    # 1: feature alignment -- projector only, brief captions
    run("stage1", stage1_steps, proj_params, 2e-3, {"caption": 1.0}, with_image=True)
    # 2: visual instruction tuning -- projector + language model, all styles
    run("stage2", stage2_steps, proj_params + lm_params, 1e-3, STAGE2_MIX, with_image=True)
    model.eval().to("cpu")

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    info = {"vision": "the demo ViT (timm) as a transformers ViTModel", "vision_layer": vision_layer,
            "hidden": hidden, "layers": layers, "vocab": len(tokenizer), "image_tokens": n_image, "seed": seed,
            "steps": {"lm": lm_steps, "stage1": stage1_steps, "stage2": stage2_steps}, "batch_size": batch_size,
            "device": device, **log, "total_seconds": round(time.time() - t_start)}
    write_json_atomic(out / "train_log.json", info)
    return info
