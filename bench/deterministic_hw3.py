"""``hw3`` with PyTorch's deterministic algorithms on (and cuBLAS's deterministic workspace): a launcher runs this
script instead of ``-m hw3lib`` to separate what sharding changes from what the GPU changes from run to run.

    CUBLAS_WORKSPACE_CONFIG=:4096:8 torchrun --nproc-per-node 2 bench/deterministic_hw3.py llava-caption ...
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

torch.use_deterministic_algorithms(True)

from hw3lib.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
