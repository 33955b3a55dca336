"""The ``hw3`` command (also ``python -m hw3lib``).

  hw3 run [-f configs/demo.yaml] [--only NB ...]      the workbook: notebooks -> outputs/<profile>/
  hw3 demo-data [--rebuild]                           the shapes world; --rebuild retrains the stand-ins
  hw3 evaluate --pred P --annotation A --images DIR   the course's evaluate.py (CIDEr, CLIPScore)
  hw3 llava-caption IMAGES OUT.json [--prompt ...]    P1: zero-shot LLaVA captions (the course's hw3_1.sh)
  hw3 caption IMAGES OUT.json DECODER --adapter CKPT  P2: captions from a trained LoRA adapter (hw3_2.sh)
  hw3 download [--dry-run]                            fetch the real models into the Hugging Face cache
  hw3 rehearse --out DIR                              the hw3 profile's models (random) and COCO-like data
  hw3 lab [--port N]                                  JupyterLab on 127.0.0.1, the workbook's notebooks open
  hw3 report [-f configs/demo.yaml]                   the report to hand in: report.md + report.pdf
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import warnings
from pathlib import Path


def _at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


def _in_range(low: float, high: float, low_open: bool, high_open: bool):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
        if not ok:
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"must lie in {interval}, got {value:g}")
        return value

    parse.__name__ = "number"
    return parse


POSITIVE, COUNT = _at_least(1), _at_least(0)


def _port(text: str) -> int:
    value = POSITIVE(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is at most 65535, got {value}")
    return value


def _instruction(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("the instruction is empty: LLaVA would answer nothing in particular")
    return text


def _check_device(device: str | None, load_in_4bit: bool = False, load_in_8bit: bool = False) -> None:
    """Before any loading (25-35 s for LLaVA): a device this machine has, and bitsandbytes for 4 or 8 bits."""
    import torch

    if device is not None:
        try:
            kind = torch.device(device).type
        except RuntimeError:
            raise ValueError(f"--device {device}: not a device name (cuda, cuda:1, cpu)") from None
        if kind == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {device}: this machine has no CUDA GPU that PyTorch can use")
        if kind not in ("cuda", "cpu"):
            raise ValueError(f"--device {device}: the workbook runs on cuda or cpu")
    if load_in_4bit and load_in_8bit:
        raise ValueError("--load-in-4bit and --load-in-8bit: choose one")
    if load_in_4bit or load_in_8bit:
        from .llava.loading import quantisation_missing

        flag = "--load-in-4bit" if load_in_4bit else "--load-in-8bit"
        if missing := quantisation_missing():
            raise ValueError(f"{flag} needs {' and '.join(missing)}: pip install -e \".[gpu]\"")
        if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
            raise ValueError(f"{flag} runs on a CUDA GPU only (bitsandbytes' {flag[10]}-bit layers)")


TOP_P = _in_range(0.0, 1.0, low_open=True, high_open=False)
DROPOUT = _in_range(0.0, 1.0, low_open=False, high_open=True)
TEMPERATURE = _in_range(0.0, float("inf"), low_open=False, high_open=True)
LEARNING_RATE = _in_range(0.0, float("inf"), low_open=True, high_open=True)


def _cmd_run(args) -> int:
    from .workbook import WorkbookConfig, run

    cfg = WorkbookConfig.load(args.config)
    cfg.override(args.parameters or [])
    if args.cell_timeout is not None:
        cfg.cell_timeout = args.cell_timeout or None
    if args.gpu_cap is not None:  # the kernels inherit it (hw3lib.kernel applies it)
        from .distributed import GPU_CAP_ENV

        os.environ[GPU_CAP_ENV] = f"{args.gpu_cap:g}"
    run(cfg, only=args.only, html=not args.no_html)
    return 0


def _cmd_report(args) -> int:
    from .handin import write_report
    from .workbook import ROOT, WorkbookConfig

    if args.output_dir:
        out = Path(args.output_dir)
        if not out.is_dir():
            raise FileNotFoundError(f"--output-dir {out}: no such folder")
    else:
        out = WorkbookConfig.load(args.config).output_dir
        out = out if out.is_absolute() else ROOT / out
    write_report(out, pdf=not args.no_pdf)
    return 0


def _cmd_demo_data(args) -> int:
    import time

    from .demo import WORLD_DIR, ensure_demo_data

    t0 = time.time()
    rebuild = args.rebuild is not None and not args.rebuild
    root = ensure_demo_data(rebuild=rebuild, retrain=tuple(args.rebuild or ()),
                            world_dir=Path(args.root) if args.root else WORLD_DIR)
    print(f"demo data ready in {root} ({time.time() - t0:.0f}s)")
    return 0


def _cmd_evaluate(args) -> int:
    from .metrics import ClipConfig, evaluate

    result = evaluate(args.pred, args.annotation, args.images,
                      ClipConfig(model=args.clip_model, pretrained=args.clip_pretrained or None,
                                 batch_size=args.batch_size))
    if args.json:
        print(json.dumps({k: result[k] for k in ("cider", "clipscore", "num_images")}))
    else:
        print(f"CIDEr: {result['cider']} | CLIPScore: {result['clipscore']} | images: {result['num_images']}")
    return 0


def _gen_args(p: argparse.ArgumentParser) -> None:
    from .captioner import CaptionerGeneration

    g = CaptionerGeneration()
    p.add_argument("--num-beams", type=POSITIVE, default=g.num_beams, help="1 = greedy")
    p.add_argument("--max-new-tokens", type=POSITIVE, default=g.max_new_tokens)
    p.add_argument("--length-penalty", type=float, default=g.length_penalty)
    p.add_argument("--no-repeat-ngram-size", type=COUNT, default=g.no_repeat_ngram_size)


def _gen(args):
    from .captioner import CaptionerGeneration

    return CaptionerGeneration(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                               length_penalty=args.length_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size)


def _cmd_train(args) -> int:
    from .captioner import CaptionerConfig, EncoderConfig, build, checked_trainable_count, course_files
    from .data import check_output_dir, load_split
    from .decoder import LoraConfig
    from .distributed import setup
    from .outputs import clip_scorer
    from .train import TrainConfig, check_run_folder, train

    dist = setup()  # data-parallel under torchrun / accelerate launch; else one process
    say = print if dist.main else (lambda *_: None)
    root = Path(args.data_root)
    out = check_output_dir(args.out, "--out run")
    train_recs = load_split(root / "p2_data/train.json", root / "p2_data/images/train")
    val_recs = load_split(root / "p2_data/val.json", root / "p2_data/images/val")
    if args.max_train_images:
        train_recs = train_recs[: args.max_train_images]
    cfg = CaptionerConfig(
        encoder=EncoderConfig(name=args.encoder, checkpoint=args.encoder_checkpoint, use_cls=not args.no_cls,
                              pool=args.pool, random_weights=args.random_weights),
        lora=LoraConfig(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                        targets=tuple(args.lora_targets)),
        projection=args.projection, visual_norm=not args.no_visual_norm, **course_files(root))
    tcfg = TrainConfig(num_epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                       captions_per_image=args.captions_per_image, eval_images=args.eval_images or 0,
                       feature_cache=args.feature_cache, num_workers=args.num_workers, seed=args.seed,
                       compile=False if args.no_compile else None, compile_scope=args.compile_scope)
    gen = _gen(args)
    if not args.no_resume:
        check_run_folder(out, cfg, tcfg, train_recs, val_recs, gen, overwrite=args.overwrite)
    model, encoder, transform = build(cfg, seed=args.seed)
    processes = f"; {dist.world_size} processes" if dist.active else ""
    say(f"trainable parameters: {checked_trainable_count(model):,}{processes}")
    clip = clip_scorer(args.clip_model, args.clip_pretrained) if dist.main else None  # the main process validates
    try:
        result = train(model, encoder, transform, train_recs, val_recs, tcfg, out, gen, clip=clip,
                       resume=not args.no_resume, overwrite=True, log=say)
    except KeyboardInterrupt:  # checkpoints are written atomically: what is on disk is whole
        last = out / "last.pt"
        raise KeyboardInterrupt(f"{last} holds the last finished epoch; the same command goes on from it"
                                if last.is_file() else f"no epoch had finished; nothing was kept in {out}") from None
    say(f"best epoch {result.best_epoch}: {result.best_path}")
    return 0


def _cmd_caption(args) -> int:
    from .captioner import caption_images, load_adapter
    from .data import check_output_file, list_images, write_json_atomic

    out = check_output_file(args.out_json, "OUT json")
    list_images(args.images)  # the folder and its images, before the model loads
    model, encoder, transform = load_adapter(args.adapter, decoder_checkpoint=args.decoder)
    pred = caption_images(model, encoder, transform, args.images, _gen(args), batch_size=args.batch_size)
    write_json_atomic(out, pred)
    print(f"{len(pred)} captions -> {out}")
    return 0


def _cmd_llava_caption(args) -> int:
    from .data import check_output_file, list_images
    from .distributed import setup
    from .llava import LlavaGeneration, LlavaLoad, caption_folder, device_of, partial_files

    gen = LlavaGeneration(num_beams=args.num_beams, do_sample=args.temperature > 0,
                          temperature=args.temperature or 1.0, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                          min_new_tokens=args.min_new_tokens, length_penalty=args.length_penalty,
                          no_repeat_ngram_size=args.no_repeat_ngram_size,
                          repetition_penalty=args.repetition_penalty, seed=args.seed, cache=args.cache)
    out = check_output_file(args.out_json, "OUT json")
    list_images(args.images)
    if not args.random_weights:
        _check_device(args.device, args.load_in_4bit, args.load_in_8bit)
    if args.deterministic:  # before the first CUDA kernel: cuBLAS reads its workspace setting once
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        import torch

        torch.use_deterministic_algorithms(True)
    dist = setup()  # one process per GPU under torchrun / accelerate launch; else one process
    device = dist.device(args.device) if dist.active else args.device
    load = LlavaLoad(str(args.processor or args.model) if args.random_weights else str(args.model),
                     load_in_4bit=args.load_in_4bit, load_in_8bit=args.load_in_8bit, fast_kernels=args.liger,
                     device=str(device) if device is not None else None, random_weights=args.random_weights)
    model, processor = load.load()  # random weights: the 7B architecture, for its speed without the download
    if args.cache == "static+graphs" and device_of(model).type != "cuda":
        print("--cache static+graphs: CUDA graphs need a GPU; on the CPU the same steps run one by one",
              file=sys.stderr)
    try:
        run = caption_folder(model, processor, args.images, out, instruction=args.prompt, generation=gen,
                             batch_size=args.batch_size, num_workers=args.num_workers,
                             first_sentence=args.first_sentence, model_name=str(args.model))
    except KeyboardInterrupt:  # each finished batch is in the partial file; the JSON is written only at the end
        kept = partial_files(out)
        raise KeyboardInterrupt(f"the captions of the finished batches are in {kept[0]}; the same command goes on "
                                f"from them" if kept else f"no batch had finished; {out} was not written") from None
    rate = run.computed / run.seconds if run.seconds else 0.0
    if dist.main:
        on = f" on {dist.world_size} processes" if dist.active else ""
        print(f"{len(run.captions)} captions -> {out} ({run.computed} new in {run.seconds:.1f}s{on}, "
              f"{rate:.2f} images/s; {run.reused} from an interrupted run)")
    return 0


def _cmd_download(args) -> int:
    from . import hub

    from .data import DataError

    from .workbook import ROOT, WorkbookConfig

    params = WorkbookConfig.load(args.config).parameters  # with what it extends
    keys = ("llava_model", "encoder", "clip_model", "clip_pretrained")
    missing = [k for k in keys if params.get(k) is None]
    if missing:
        raise DataError(f"{args.config}: names no {', '.join(missing)} (parameters:)")
    names = {k: str(params[k]) for k in keys}
    local = {k: v for k, v in names.items() if k != "clip_pretrained" and v
             and (Path(v).expanduser().is_dir() or (ROOT / v).is_dir())}
    plan = hub.download_plan(*(None if k in local else names[k] for k in ("llava_model", "encoder", "clip_model")),
                             names["clip_pretrained"])
    print(f"the models that {args.config} names, into the Hugging Face cache {hub.hub_cache_dir()}:")
    for key, folder in local.items():
        print(f"  {key} {folder}: a local folder, nothing to fetch")
    for item in plan:
        size = "cached" if item.cached else "size unknown (offline)" if item.size is None else \
            f"{item.size / 1e9:.2f} GB to fetch"
        print(f"  {item.spec.what} {item.spec.name or item.spec.repo_id}: {size}\n"
              f"    {item.spec.repo_id} [{', '.join(item.patterns)}] -> {item.destination}")
    todo = [item for item in plan if not item.cached]
    if not todo:
        print(f"nothing to fetch: {args.config} loads offline (HF_HUB_OFFLINE=1)")
        return 0
    if args.dry_run:
        return 0
    if hub.is_offline():
        print("hw3 download: offline (HF_HUB_OFFLINE=1, or the hub is unreachable); run it on a machine with "
              "network, then copy the cache (HF_HOME) here", file=sys.stderr)
        return 1
    for item in todo:
        print(f"fetching {item.spec.repo_id} ...", flush=True)
        try:
            print(f"  -> {hub.fetch(item)}")
        except Exception as e:  # network errors come as many types (DNS, HTTP, timeouts)
            print(f"hw3 download: {item.spec.repo_id}: {type(e).__name__}: {str(e).splitlines()[0][:300]}",
                  file=sys.stderr)
            return 1
    print("done: the hw3 profile now loads these offline (HF_HUB_OFFLINE=1 works)")
    print("the course's decoder_model.bin, encoder.json and vocab.bpe come with hw3_data/p2_data/ (not on the hub)")
    return 0


def _cmd_rehearse(args) -> int:
    from .rehearsal import prepare
    from .rehearsal.coco import CocoLikeSizes

    sizes = CocoLikeSizes(p1_val=args.p1_images, p2_train=args.train_images, p2_val=args.val_images)
    prepare(args.out, config=args.config, sizes=sizes, parts=tuple(args.only), device=args.device,
            llava_from=args.llava_from)
    return 0


def _cmd_lab(args) -> int:
    from .kernel import lab

    extra = args.jupyter_args[1:] if args.jupyter_args[:1] == ["--"] else args.jupyter_args
    lab(args.port, open_browser=not args.no_browser, extra=extra)
    return 0  # not reached: JupyterLab replaces this process


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error said in one line (the flag and what is wrong) instead of the whole usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (`{self.prog} -h` lists the options)\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The options' defaults are those of the dataclasses that the commands fill (one source for each). Only
    ``command``'s options are added (all when None): a command imports no model code that it does not use."""
    def want(name: str) -> bool:
        return command is None or command == name

    p = _Parser(prog="hw3", description="The HW3 captioning workbook")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="execute the notebooks of a profile into outputs/<profile>/")
    r.add_argument("-f", "--config", default="configs/demo.yaml", help="papermill parameter file (default: demo)")
    r.add_argument("--only", nargs="+", help="run only these notebooks (names without .ipynb)")
    r.add_argument("--no-html", action="store_true", help="skip the nbconvert HTML reports")
    r.add_argument("--cell-timeout", type=_in_range(0.0, float("inf"), low_open=False, high_open=True),
                   metavar="SECONDS", help="stop a cell that runs longer, with its kernel's stacks (default: the "
                                           "config's cell_timeout, else 1800; 0: no bound)")
    r.add_argument("--gpu-cap", type=_in_range(0.0, float("inf"), low_open=True, high_open=True), metavar="GIB",
                   help="cap PyTorch's GPU memory in the notebooks' kernels, to check that a config fits a smaller "
                        "card on a larger one (22 for a 24 GB card, 10.5 for 12 GB; docs/rehearsal.md)")
    r.add_argument("-p", "--parameters", nargs=2, action="append", metavar=("NAME", "VALUE"),
                   help="override a parameter of the config, as papermill's -p (the value is read as YAML: 3, "
                        "0.5, true, text)")
    r.set_defaults(func=_cmd_run)

    rp = sub.add_parser("report", help="assemble the report to hand in (report.md, report.pdf) from a run's metrics "
                                       "and figures (hw3 run writes it too)")
    rp.add_argument("-f", "--config", default="configs/demo.yaml", help="the config whose run to report (default: "
                                                                         "demo)")
    rp.add_argument("--output-dir", help="the run's folder instead (outputs/<profile>)")
    rp.add_argument("--no-pdf", action="store_true", help="Markdown and HTML only (no chromium)")
    rp.set_defaults(func=_cmd_report)

    d = sub.add_parser("demo-data", help="build the shapes world (and any missing stand-in)")
    d.add_argument("--rebuild", nargs="*", metavar="NAME", default=None, choices=["decoder", "vit", "clip", "llava"],
                   help="retrain these stand-ins (decoder, vit, clip, llava); no name: rebuild the world and all")
    d.add_argument("--root", help="where to write the world (default: data/demo/hw3_data)")
    d.set_defaults(func=_cmd_demo_data)

    e = sub.add_parser("evaluate", help="CIDEr and CLIPScore of a predictions JSON (the course's evaluate.py)")
    if want("evaluate"):
        from .metrics import ClipConfig

        clip = ClipConfig()
        e.add_argument("--pred", required=True, help="predictions JSON {file id: caption}")
        e.add_argument("--annotation", required=True, help="COCO captions JSON with the references")
        e.add_argument("--images", required=True, help="folder of the images")
        e.add_argument("--clip-model", default=clip.model, help="open_clip name or a local CLIP folder")
        e.add_argument("--clip-pretrained", default=clip.pretrained,
                       help="open_clip tag or checkpoint file ('' for none)")
        e.add_argument("--batch-size", type=POSITIVE, default=clip.batch_size)
        e.add_argument("--json", action="store_true", help="print one machine-readable JSON line")
    e.set_defaults(func=_cmd_evaluate)

    t = sub.add_parser("train", help="train the P2 LoRA captioner on a hw3_data root")
    if want("train"):
        from .captioner import CaptionerConfig, EncoderConfig
        from .decoder import LORA_TARGETS
        from .train import TrainConfig

        enc, cap, tc = EncoderConfig(), CaptionerConfig(), TrainConfig()
        t.add_argument("--data-root", default="hw3_data", help="the hw3_data folder (p2_data/ inside)")
        t.add_argument("--out", required=True, help="run folder: last.pt (resume), best.safetensors + best.json")
        t.add_argument("--encoder", default=enc.name,
                       help="timm model name or a local timm folder")
        t.add_argument("--encoder-checkpoint", default="", help="local weights file for --encoder")
        t.add_argument("--random-weights", action="store_true", help="encoder without pretrained weights (dry runs)")
        t.add_argument("--no-cls", action="store_true", help="patch tokens only")
        t.add_argument("--pool", type=POSITIVE, default=enc.pool,
                       help="average-pool the patch grid by this factor (must divide it)")
        t.add_argument("--projection", choices=["linear", "mlp"], default=cap.projection)
        t.add_argument("--no-visual-norm", action="store_true", help="skip the LayerNorm on visual tokens")
        t.add_argument("--lora-r", type=POSITIVE, default=cap.lora.r,
                       help="LoRA rank (the assignment requires LoRA: at least 1)")
        t.add_argument("--lora-alpha", type=POSITIVE, default=cap.lora.alpha)
        t.add_argument("--lora-dropout", type=DROPOUT, default=cap.lora.dropout, help="in [0, 1)")
        t.add_argument("--lora-targets", nargs="+", default=list(cap.lora.targets),
                       choices=LORA_TARGETS)
        t.add_argument("--epochs", type=POSITIVE, default=tc.num_epochs)
        t.add_argument("--batch-size", type=POSITIVE, default=tc.batch_size)
        t.add_argument("--lr", type=LEARNING_RATE, default=tc.lr)
        t.add_argument("--captions-per-image", type=COUNT, default=tc.captions_per_image,
                       help="references per image per epoch (0 = all)")
        t.add_argument("--eval-images", type=POSITIVE, default=None,
                       help="val images captioned each epoch (default: all)")
        t.add_argument("--feature-cache", choices=["memory", "disk", "off"], default=tc.feature_cache)
        t.add_argument("--num-workers", type=COUNT, default=tc.num_workers,
                       help="threads decoding images for the features (default: up to 16 on a GPU, 0 on the CPU)")
        t.add_argument("--no-compile", action="store_true",
                       help="train eagerly on a GPU (default there: the step compiled with torch.compile)")
        t.add_argument("--compile-scope", choices=["step", "blocks"], default=tc.compile_scope,
                       help="what torch.compile compiles: the whole step, or one decoder block shared by all "
                            "(a shorter compile)")
        t.add_argument("--max-train-images", type=POSITIVE, default=None, help="use only the first N training images")
        t.add_argument("--clip-model", default="", help="CLIP for validation CLIPScore ('' = CIDEr only)")
        t.add_argument("--clip-pretrained", default="")
        t.add_argument("--seed", type=int, default=tc.seed)
        t.add_argument("--no-resume", action="store_true", help="start over even if OUT/last.pt exists")
        t.add_argument("--overwrite", action="store_true", help="replace a run of another configuration in --out")
        _gen_args(t)
    t.set_defaults(func=_cmd_train)

    c = sub.add_parser("caption", help="caption a folder with a trained adapter (the course's hw3_2.sh)")
    if want("caption"):
        c.add_argument("images", help="folder of images")
        c.add_argument("out_json", help="predictions JSON to write {file id: caption}")
        c.add_argument("decoder", help="the course's decoder_model.bin")
        c.add_argument("--adapter", required=True, help="best.safetensors (with best.json beside it)")
        c.add_argument("--batch-size", type=POSITIVE, default=64)
        _gen_args(c)
    c.set_defaults(func=_cmd_caption)

    lc = sub.add_parser("llava-caption", help="P1: zero-shot LLaVA-1.5 captions of a folder (the course's hw3_1.sh)")
    if want("llava-caption"):
        from .llava import CACHES, DEFAULT_INSTRUCTION, REAL_MODEL_ID, LlavaGeneration

        lg = LlavaGeneration()
        lc.add_argument("images", help="folder of images")
        lc.add_argument("out_json", help="predictions JSON to write {file id: caption}")
        lc.add_argument("--model", default=REAL_MODEL_ID,
                        help="hub id or local folder (default: %(default)s; the demo: data/demo/models/llava)")
        lc.add_argument("--processor", default=None, help="with --random-weights: a local LLaVA folder whose processor "
                        "drives the random 7B (default: --model)")
        lc.add_argument("--prompt", type=_instruction, default=DEFAULT_INSTRUCTION, help="the instruction")
        lc.add_argument("--num-beams", type=POSITIVE, default=lg.num_beams)
        lc.add_argument("--temperature", type=TEMPERATURE, default=0.0, help="0: greedy / beam; > 0 samples (--seed)")
        lc.add_argument("--top-p", type=TOP_P, default=lg.top_p, help="in (0, 1]")
        lc.add_argument("--max-new-tokens", type=POSITIVE, default=lg.max_new_tokens)
        lc.add_argument("--min-new-tokens", type=COUNT, default=lg.min_new_tokens)
        lc.add_argument("--length-penalty", type=float, default=lg.length_penalty)
        lc.add_argument("--no-repeat-ngram-size", type=COUNT, default=lg.no_repeat_ngram_size)
        lc.add_argument("--repetition-penalty", type=_in_range(0.0, float("inf"), True, True),
                        default=lg.repetition_penalty)
        lc.add_argument("--seed", type=int, default=lg.seed)
        lc.add_argument("--cache", choices=CACHES, default=lg.cache,
                        help="KV cache: static preallocates it (faster decoding on a GPU); static+graphs also replays "
                             "greedy decoding's steps from a CUDA graph")
        lc.add_argument("--first-sentence", action="store_true", help="keep only the first sentence of each caption")
        lc.add_argument("--batch-size", type=POSITIVE, default=16)
        lc.add_argument("--num-workers", type=COUNT, default=4, help="DataLoader workers decoding images")
        lc.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
        lc.add_argument("--random-weights", action="store_true", help="the architecture without weights (benchmarks)")
        lc.add_argument("--load-in-4bit", action="store_true", help="4-bit language model (needs bitsandbytes)")
        lc.add_argument("--load-in-8bit", action="store_true",
                        help="8-bit language model (bitsandbytes' LLM.int8): between bf16 and 4-bit in memory")
        lc.add_argument("--liger", action="store_true",
                        help="Liger's fused Triton kernels for RMSNorm, RoPE and SwiGLU (pip install liger-kernel; "
                             "GPU): a shorter prefill (docs/benchmarks.md)")
        lc.add_argument("--deterministic", action="store_true",
                        help="deterministic GPU kernels: the same captions on every run and on any number of GPUs "
                             "(bf16 near-ties flip otherwise; about 2 %% slower, docs/benchmarks.md)")
    lc.set_defaults(func=_cmd_llava_caption)

    rh = sub.add_parser("rehearse", help="random weights at the real architectures in a Hugging Face cache of its "
                                         "own, plus COCO-like hw3_data: the hw3 profile without downloads (GPU)")
    rh.add_argument("--out", required=True, help="writes OUT/hw3_data and OUT/hf_home (about 16 GB)")
    rh.add_argument("-f", "--config", default="configs/hw3.yaml", help="the config whose models are rehearsed")
    rh.add_argument("--p1-images", type=POSITIVE, default=200, help="p1 val images (the course's: 500)")
    rh.add_argument("--train-images", type=POSITIVE, default=2000, help="p2 train images (the course's: ~10,000)")
    rh.add_argument("--val-images", type=POSITIVE, default=300, help="p2 val images (the course's: ~1,500)")
    rh.add_argument("--only", nargs="+", choices=["data", "encoder", "clip", "llava"],
                    default=["data", "encoder", "clip", "llava"], help="prepare only these parts")
    rh.add_argument("--device", default=None, help="where the 7B model is built (default: cuda when available)")
    rh.add_argument("--llava-from", default=None, help="store this saved LLaVA (e.g. data/demo/models/llava) under "
                                                       "the LLaVA id instead of the random 7B: a dry run on a CPU")
    rh.set_defaults(func=_cmd_rehearse)

    dl = sub.add_parser("download", help="fetch the real models of the hw3 profile (needs network)")
    dl.add_argument("-f", "--config", default="configs/hw3.yaml", help="the config that names the models")
    dl.add_argument("--dry-run", action="store_true", help="list what would be fetched, fetch nothing")
    dl.set_defaults(func=_cmd_download)

    lab = sub.add_parser("lab", help="open the workbook in JupyterLab (127.0.0.1 only, token login)")
    lab.add_argument("--port", type=_port, help="port to listen on (default: Jupyter's, 8888 or the next free one)")
    lab.add_argument("--no-browser", action="store_true", help="print the URL instead of opening a browser")
    lab.add_argument("jupyter_args", nargs=argparse.REMAINDER, metavar="-- JUPYTER_ARGS",
                     help="anything after -- goes to `jupyter lab` as it is")
    lab.set_defaults(func=_cmd_lab)
    return p


