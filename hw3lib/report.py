"""Results that matter, written as JSON with stable names next to the executed notebooks.

Each notebook calls :func:`save_metrics` with its section name (``"clip_check"``, ``"captioner"`` ...); the
workbook runner merges every section into ``outputs/<profile>/metrics.json``.
"""
from __future__ import annotations

import json
from pathlib import Path

from .data import write_json_atomic


def save_metrics(output_dir: str | Path, section: str, values: dict) -> Path:
    """Write ``values`` as ``<output_dir>/metrics/<section>.json`` (atomically) and return the path."""
    path = Path(output_dir) / "metrics" / f"{section}.json"
    write_json_atomic(path, values)
    return path


def merge_metrics(output_dir: str | Path, extra: dict | None = None) -> dict:
    """Merge every ``metrics/<section>.json`` into ``metrics.json``; returns the merged dict."""
    output_dir = Path(output_dir)
    merged = dict(extra or {})
    for path in sorted((output_dir / "metrics").glob("*.json")):
        merged[path.stem] = json.loads(path.read_text())
    write_json_atomic(output_dir / "metrics.json", merged)
    return merged
