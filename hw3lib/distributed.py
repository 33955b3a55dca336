"""Several processes (one per GPU) under an existing launcher: ``torchrun`` or ``accelerate launch``.

Both launchers start one process per GPU and set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`setup` reads them and joins the process group (NCCL on GPUs, gloo on the CPU). Without a
launcher it is one process and nothing here communicates. Only ``torch.distributed`` is used: no process pool of
our own.

    torchrun --nproc-per-node 2 -m hw3lib llava-caption IMAGES OUT.json
    accelerate launch --num-processes 2 -m hw3lib train ...
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str | None = None) -> torch.device:
        """This process's device: its own GPU under a launcher (``cuda:LOCAL_RANK``), else ``requested`` or the
        default (``cuda`` when there is one)."""
        if self.active and torch.cuda.is_available() and requested in (None, "cuda"):
            return torch.device("cuda", self.local_rank)
        return torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))

    def shard(self, items: list) -> list:
        """Every ``world_size``-th item from ``rank``: shards differ in length by one at most."""
        return items[self.rank :: self.world_size]

    def shard_batches(self, items: list, batch_size: int) -> list:
        """Every ``world_size``-th batch of ``batch_size`` items, from batch ``rank``, flattened: batched in order
        again, each process's items form exactly the batches one process would form, so the GPU computes the same
        thing and greedy decoding gives the same tokens as on one GPU (in bf16 a batch's composition changes the
        last bits of the logits, and near-ties can flip)."""
        batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
        return [x for b in batches[self.rank :: self.world_size] for x in b]

    def gather(self, obj) -> list:
        """``obj`` of every process, in rank order, on every process."""
        if not self.active:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """The main process's ``obj``, on every process."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def all_reduce_(self, tensors: list[torch.Tensor]) -> None:
        """Sum ``tensors`` over the processes, in place, in one flat message."""
        if not self.active or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def setup() -> Dist:
    """Join the launcher's process group (once) and return this process's place in it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_nccl = torch.cuda.is_available() and os.environ.get("HW3_DIST_BACKEND", "") != "gloo"
        if use_nccl:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_nccl else "gloo", rank=rank, world_size=world,
                                device_id=torch.device("cuda", local) if use_nccl else None)
        if not use_nccl:
            # gloo's worker threads still hold work when the interpreter is torn down, and now and then abort the
            # process at exit ("terminate called without an active exception", pytorch/pytorch#190489); a gloo
            # group is let go locally, so each process does it on its own while Python is still whole
            import atexit

            atexit.register(_leave_gloo_group)
    return Dist(rank, world, local)


def _leave_gloo_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def current() -> Dist:
    """The process group joined by :func:`setup`, or one process."""
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return Dist()


GPU_CAP_ENV = "HW3_GPU_CAP_GIB"


def apply_gpu_cap() -> float | None:
    """With ``HW3_GPU_CAP_GIB`` set (``hw3 run --gpu-cap``, or by hand for any ``hw3`` command), cap PyTorch's CUDA
    allocator in this process at that many GiB, so that a run that needs more fails with an out-of-memory error as
    it would on a smaller card: a 24 GB card is about 22 GiB for PyTorch, a 12 GB card 10.5 (the CUDA context and
    the driver take the rest). It caps what PyTorch allocates, not what other libraries take with their own
    allocators. Returns the cap, or None where none is set or there is no GPU."""
    text = os.environ.get(GPU_CAP_ENV, "")
    if not text or not torch.cuda.is_available():
        return None
    try:
        cap = float(text)
    except ValueError:
        raise ValueError(f"{GPU_CAP_ENV}={text!r}: expected a number of GiB") from None
    for i in range(torch.cuda.device_count()):
        total = torch.cuda.get_device_properties(i).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 2**30 / total), i)
    return cap