def _one_line(e: BaseException) -> str:
    """The message a user needs, on one line. An error raised in a DataLoader worker arrives wrapped with the
    worker's traceback: keep the original message only."""
    text = str(e).strip()
    if "Original Traceback" in text:  # torch's ExceptionWrapper: the original "Type: message" is the last line
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last and " " not in last.split(": ", 1)[0] else last
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    text = " ".join(lines[:3]) if lines else type(e).__name__
    from .data import DataError

    from .workbook import WorkbookError

    known = isinstance(e, (DataError, WorkbookError, FileNotFoundError, PermissionError, IsADirectoryError,
                           NotADirectoryError))
    return text if known or isinstance(e, ValueError) else f"{type(e).__name__}: {text}"


def _out_of_memory(e: BaseException, args) -> str | None:
    """For a GPU out-of-memory error: which setting to lower, with the value that was asked for (torch's own message
    is four sentences about its allocator)."""
    if type(e).__name__ != "OutOfMemoryError":
        return None
    from .workbook import oom_head

    head = oom_head(str(e), os.environ.get("HW3_GPU_CAP_GIB"))
    batch = getattr(args, "batch_size", None)
    smaller = f"--batch-size {max(1, batch // 2)}" if batch else "a smaller --batch-size"
    if getattr(args, "load_in_4bit", False):
        bits = ""  # nothing fewer to offer
    else:
        bits = (", or --load-in-4bit" if getattr(args, "load_in_8bit", False) else
                ", or fewer bits: --load-in-8bit or --load-in-4bit") + \
            " (configs/hw3-12gb.yaml: 4-bit and batch 8 for a 12 GB card)"
    advice = {"llava-caption": f"batch {batch} does not fit: try {smaller}{bits}",
              "train": f"batch {batch} does not fit: try {smaller}, or a larger --pool (fewer visual tokens)",
              "caption": f"batch {batch} does not fit: try {smaller}",
              "evaluate": f"batch {batch} does not fit: try {smaller}"}.get(args.command, "use a smaller batch")
    return f"{head}; {advice}"


