"""Figures. Every function takes whole arrays / records and returns a matplotlib ``Figure``; notebooks show and
save them."""
from __future__ import annotations

import textwrap
from collections import Counter

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from .data import Record, load_image


def image_grid(records: list[Record], captions: list[str] | None = None, boxes: list[list[dict]] | None = None,
               cols: int = 4, size: float = 2.6) -> Figure:
    """Images in a grid, each titled with a caption (default: its first reference) and, when given, its object
    boxes (``[{"box": [x0, y0, x1, y1], "color", "shape"}]``) drawn over it."""
    rows = -(-len(records) // cols)
    titles = []
    for i, rec in enumerate(records):
        caption = captions[i] if captions is not None else (rec.references[0] if rec.references else rec.file_id)
        titles.append("\n".join(line for part in caption.split("\n") for line in textwrap.wrap(part, 34)))
    lines = max(t.count("\n") + 1 for t in titles)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * size, rows * (size + 0.15 * lines + 0.2)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (rec, ax) in enumerate(zip(records, axes.flat)):
        ax.imshow(load_image(rec.image_path))
        ax.set_title(titles[i], fontsize=8)
        for obj in (boxes[i] if boxes is not None else []):
            x0, y0, x1, y1 = obj["box"]
            ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, lw=1, ec="black"))
            ax.text(x0, y0 - 1, f"{obj['color']} {obj['shape']}", fontsize=6, va="bottom",
                    bbox=dict(fc="white", alpha=0.7, lw=0, pad=0.5))
    fig.tight_layout()
    return fig


def caption_statistics(references: dict[str, list[str]], top: int = 20) -> Figure:
    """Caption length (words) histogram and the most frequent words."""
    caps = [c for cs in references.values() for c in cs]
    lengths = [len(c.split()) for c in caps]
    words = Counter(w.strip(".,").lower() for c in caps for w in c.split())
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.5))
    a.hist(lengths, bins=range(min(lengths), max(lengths) + 2), color="tab:blue", edgecolor="white")
    a.set(xlabel="words per caption", ylabel="captions", title=f"{len(caps)} captions of {len(references)} images")
    common = words.most_common(top)
    b.barh([w for w, _ in common][::-1], [n for _, n in common][::-1], color="tab:gray")
    b.set(xlabel="occurrences", title=f"the {top} most frequent of {len(words)} words")
    b.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    return fig


def score_histograms(groups: dict[str, np.ndarray], xlabel: str = "CLIPScore", title: str = "",
                     marks: dict[str, float] | None = None) -> Figure:
    """Overlaid histograms of several score groups (e.g. own caption vs. another image's caption). ``marks``: a
    dashed line at each score, labelled (``{"top-1": 2.9, "last-1": 0.4}``), the label on the side of the bulk."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    lo = min(float(np.min(v)) for v in groups.values())
    hi = max(float(np.max(v)) for v in groups.values())
    bins = np.linspace(lo, hi, 30)
    for name, values in groups.items():
        ax.hist(values, bins=bins, alpha=0.6, label=f"{name} (mean {np.mean(values):.3f})")
    ax.set(xlabel=xlabel, ylabel="images", title=title)
    for label, x in (marks or {}).items():
        inwards = "right" if x > (lo + hi) / 2 else "left"  # the label points into the plot
        ax.axvline(x, color="k", ls="--", lw=1)
        ax.text(x, ax.get_ylim()[1] * 0.9, f"{label} " if inwards == "right" else f" {label}", fontsize=8, ha=inwards)
    ax.legend()
    fig.tight_layout()
    return fig


def training_curves(history: list[dict], title: str = "") -> Figure:
    """Loss and validation metrics per epoch (rows of :class:`hw3lib.train.TrainResult`.history)."""
    epochs = [h["epoch"] for h in history]
    keys = [k for k in ("val_cider", "val_clipscore") if k in history[0]]
    fig, axes = plt.subplots(1, 1 + len(keys), figsize=(4.2 * (1 + len(keys)), 3.2), squeeze=False)
    axes[0, 0].plot(epochs, [h["loss"] for h in history], "o-")
    axes[0, 0].set(xlabel="epoch", ylabel="train loss (caption tokens)")
    for ax, k in zip(axes[0, 1:], keys):
        ax.plot(epochs, [h[k] for h in history], "o-", color="tab:green")
        ax.set(xlabel="epoch", ylabel=k.replace("val_", "val ").replace("cider", "CIDEr").replace("clipscore",
                                                                                                  "CLIPScore"))
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def token_norms(groups: dict[str, np.ndarray], title: str = "") -> Figure:
    """Histograms of per-token L2 norms (log x): text embeddings vs. visual tokens with / without normalisation."""
    fig, ax = plt.subplots(figsize=(6.5, 3.3))
    lo = max(1e-3, min(float(np.min(v)) for v in groups.values()))
    hi = max(float(np.max(v)) for v in groups.values())
    bins = np.geomspace(lo, hi, 40)
    for name, values in groups.items():
        ax.hist(values, bins=bins, alpha=0.6, label=f"{name} (median {np.median(values):.2f})")
    ax.set(xscale="log", xlabel="token L2 norm", ylabel="tokens", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def caption_lengths(captions: dict[str, list[str]]) -> Figure:
    """Word-count distributions of several caption sets (e.g. predictions vs. references)."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    all_lengths = [len(c.split()) for cs in captions.values() for c in cs]
    bins = np.arange(min(all_lengths), max(all_lengths) + 2) - 0.5
    for name, cs in captions.items():
        ax.hist([len(c.split()) for c in cs], bins=bins, alpha=0.6, density=True,
                label=f"{name} (mean {np.mean([len(c.split()) for c in cs]):.1f})")
    ax.set(xlabel="words per caption", ylabel="fraction")
    ax.legend()
    fig.tight_layout()
    return fig


