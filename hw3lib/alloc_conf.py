"""PyTorch's CUDA allocator settings that ``hw3`` asks for, without importing torch: torch reads them once, at the
process's first CUDA allocation, so they are set before anything could make one."""
from __future__ import annotations

import os

# the names torch reads, in its order (c10/cuda/CUDAAllocatorConfig.h): the first that is set is the one used
NAMES = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def expandable_segments() -> bool:
    """Let PyTorch's CUDA allocator grow its segments in place (``expandable_segments:True``), unless one of
    :data:`NAMES` is set already (then that setting stays). Near a card's limit the default allocator strands blocks
    that a batch freed and the next one cannot reuse: on a 12 GB card (10.5 GiB cap) 4-bit greedy at batch 16 ran out
    of memory with 8.9 GiB in use and 1.4 GiB cached but free, and passed with this, at 1.44x the images/s of batch 8
    (docs/benchmarks.md, issue 26). Returns whether expandable segments are on."""
    if not any(os.environ.get(name) for name in NAMES):
        os.environ[NAMES[0]] = "expandable_segments:True"
    used = next(os.environ[name] for name in NAMES if os.environ.get(name))
    return "expandable_segments:true" in used.replace(" ", "").lower()