def main(argv: list[str] | None = None) -> int:
    """Every failure ends as one line on stderr and exit status 2 (``HW3_DEBUG=1`` shows the traceback)."""
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    if command == "llava-caption":  # before torch is imported (the parser imports it) and long before any allocation
        from .alloc_conf import expandable_segments

        expandable_segments()
    args = build_parser(command).parse_args(argv)

    shown = set()

    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        if str(message) not in shown:  # the same input is checked more than once on some paths: say it once
            shown.add(str(message))
            print(f"hw3 {args.command}: warning: {message}", file=sys.stderr)

    warnings.showwarning = one_line_warning
    terminated = []

    def on_sigterm(signum, frame):  # `kill PID`: stopped as Ctrl-C stops it, so that no kernel or worker outlives it
        terminated.append(signum)
        raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_sigterm) if main_thread else None
    try:
        if os.environ.get("HW3_GPU_CAP_GIB") and args.command != "run":  # any command on a pretended smaller card
            from .distributed import apply_gpu_cap

            apply_gpu_cap()
        return args.func(args)
    except KeyboardInterrupt as e:
        print(f"hw3 {args.command}: {'terminated' if terminated else 'interrupted'}{f': {e}' if str(e) else ''}",
              file=sys.stderr)
        return 143 if terminated else 130
    except Exception as e:  # noqa: BLE001 -- a user sees one line; developers set HW3_DEBUG=1
        if os.environ.get("HW3_DEBUG"):
            raise
        from .data import DataError
        from .workbook import ConfigError, WorkbookError

        rank = int(os.environ.get("RANK", "0"))  # under torchrun / accelerate launch, one process per GPU
        if rank == 0 or not isinstance(e, DataError):  # wrong input is the same for all: the main process says it
            where = f" (process {rank})" if rank else ""
            print(f"hw3 {args.command}{where}: {_out_of_memory(e, args) or _one_line(e)}", file=sys.stderr)

        # 1: a notebook failed (its executed copy holds the traceback); 2: wrong input, before or during the work
        return 1 if isinstance(e, WorkbookError) and not isinstance(e, ConfigError) else 2
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