def markdown_table(rows: list[dict], floatfmt: str = ".3f") -> str:
    """A Markdown table of dict rows (same keys), for ``IPython.display.Markdown``."""
    keys = list(rows[0])

    def fmt(v):
        if isinstance(v, bool):
            return "yes" if v else "no"
        return f"{v:{floatfmt}}" if isinstance(v, float) else (f"{v:,}" if isinstance(v, int) else str(v))

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def llava_data_flow(config, instruction: str) -> Figure:
    """LLaVA-1.5's data flow, with the sizes of ``config`` (a ``LlavaConfig``): image -> CLIP vision tower ->
    patch features of layer ``vision_feature_layer`` -> MLP projector -> visual tokens spliced into the prompt at
    the ``<image>`` placeholder -> language model -> caption. Every text is wrapped to its box."""
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    vc, tc = config.vision_config, config.text_config
    grid = vc.image_size // vc.patch_size
    fig, ax = plt.subplots(figsize=(12, 4.4))
    ax.set(xlim=(0, 12), ylim=(0, 4.4))
    ax.axis("off")

    def box(x, y, w, h, lines, color, size=8.5):
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.05", fc=color, ec="0.3"))
        chars = max(8, int(w * 72 / (0.6 * size)))  # characters per line: ~0.6 em per character
        text = "\n".join(part for line in lines for part in textwrap.wrap(line, chars) or [""])
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size, linespacing=1.25)

    def arrow(x0, y0, x1, y1, label=""):
        ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=12, color="0.25"))
        if label:
            ax.text((x0 + x1) / 2 + 0.08, (y0 + y1) / 2, label, ha="left", va="center", fontsize=7.5, color="0.25")

    top, low, h = 2.8, 0.4, 1.3
    box(0.1, top, 1.6, h, ["image", "resize + centre crop", f"{vc.image_size} x {vc.image_size}"], "#f3f3f3")
    box(2.1, top, 2.2, h, ["CLIP vision tower (frozen)", f"{vc.num_hidden_layers} layers, width {vc.hidden_size}",
                           f"patch {vc.patch_size}"], "#dbe9f6")
    box(4.7, top, 2.2, h, [f"layer {config.vision_feature_layer} features", f"{grid} x {grid} = {grid * grid} patches",
                           "(CLS dropped)"], "#dbe9f6")
    box(7.3, top, 2.0, h, ["projector", f"Linear - {config.projector_hidden_act.upper()} - Linear",
                           f"{vc.hidden_size} -> {tc.hidden_size}"], "#fde8c8")
    box(0.1, low, 4.2, h, ["prompt:", "USER: <image>", f"{instruction} ASSISTANT:"], "#f3f3f3")
    box(4.7, low, 4.6, h, ["token embeddings:", f"the {grid * grid} <image> placeholders are replaced by the visual "
                           f"tokens (found by token id {config.image_token_id})"], "#fde8c8")
    box(9.7, low, 2.2, top + h - low, ["language model", f"Llama: {tc.num_hidden_layers} layers, width "
                                       f"{tc.hidden_size}", f"vocabulary {tc.vocab_size:,}", "",
                                       "-> the caption, one token at a time"], "#e1f0dc")
    arrow(1.7, top + h / 2, 2.1, top + h / 2)
    arrow(4.3, top + h / 2, 4.7, top + h / 2)
    arrow(6.9, top + h / 2, 7.3, top + h / 2)
    arrow(8.3, top, 7.6, low + h, "visual tokens")
    arrow(4.3, low + h / 2, 4.7, low + h / 2)
    arrow(9.3, low + h / 2, 9.7, low + h / 2)
    ax.set_title("LLaVA-1.5: how an image becomes a caption", fontsize=11)
    fig.tight_layout()
    return fig


