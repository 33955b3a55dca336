"""Results that matter, written as JSON with stable names next to the executed notebooks.

Each notebook calls :func:`save_metrics` with its section name (``"clip_check"``, ``"captioner"`` ...); the
workbook runner merges every section into ``outputs/<profile>/metrics.json``.
"""
from __future__ import annotations

import json
from pathlib import Path

from .data import write_json_atomic


CUDA_PEAK_ENV = "HW3_CUDA_PEAK_FILE"  # set by the workbook runner for each notebook's kernel


def save_metrics(output_dir: str | Path, section: str, values: dict) -> None:
    """Write ``values`` as ``<output_dir>/metrics/<section>.json`` (atomically). Nothing is returned: as a
    notebook's last line it shows no output.

    In a kernel started by the workbook runner, it also records PyTorch's CUDA memory peaks so far (see
    :func:`record_cuda_peak`): notebooks save their metrics at the end of their work."""
    path = Path(output_dir) / "metrics" / f"{section}.json"
    write_json_atomic(path, values)
    record_cuda_peak()


def record_cuda_peak() -> None:
    """Write ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` (GiB) of this process to the file that
    ``$HW3_CUDA_PEAK_FILE`` names: what the tensors needed, apart from the allocator's cache and the CUDA context."""
    import os
    import sys

    target = os.environ.get(CUDA_PEAK_ENV)
    torch = sys.modules.get("torch")
    if not target or torch is None or not torch.cuda.is_initialized():
        return
    gib = 2**30
    write_json_atomic(Path(target), {"allocated_gib": round(torch.cuda.max_memory_allocated() / gib, 2),
                                     "reserved_gib": round(torch.cuda.max_memory_reserved() / gib, 2)})


def merge_metrics(output_dir: str | Path, extra: dict | None = None) -> dict:
    """Merge every ``metrics/<section>.json`` into ``metrics.json``; returns the merged dict."""
    output_dir = Path(output_dir)
    merged = dict(extra or {})
    for path in sorted((output_dir / "metrics").glob("*.json")):
        merged[path.stem] = json.loads(path.read_text())
    write_json_atomic(output_dir / "metrics.json", merged)
    return merged
