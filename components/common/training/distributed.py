"""Rank helpers for multi-process runs (``torchrun`` / ``accelerate launch``): who downloads, who publishes,
and how every rank agrees to stop at the same step."""
from __future__ import annotations

import os


def distributed():
    """torch.distributed when a multi-process run (accelerate/torchrun) has initialised it, else None."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def any_process(flag: bool) -> bool:
    """True on every process if ``flag`` is true on any: all ranks must stop (and save) at the same step,
    or the collective ops of the save would hang."""
    dist = distributed()
    if dist is None:
        return flag
    import torch

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def is_main_process() -> bool:
    """False on every process but the first of a multi-process run (``accelerate launch``/``torchrun``)."""
    return int(os.environ.get("RANK", "0")) == 0


def wait_for_everyone() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