def sweep_plot(rows: list[dict], x: str = "cider", y: str = "clipscore") -> Figure:
    """Each sweep setting as a point (CIDEr vs. CLIPScore), coloured by instruction, marked by generation config;
    beside it the mean caption length."""
    instructions = list(dict.fromkeys(r["instruction_name"] for r in rows))
    generations = list(dict.fromkeys(r["generation"] for r in rows))
    markers = "osD^v<>p*h"
    colors = plt.get_cmap("tab10")
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [1.4, 1]})
    for r in rows:
        a.scatter(r[x], r.get(y, np.nan), s=60, color=colors(instructions.index(r["instruction_name"])),
                  marker=markers[generations.index(r["generation"]) % len(markers)])
    for i, name in enumerate(instructions):
        a.scatter([], [], color=colors(i), label=name)
    for j, name in enumerate(generations):
        a.scatter([], [], color="0.4", marker=markers[j % len(markers)], label=name)
    a.set(xlabel=x.replace("cider", "CIDEr"), ylabel=y.replace("clipscore", "CLIPScore"),
          title="each setting: instruction (colour) x generation (marker)")
    a.legend(fontsize=7.5, loc="best")
    labels = [r["name"] for r in rows]
    b.barh(range(len(rows)), [r["mean_length"] for r in rows],
           color=[colors(instructions.index(r["instruction_name"])) for r in rows])
    b.set_yticks(range(len(rows)), labels, fontsize=7.5)
    b.invert_yaxis()
    b.set(xlabel="mean caption length (words)")
    fig.tight_layout()
    return fig


