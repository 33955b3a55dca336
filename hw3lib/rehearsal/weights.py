"""Random weights at the real architectures, stored where the hw3 profile looks for them.

* ``llava-hf/llava-1.5-7b-hf``: LlavaForConditionalGeneration at llava-1.5-7b's config (CLIP ViT-L/14-336 + MLP
  projector + a 32-layer 4096-wide Llama, 7.06 B parameters), bf16 safetensors in shards, with a LlavaProcessor at
  336 px. Its tokenizer is a byte-level BPE of 32,000 tokens built from GPT-2's merges (the real one is Llama's
  SentencePiece, which cannot be fetched here), then ``<image>`` = 32000 and ``<pad>`` = 32001, as the real one;
  the model's vocabulary is 32,064 rows, as the real one.
* The timm encoder that configs/hw3.yaml names, under its ``timm/NAME`` repo, in timm's hub format.
* CLIP ViT-B/32 (``ViT-B-32-quickgelu``, tag ``openai``) under the repo that open_clip's registry names.
* ``p2_data/decoder_model.bin``: GPT-2 small (12 x 768, vocabulary 50,257) in the course's key layout, with the real
  ``encoder.json`` / ``vocab.bpe``.

Each goes into the hub cache through :mod:`.hub_cache`, so the loaders find them by name with ``HF_HUB_OFFLINE=1``.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from . import answers
from .hub_cache import write_folder, write_repo

GPT2_DIR = Path(__file__).resolve().parents[2] / "data/gpt2"
LLAVA_15_CHAT_TEMPLATE = (  # llava-hf's template for llava-1.5: "USER: <image>\n{text} ASSISTANT:"
    "{%- for message in messages -%}{%- if message['role'] == 'user' -%}USER: {% elif message['role'] == 'assistant' "
    "-%}ASSISTANT: {% endif -%}{%- if message['content'] is string -%}{{ message['content'] }} {% else -%}{%- for "
    "item in message['content'] if item['type'] == 'image' -%}<image>\n{% endfor -%}{%- for item in "
    "message['content'] if item['type'] == 'text' -%}{{ item['text'] }} {% endfor -%}{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}ASSISTANT:{%- endif -%}")


def llava_tokenizer(base_vocab: int = 32000):
    """A fast tokenizer with llava-1.5's special-token layout: <unk> 0, <s> 1, </s> 2, byte-level BPE up to
    ``base_vocab``, then <image> and <pad>. BOS is prepended, as Llama's tokenizer does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    gpt2 = json.loads((GPT2_DIR / "encoder.json").read_text())
    by_id = sorted(gpt2, key=gpt2.get)[: base_vocab - 3]  # bytes first, then merges in rank order
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{t: i + 3 for i, t in enumerate(by_id)}}
    merges = []
    for line in (GPT2_DIR / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]:
        a, b = line.split(" ")
        if a + b in vocab and a in vocab and b in vocab:
            merges.append((a, b))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})  # 32000, as llava-hf's
    fast.add_special_tokens({"pad_token": "<pad>"})  # 32001
    return fast


def llava_processor(image_size: int = 336, patch_size: int = 14):
    from transformers import CLIPImageProcessor, LlavaProcessor

    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    images = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size,
                                "width": image_size}, do_center_crop=True, image_mean=mean, image_std=std,
                                resample=3)
    return LlavaProcessor(image_processor=images, tokenizer=llava_tokenizer(), patch_size=patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=LLAVA_15_CHAT_TEMPLATE, image_token="<image>")


