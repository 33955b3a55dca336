"""The report a student hands in: ``outputs/<profile>/report/report.md`` (HackMD-compatible Markdown, its figures
copied beside it) and ``report.pdf`` (the same, printed by chromium), in the order of the course's template.

Everything in it comes from the run: ``metrics.json`` and the figures the notebooks saved. It gives the facts to
reason from; where the template asks for the student's analysis it leaves a marked block to write in, never a
verdict. ``hw3 report`` writes it; ``hw3 run`` writes it after the notebooks.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from .data import DataError, atomic_path, read_json, relative

WRITE_HERE = "✍ **Your analysis.**"  # the marker of each block the student writes

# LLaVA-1.5's parts, as the paper describes them (Liu et al., "Improved Baselines with Visual Instruction Tuning")
COMPONENTS = [
    ("Vision encoder", "CLIP ViT-L/14 at 336 px (OpenAI's weights), frozen throughout. LLaVA takes the patch "
     "features of its second-to-last layer, without the CLS token: 24 x 24 = 576 tokens of width 1024 per image."),
    ("Projector", "A two-layer MLP with a GELU between (LLaVA 1.0 had a single linear layer). It maps each patch "
     "feature into the language model's embedding space, where it becomes one visual token of width 4096."),
    ("Language model", "Vicuna-7B v1.5, LLaMA-2 fine-tuned on shared user conversations. It reads the visual "
     "tokens where the prompt holds `<image>`, then the instruction, and writes the answer one token at a time."),
    ("Training, stage 1: feature alignment", "Only the projector trains, on 558K image-caption pairs (a LAION / CC / "
     "SBU subset captioned by BLIP), with the encoder and the language model frozen: the visual tokens learn to "
     "land where the language model can read them."),
    ("Training, stage 2: visual instruction tuning", "The projector and the language model train together (the "
     "encoder stays frozen) on 665K instruction-following examples: GPT-written conversations about images and "
     "academic VQA data with a prompt that fixes the answer's format (e.g. \"Answer with a single word\")."),
]


class ReportError(DataError):
    """A report that cannot be assembled (no metrics yet), in one line."""


def _f(value, digits: int = 3) -> str:
    return "n/a" if value is None or value != value else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    cells = lambda row: "| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |"  # noqa: E731
    return [cells(header), "|" + "---|" * len(header), *map(cells, rows), ""]


class _Report:
    def __init__(self, out: Path, metrics: dict):
        self.out, self.m, self.lines, self.figures = out, metrics, [], []

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def figure(self, name: str, alt: str) -> None:
        """A figure of ``outputs/<profile>/figures/`` (copied into report/figures/), or a line saying it is missing."""
        if (self.out / "figures" / name).is_file():
            self.figures.append(name)
            self.add(f"![{alt}](figures/{name})", "")
        else:
            self.add(f"*(figure {name} is missing: its notebook has not run)*", "")

    def write_here(self, *questions: str) -> None:
        self.add(f"> {WRITE_HERE} " + " ".join(questions), "> ", "> *(write here)*", "")

    def missing(self, notebook: str) -> None:
        self.add(f"*({notebook} has not run: `hw3 run -f CONFIG --only {notebook}`)*", "")


def build_markdown(out: Path, metrics: dict) -> tuple[str, list[str]]:
    """``(report.md's text, the figure files it names)`` from a run's ``metrics`` and its ``out/figures``."""
    r = _Report(out, metrics)
    m = metrics
    profile = m.get("profile", out.name)
    where = relative(out) if not Path(relative(out)).is_absolute() else out.name  # no one's home folder in it
    r.add(f"# DLCV HW3 report ({profile} profile)", "",
          f"Assembled by `hw3 report` from `metrics.json` and the figures of `{where}/`. Every number is the "
          "run's; "
          f"each block marked {WRITE_HERE.split()[0]} is yours to write.", "")
    if profile == "demo":
        r.add("> This is the **demo profile**: the shapes world and small stand-in models trained on it, not the "
              "course's data and models. Run `./run_all.sh -f configs/hw3.yaml` on your `hw3_data/` for the report "
              "you hand in.", "")

    # ---------------------------------------------------------------------------------------------------- P1
    r.add("## Problem 1: zero-shot image captioning with LLaVA", "", "### 1. LLaVA's components", "")
    r.figure("01_llava_data_flow.png", "LLaVA-1.5's data flow")
    for name, text in COMPONENTS:
        r.add(f"- **{name}.** {text}")
    r.add("")
    llava = m.get("llava")
    if llava and profile == "demo":
        r.add(f"(The figure's sizes are those of the run's model, `{llava['model']}`, the demo's small stand-in of the "
              "same architecture; the text describes LLaVA-1.5-7B.)", "")
    r.write_here("What does each training stage teach, and why is the encoder never trained?")
    r.add("### 2. Instructions and generation configs", "")
    if llava:
        rows = [[s["instruction_name"], f"\"{s['instruction']}\"", s["generation"], _f(s["cider"]),
                 _f(s.get("clipscore")), _f(s["mean_length"], 2), _f(s.get("seconds"), 2)] for s in llava["sweep"]]
        r.add(f"{llava['num_images']} images of p1 val, model `{llava['model']}`; CIDEr and CLIPScore as the "
              "course's `evaluate.py` computes them.", "")
        r.add(*_table(["instruction", "text", "generation", "CIDEr", "CLIPScore", "mean length (words)",
                       "seconds"], rows))
        best = llava["best"]
        on_all = llava.get("best_num_images", llava["num_images"])
        on_all = f" on all {on_all} images" if on_all != llava["num_images"] else ""
        r.add(f"**Best setting (by CIDEr):** instruction \"{best['instruction']}\", generation {best['generation']}"
              f"{on_all}: CIDEr {_f(best['cider'])}, CLIPScore {_f(best.get('clipscore'))}.", "")
        r.figure("01_sweep.png", "the sweep: CIDEr against CLIPScore, and caption lengths")
    else:
        r.missing("01_llava_prompts")
    r.write_here("Which instruction and which generation config score best, and why might they? Do CIDEr and "
                 "CLIPScore agree on the ranking?")

    # ---------------------------------------------------------------------------------------------------- P2
    r.add("## Problem 2: a LoRA captioner", "", "### 1. The best setting", "")
    training, cap = m.get("captioner_training"), m.get("captioner")
    if training and "config" in training:
        c, dec = training["config"], training.get("decoding", {})
        decoding = "greedy" if dec.get("num_beams", 1) == 1 else f"beam search, {dec['num_beams']} beams"
        rows = [["encoder (frozen)", f"`{c['encoder']}`"],
                ["visual tokens", f"{c['visual_tokens']} (patch grid pooled {c['pool']} x {c['pool']}, CLS kept)"
                 if c["pool"] > 1 else f"{c['visual_tokens']} (every patch, CLS kept)"],
                ["projection", f"{c['projection'].upper()}" + (" + LayerNorm" if c["visual_norm"] else "")],
                ["decoder", "the course's GPT-2 (`decoder_model.bin`), frozen but for LoRA"],
                ["LoRA r / alpha / dropout", f"{c['lora_r']} / {c['lora_alpha']} / {c['lora_dropout']}"],
                ["LoRA targets", c["lora_targets"]],
                ["trainable parameters", f"{training['trainable_params']:,}"],
                ["optimizer and schedule", f"{training['optimizer']}; peak lr {c['lr']}"],
                ["epochs, batch", f"{c['num_epochs']} epochs over {c['train_images']:,} images; {c['batch_size']} "
                 f"captions a step, {c['captions_per_image'] or 'all'} references per image per epoch"],
                ["best epoch (val CIDEr)", training["best_epoch"]],
                ["decoding", f"{decoding}, at most {dec.get('max_new_tokens', '?')} tokens"]]
        r.add(*_table(["", "the best setting"], rows))
    else:
        r.missing("02_train_lora_captioner")
    if cap:
        r.add(f"**On the whole validation split:** CIDEr {_f(cap['cider'])}, CLIPScore {_f(cap['clipscore'])} "
              f"(a caption that ignores the image, the most common training caption, scores CIDEr "
              f"{_f(cap['baseline_cider'])}, CLIPScore {_f(cap['baseline_clipscore'])}).", "")
    else:
        r.missing("03_evaluate")
    r.figure("02_training_curves.png", "training loss and validation scores per epoch")
    r.add("### 2. Two LoRA attempts", "")
    attempts = (training or {}).get("attempts")
    if attempts:
        early = next((a for a in attempts if a["run"].startswith("main, epoch")), None)
        when = ("every run's best epoch" if early is None else
                f"the main run's best epoch, and every other run after epoch {early['epochs']} (the attempts train "
                f"the first {early['epochs']} epochs of the main schedule: compare them with the row "
                f"\"{early['run']}\")")
        r.add("Each attempt changes one knob of the best setting and keeps the rest, the schedule included. Each "
              f"row's adapter captions the whole validation split with the final decoding: {when}.", "")
        rows = [[a["run"], a["changed"], a["lora_r"], a["alpha"], _f(a["alpha_over_r"], 2), a["dropout"],
                 a["targets"], "yes" if a["visual_norm"] else "no", f"{a['trainable_params']:,}", a["epochs"],
                 _f(a["val_cider"]), _f(a["val_clipscore"])] for a in attempts]
        r.add(*_table(["run", "changed", "r", "alpha", "alpha / r", "dropout", "targets", "visual LayerNorm",
                       "trainable params", "epochs", "val CIDEr", "val CLIPScore"], rows))
        if any(a["run"] == "ablation" for a in attempts):
            r.add("The ablation row is not a LoRA setting: it removes the visual LayerNorm.", "")
    else:
        r.missing("02_train_lora_captioner")
    r.write_here("What does each knob change, and is the difference larger than the epoch-to-epoch noise of the "
                 "training curves?")

    # ---------------------------------------------------------------------------------------------------- P3
    r.add("## Problem 3: where each word looks", "", "### 1. The five p3 images", "")
    att = m.get("attention")
    if att and "p3_captions" in att:
        decoding = att.get("p3_decoding", {})
        r.add(f"Layer shown: captioner {att['layer_shown'].get('captioner')}, LLaVA {att['layer_shown'].get('llava')}"
              f"; query: captioner {att['query_shown'].get('captioner')}, LLaVA {att['query_shown'].get('llava')}; "
              f"heads: {att.get('heads', 'mean')}. Each panel shares its figure's colour scale; the last panel is the "
              "end token.", "")
        for image in att["p3_captions"].get("captioner", {}):
            r.add(f"#### {image}", "")
            for model, label in (("llava", "LLaVA"), ("captioner", "captioner")):
                caption = att["p3_captions"].get(model, {}).get(image)
                if caption is None:
                    continue
                r.add(f"**{label}**, decoded as scored ({decoding.get(model, 'decoding not recorded')}): *{caption}*",
                      "")
                r.figure(f"04_{model}_{image}.png", f"{label}'s attention of every word, {image}")
    else:
        r.missing("04_attention_maps")
    r.write_here("Does each word's map look at what the word names? Where do function words and the end token "
                 "look? How do the two models differ?")
    r.add("### 2. The top-1 and last-1 captions by CLIPScore", "")
    bw = m.get("best_worst")
    if bw:
        for key, label in (("top", "Top-1"), ("bottom", "Last-1")):
            p = bw[key]
            r.add(f"**{label}: {p['image']}**, CLIPScore {_f(p['clipscore'])}, CIDEr {_f(p['cider'])}", "",
                  f"- caption: *{p['caption']}*", *[f"- reference: {ref}" for ref in p["references"]], "")
            r.figure(f"05_{key}.png", f"{label.lower()} caption's attention")
    else:
        r.missing("05_best_worst_clipscore")
    r.write_here("Why might CLIPScore rank these two captions at the extremes? Is the last-1 caption wrong, or its "
                 "image hard? Do the two pairs' maps differ?")

    # ---------------------------------------------------------------------------------------------------- run
    cost = m.get("notebook_cost", {})
    if cost:
        r.add("## How this run was made", "")
        rows = [[name, _f(c.get("seconds"), 1), c.get("device", "")] for name, c in cost.items()]
        r.add(*_table(["notebook", "seconds", "device"], rows))
    return "\n".join(r.lines).rstrip() + "\n", r.figures


CSS = """
body { font-family: "DejaVu Sans", Arial, sans-serif; font-size: 10.5pt; line-height: 1.4; margin: 0 1.2em; }
h1 { font-size: 18pt; } h2 { font-size: 14pt; border-bottom: 1px solid #999; margin-top: 1.6em; }
h3 { font-size: 12pt; } h4 { font-size: 11pt; margin-bottom: 0.3em; }
h2 { break-before: page; } h2:first-of-type { break-before: auto; } h2, h3, h4 { break-after: avoid; }
p:has(+ p > img) { break-after: avoid; } blockquote, table, img { break-inside: avoid; }
img { max-width: 100%; break-inside: avoid; display: block; margin: 0.4em auto; }
table { border-collapse: collapse; font-size: 8.5pt; margin: 0.5em 0; break-inside: avoid; }
th, td { border: 1px solid #bbb; padding: 2px 5px; vertical-align: top; }
blockquote { border-left: 4px solid #4a8; margin: 0.6em 0; padding: 0.2em 0.8em; background: #f3faf6; }
code { font-size: 9pt; }
@page { size: A4; margin: 14mm; }
"""


def to_html(markdown: str, title: str) -> str:
    """``markdown`` as one HTML page (tables, relative images) for chromium to print."""
    import mistune

    body = mistune.create_markdown(plugins=["table"])(markdown)
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{title}</title><style>{CSS}</style></head>"
            f"<body>\n{body}</body></html>\n")


def find_chromium() -> str | None:
    """A chromium to print with: ``$HW3_CHROMIUM``, else ``chromium`` / ``chromium-browser`` / ``google-chrome``."""
    for name in (os.environ.get("HW3_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def print_pdf(html: Path, pdf: Path, chromium: str, timeout: float = 180.0) -> None:
    """Print ``html`` to ``pdf`` with headless chromium, atomically; bounded by ``timeout`` seconds."""
    with tempfile.TemporaryDirectory(prefix="hw3-pdf-") as profile, atomic_path(pdf) as tmp:
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--no-first-run", "--no-pdf-header-footer", f"--user-data-dir={profile}",
               f"--print-to-pdf={tmp}", html.resolve().as_uri()]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            log, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise ReportError(f"{chromium} did not print {html} within {timeout:.0f}s") from None
        if proc.returncode != 0 or not Path(tmp).is_file() or Path(tmp).stat().st_size == 0:
            last = [line for line in (log or "").splitlines() if line.strip()][-1:] or ["no output"]
            raise ReportError(f"{chromium} could not print {html} (status {proc.returncode}): {last[0]}")


def pdf_pages(pdf: Path) -> int:
    """The number of pages of a PDF that chromium wrote (its page objects are not compressed)."""
    import re

    return len(re.findall(rb"/Type\s*/Page(?![a-z])", pdf.read_bytes()))


def write_report(output_dir: str | Path, pdf: bool = True, log=print) -> dict:
    """Write ``report/report.md`` (+ its figures, ``report.html``) and, with chromium, ``report.pdf``; returns
    ``{"markdown", "html", "pdf" (None without chromium), "pages"}``."""
    out = Path(output_dir)
    metrics_file = out / "metrics.json"
    if not metrics_file.is_file():
        raise ReportError(f"{metrics_file}: no metrics yet: run the notebooks first (hw3 run -f CONFIG)")
    metrics = read_json(metrics_file)
    text, figures = build_markdown(out, metrics)
    folder = out / "report"
    (folder / "figures").mkdir(parents=True, exist_ok=True)
    for name in figures:
        shutil.copyfile(out / "figures" / name, folder / "figures" / name)
    md, html = folder / "report.md", folder / "report.html"
    with atomic_path(md) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    with atomic_path(html) as tmp:
        Path(tmp).write_text(to_html(text, f"DLCV HW3 report ({metrics.get('profile', out.name)})"), encoding="utf-8")
    result = {"markdown": md, "html": html, "pdf": None, "pages": 0}
    if pdf:
        chromium = find_chromium()
        if chromium is None:
            log(f"report: {md} written; no PDF: chromium is not installed (apt-get install chromium, or "
                "HW3_CHROMIUM=/path/to/chrome), or print report.html from a browser")
            return result
        print_pdf(html, folder / "report.pdf", chromium)
        result.update(pdf=folder / "report.pdf", pages=pdf_pages(folder / "report.pdf"))
    log(f"report: {md}" + (f" and {result['pdf']} ({result['pages']} pages)" if result["pdf"] else ""))
    return result
