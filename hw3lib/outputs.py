"""What the notebooks hand each other, named once.

Every notebook writes into the run's output folder (``output_dir``) what a later one reads:

=====================================  ==========  =========================================================
file                                   written by  read by
=====================================  ==========  =========================================================
``p2/main/best.safetensors`` (+.json)  02          03, 04, 05: the captioner's adapter (:meth:`Run.adapter`)
``metrics/llava.json``                 01          03 (the sweep's rows), 04 (the best setting)
``metrics/captioner_training.json``    02          03 (the LoRA attempts)
``metrics/captioner.json``             03          04 (the decoding that was scored)
``p2_val_per_image.json``              03          05 (:meth:`Run.per_image`)
``metrics/attention.json``             04          05 (the layer and query shown: :meth:`Run.attention_view`)
=====================================  ==========  =========================================================

and every notebook starts the same way: :func:`start` reads its parameters and makes its figures folder.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .data import read_json

ADAPTER = Path("p2/main/best.safetensors")  # notebook 02's main run: its best epoch
PER_IMAGE = Path("p2_val_per_image.json")  # notebook 03: {file id: {caption, clipscore, cider}}


def read_metrics(output_dir: str | Path, section: str) -> dict | None:
    """What a notebook's :func:`hw3lib.report.save_metrics` wrote as ``section``, or None where it has not run."""
    path = Path(output_dir) / "metrics" / f"{section}.json"
    return read_json(path) if path.is_file() else None


@dataclass(frozen=True)
class Run:
    """The folders of one run: ``data_root`` (hw3_data) and ``output_dir``."""

    data_root: Path
    output_dir: Path

    @property
    def figures(self) -> Path:
        return self.output_dir / "figures"

    @property
    def decoder_checkpoint(self) -> str:
        """The course's GPT-2 decoder, which every adapter is read against (never copied into one)."""
        return str(self.data_root / "p2_data/decoder_model.bin")

    def adapter(self, given: str = "") -> Path:
        """``given`` when a notebook's ``adapter`` parameter names one, else notebook 02's best adapter."""
        return Path(given) if given else self.output_dir / ADAPTER

    def metrics(self, section: str) -> dict | None:
        return read_metrics(self.output_dir, section)

    def per_image(self) -> dict:
        """Notebook 03's caption and scores of every val image; an error naming 03 where it has not run."""
        path = self.output_dir / PER_IMAGE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: run notebook 03 first (it writes the per-image scores)")
        return read_json(path)

    def attention_view(self) -> tuple[dict, str]:
        """Notebook 04's choice for the figures: ``({model: layer shown}, the captioner's query)``; ``({},
        "predict")`` where 04 has not run."""
        chosen = self.metrics("attention") or {}
        return chosen.get("layer_shown", {}), chosen.get("query_shown", {}).get("captioner", "predict")


def start(namespace: dict):
    """A notebook's first lines: ``(P, run)``, its parameters (:func:`hw3lib.params.read`) and its :class:`Run`,
    with the figures folder made."""
    from .params import read

    P = read(namespace)
    run = Run(Path(P.data_root), Path(P.output_dir))
    run.figures.mkdir(parents=True, exist_ok=True)
    return P, run


def clip_scorer(model: str, pretrained: str = ""):
    """The :class:`~hw3lib.metrics.ClipScorer` of the ``clip_model`` / ``clip_pretrained`` parameters (an open_clip
    name with its tag, or a folder with ``""``); None without a model."""
    from .metrics import ClipConfig, ClipScorer

    return ClipScorer(ClipConfig(model=model, pretrained=pretrained or None)) if model else None