def word_attention(view, words: list[str], maps: np.ndarray, title: str = "", note: str = "",
                   per_row: int = 6) -> Figure:
    """The course's report layout: the image as the model saw it, then one panel per generated word (the last: the
    end token) with that word's attention (``maps``: (W, rows, cols)) upsampled and overlaid. ``note`` says which
    layer / heads.

    Every panel shares one colour scale, from 0 to the largest weight in the figure, with a colour bar: a word
    whose attention is spread thin over the image looks faint, not as hot as a sharp one (scaling each panel to its
    own range would hide exactly that)."""
    from .attention import upsample

    size = view.size[0]
    n = len(words) + 1
    rows = -(-n // per_row)
    vmax = float(maps.max()) if maps.size and maps.max() > 0 else 1.0
    fig, axes = plt.subplots(rows, per_row, figsize=(1.9 * per_row + 0.6, 2.05 * rows + 0.7), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(view)
    axes.flat[0].set_title("<image>", fontsize=9)
    shown = None
    for ax, word, m in zip(list(axes.flat)[1:], words, maps):
        ax.imshow(view)
        shown = ax.imshow(upsample(m, size), cmap="jet", alpha=0.5, extent=(0, size, size, 0), vmin=0.0, vmax=vmax)
        ax.set_title(word, fontsize=10)
    width = 20 * per_row  # characters that fit the figure's width at this font size
    scale = f"one colour scale for all panels: attention weight of an image patch, 0 to {vmax:.3g}"
    lines = [line for t in (title, note, scale) if t
             for line in textwrap.wrap(t, width, max_lines=3, placeholder=" ...")]
    fig.suptitle("\n".join(lines), fontsize=9.5)
    fig.tight_layout(rect=(0, 0, 1 - 0.5 / fig.get_figwidth(), 1))
    if shown is not None:
        bar = fig.colorbar(shown, ax=list(axes.flat), fraction=0.012, pad=0.01)
        bar.set_label("attention weight", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    return fig


def pointing_table_plot(tables: dict[str, dict], chance: float) -> Figure:
    """Pointing accuracy per layer for each series (``{label: {layer: accuracy}}``, a label per model or per model
    and query) against the chance rate."""
    fig, ax = plt.subplots(figsize=(8.5, 3.4))
    width = 0.8 / max(1, len(tables))
    for j, (name, table) in enumerate(tables.items()):
        keys = list(table)
        ax.bar(np.arange(len(keys)) + j * width, [table[k] for k in keys], width, label=name)
        ax.set_xticks(np.arange(len(keys)) + width * (len(tables) - 1) / 2,
                      [f"layer {k}" if k != "mean" else "mean of layers" for k in keys])
    ax.axhline(chance, color="k", ls="--", lw=1, label=f"chance {chance:.2f}")
    ax.set(ylabel="pointing accuracy", ylim=(0, 1), title="does the peak of a colour / shape word's map hit it?")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return fig


def attention_browser(entries: dict[str, dict], show: bool = True):
    """An ipywidgets browser over attention maps: image, model, layer, heads and a slider over the words.

    ``entries``: ``{"<image> / <model>": {"view": PIL image, "words": [...], "maps": (W, L, H, rows, cols),
    "layers": [layer labels], "layer": the layer shown first (default: the last)}}``. It redraws from these maps
    only; nothing is recomputed. Widget state does not survive papermill / HTML export: notebooks draw the static
    grids as well. Returns the widget (displayed when ``show``). The colour scale runs from 0 to the largest weight
    among the image's words in the chosen layer and heads, as in :func:`word_attention`.

    Each view is drawn off-screen into a PNG that an ``Image`` widget shows, not into an ``Output`` widget: under
    ipykernel 7, a cell that drew into an ``Output`` widget lost its execute reply in about one run of six, and the
    notebook's runner waited for it for ever (docs/rehearsal.md, "The hang of notebook 04")."""
    import io

    import ipywidgets as w
    from IPython.display import display
    from matplotlib.figure import Figure

    from .attention import aggregate, upsample

    pick = w.Dropdown(options=list(entries), description="image / model", style={"description_width": "initial"})
    layer = w.Dropdown(description="layer")
    heads = w.Dropdown(description="heads")
    word = w.IntSlider(description="word", min=0)
    image = w.Image(format="png", layout=w.Layout(width="360px"))
    note = w.Label()
    swapping = [False]  # while the options of another image are put in place, a value change must not draw

    def choose(control, options, keep, default):
        """ipywidgets 8 selects nothing when options are replaced: keep the value where it still exists."""
        values = [v for _, v in options]
        control.options = options
        control.value = keep if keep in values else default

    def refresh_options():
        e = entries[pick.value]
        swapping[0] = True
        try:
            layers = [(f"{lab}", i) for i, lab in enumerate(e["layers"])] + [("mean", "mean")]
            choose(layer, layers, layer.value, e.get("layer", len(e["layers"]) - 1))
            head_options = [("mean", "mean"), ("max", "max")] + [(f"head {h}", h) for h in range(e["maps"].shape[2])]
            choose(heads, head_options, heads.value, "mean")
            word.max = max(0, len(e["words"]) - 1)
        finally:
            swapping[0] = False

    def draw(*_):
        if swapping[0]:
            return
        e = entries[pick.value]
        if not e["words"]:
            note.value, image.value = f"{pick.value}: no words", b""
            return
        every = aggregate(e["maps"], layer.value, heads.value)  # the scale: every word of this image and view
        m, vmax = every[word.value], max(float(every.max()), 1e-12)
        size = e["view"].size[0]
        fig = Figure(figsize=(4.2, 3.8))  # not pyplot's: nothing is shown, nothing is left open
        ax = fig.subplots()
        ax.imshow(e["view"])
        shown = ax.imshow(upsample(m, size), cmap="jet", alpha=0.5, extent=(0, size, size, 0), vmin=0.0, vmax=vmax)
        ax.set_title(f"{e['words'][word.value]!r}  (layer {layer.label}, heads {heads.label})", fontsize=9)
        ax.axis("off")
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.03).ax.tick_params(labelsize=7)
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=100)
        note.value, image.value = "", png.getvalue()

    pick.observe(lambda _: (refresh_options(), draw()), "value")
    for control in (layer, heads, word):
        control.observe(draw, "value")
    refresh_options()
    draw()
    box = w.VBox([w.HBox([pick, layer, heads]), word, note, image])
    if show:
        display(box)
    return box