def llava_15_7b_config(image_token_id: int = 32000, vocab_size: int = 32064):
    """The architecture of llava-1.5-7b (CLIP ViT-L/14-336 + 2-layer GELU projector + Vicuna-7B), written out so
    random weights need no hub."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
                              layer_norm_eps=1e-5)
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=image_token_id,
                       image_seq_length=576, projector_hidden_act="gelu", vision_feature_layer=-2,
                       vision_feature_select_strategy="default", pad_token_id=32001)



def _resize_processor(processor, image_size: int, patch_size: int):
    ip = processor.image_processor
    ip.size = {"shortest_edge": image_size}
    ip.crop_size = {"height": image_size, "width": image_size}
    processor.patch_size = patch_size
    return processor


def random_llava(processor_from: str | Path, device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
                 attn_implementation: str = "sdpa"):
    """``(model, processor)``: llava-1.5-7b's architecture with random weights, driven by the processor of
    ``processor_from`` (a local LLaVA folder, e.g. the demo's stand-in) resized to 336 px / patch 14. For the GPU
    benchmarks and dry runs without the 14 GB download: the speed is the real model's, the captions are noise."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(str(processor_from))
    processor.tokenizer.padding_side = "left"
    config = llava_15_7b_config()
    if len(processor.tokenizer) > config.text_config.vocab_size:
        raise ValueError(f"the tokenizer of {processor_from} has {len(processor.tokenizer)} tokens, more than the "
                         f"model's vocabulary ({config.text_config.vocab_size})")
    config.image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    config.text_config.pad_token_id = processor.tokenizer.pad_token_id
    _resize_processor(processor, config.vision_config.image_size, config.vision_config.patch_size)
    config._attn_implementation = attn_implementation
    torch.manual_seed(0)  # the same weights in every process (several GPUs under a launcher must agree)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    return model.eval(), processor


def save_llava(repo_id: str, cache_dir: Path, device: str = "cuda", log=print) -> Path:
    """llava-1.5-7b with random bf16 weights (~14 GB) into the cache as ``repo_id``."""
    from transformers import LlavaForConditionalGeneration

    processor = llava_processor()
    tok = processor.tokenizer
    config = llava_15_7b_config(image_token_id=tok.convert_tokens_to_ids("<image>"))
    config.text_config.pad_token_id = config.pad_token_id = tok.pad_token_id
    config.text_config.bos_token_id, config.text_config.eos_token_id = tok.bos_token_id, tok.eos_token_id
    # random weights never end an answer: end them after 8-20 tokens, as one-sentence captions (answers.py)
    setattr(config, answers.MARKER, list(answers.REHEARSAL_TOKENS))
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    log(f"  LLaVA: {n / 1e9:.2f} B parameters (random, bf16), vocabulary {config.text_config.vocab_size}, "
        f"tokenizer {len(tok)}")
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        model.save_pretrained(tmp, max_shard_size="5GB")
        processor.save_pretrained(tmp)
        del model
        return write_folder(repo_id, tmp, cache_dir, move=True)


def save_timm(name: str, cache_dir: Path, log=print) -> Path:
    """The timm model ``name`` with random weights, as timm's hub repo (config.json + model.safetensors)."""
    import timm
    from safetensors.torch import save_file

    from ..hub import timm_files

    spec = timm_files(name)
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    log(f"  timm {name}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameters -> {spec.repo_id}")
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{tmp}/model.safetensors")
        Path(tmp, "config.json").write_text(json.dumps({"architecture": name.split(".")[0],
                                                        "num_classes": model.num_classes,
                                                        "pretrained_cfg": model.pretrained_cfg}, default=str))
        return write_folder(spec.repo_id, tmp, cache_dir, move=True)


def save_open_clip(name: str, pretrained: str, cache_dir: Path, log=print) -> Path:
    """An open_clip model with random weights under the repo and file name that its pretrained tag names."""
    import open_clip
    from safetensors.torch import save_file

    from ..hub import open_clip_files

    spec = open_clip_files(name, pretrained)
    filename = spec.files[0].split("|")[0]
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None)
    log(f"  CLIP {name}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameters -> "
        f"{spec.repo_id}/{filename}")
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{tmp}/{filename}")
        return write_repo(spec.repo_id, {filename: f"{tmp}/{filename}"}, cache_dir, move=True)


def save_course_decoder(p2_data: Path, log=print) -> Path:
    """GPT-2 small with GPT-2's init (normal 0.02) in the course's format, and the real tokenizer files."""
    from ..decoder import Decoder, DecoderConfig, save_checkpoint

    torch.manual_seed(0)
    decoder = Decoder(DecoderConfig())
    path = p2_data / "decoder_model.bin"
    save_checkpoint(decoder, path)
    for f in ("encoder.json", "vocab.bpe"):
        shutil.copyfile(GPT2_DIR / f, p2_data / f)
    log(f"  decoder: {sum(p.numel() for p in decoder.parameters()) / 1e6:.0f} M parameters -> {path}")
    return path
