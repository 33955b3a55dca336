"""What notebook 02's four trainings pay for torch.compile: the whole step compiled, or one decoder block shared.

    python bench/compile_time.py --scope eager|step|blocks [--device cpu|cuda] [--images 16] [--captions 64]
                                 [--tokens 22] [--steps 6] [--json OUT.json]

One process per ``--scope`` (a fresh process: a cold compile, as in a student's first run; inductor's on-disk cache
is pointed at a fresh folder). In it, the four runs of notebook 02 one after the other, as the notebook trains them:
the main run (LoRA r 16 on c_attn and c_fc), attempt 1 (r 4), attempt 2 (c_attn only) and the ablation (no visual
LayerNorm). Each builds a course-size captioner (GPT-2 12 x 768 with the vocabulary of 50,257, random weights;
the features of a ViT-L/14: 257 tokens of 1,024) and runs ``--steps`` training steps through
:func:`hw3lib.train.caption_loss` (forward and backward, padded shapes). Reported per run: the first step (which
compiles) and the median of the others. On CUDA the step runs in bf16 autocast and, compiled, as CUDA graphs
("reduce-overhead"), as ``hw3lib.train.train`` runs it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scope", required=True, choices=["eager", "step", "blocks"])
    ap.add_argument("--device", default=None)
    ap.add_argument("--images", type=int, default=16, help="images a step (their visual prefix runs once)")
    ap.add_argument("--captions", type=int, default=64, help="captions a step")
    ap.add_argument("--tokens", type=int, default=22, help="input tokens a caption (<eot> + caption)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-"))  # a cold compile

    import torch

    from hw3lib.captioner import Captioner, CaptionerConfig
    from hw3lib.decoder import Decoder, DecoderConfig, LoraConfig
    from hw3lib.train import _block_weights_in_bf16, caption_loss

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"

    class Tokenizer:  # the loss needs only the end token (the padding's id)
        eot_id = 50256

    def captioner(lora: LoraConfig, visual_norm: bool) -> Captioner:
        torch.manual_seed(0)
        decoder = Decoder(DecoderConfig(), lora)
        return Captioner(CaptionerConfig(lora=lora, visual_norm=visual_norm), 1024, decoder, Tokenizer()).to(device)

    g = torch.Generator().manual_seed(0)
    features = torch.randn(args.images, 257, 1024, generator=g).to(device)
    image_index = (torch.arange(args.captions) % args.images).to(device)
    ids = torch.randint(0, 50256, (args.captions, args.tokens), generator=g).to(device)
    runs = {"main": (LoraConfig(r=16, alpha=32, targets=("c_attn", "c_fc")), True),
            "attempt 1 (r 4)": (LoraConfig(r=4, alpha=8, targets=("c_attn", "c_fc")), True),
            "attempt 2 (c_attn)": (LoraConfig(r=16, alpha=32, targets=("c_attn",)), True),
            "ablation (no LayerNorm)": (LoraConfig(r=16, alpha=32, targets=("c_attn", "c_fc")), False)}
    rows = []
    for name, (lora, visual_norm) in runs.items():
        model = captioner(lora, visual_norm).train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, fused=cuda)
        pad = None if args.scope == "eager" else (args.images, args.captions, args.tokens)
        step = caption_loss(model, cuda, pad, "reduce-overhead" if cuda else None,
                            "blocks" if args.scope == "blocks" else "step")
        seconds = []
        with _block_weights_in_bf16(model, cuda):
            for _ in range(args.steps):
                t0 = time.perf_counter()
                loss = step(features, image_index, ids, ids)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                value = float(loss.detach())  # waits for the device
                seconds.append(time.perf_counter() - t0)
        row = {"run": name, "first_step_s": round(seconds[0], 2), "step_s": round(statistics.median(seconds[1:]), 4),
               "loss": value}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"scope": args.scope, "device": torch.cuda.get_device_name() if cuda else "cpu",
              "cpu_count": len(os.sched_getaffinity(0)), "torch": torch.__version__, "images": args.images,
              "captions": args.captions, "tokens": args.tokens, "steps": args.steps, "runs": rows,
              "first_steps_s": round(sum(r["first_step_s"] for r in rows), 1)}
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
