"""Rank helpers for multi-process runs (``torchrun`` / ``accelerate launch``, on one node or several): who
downloads, who publishes, and how every rank agrees to stop at the same step.

The ranks, as torchrun's environment gives them (the same on Vertex AI worker pools and Kubeflow TrainJobs,
which start torchrun on every node):

- ``RANK`` / ``WORLD_SIZE``: the global rank and the number of processes over all nodes. Data is sharded by
  these (accelerate gives process ``RANK`` every ``WORLD_SIZE``-th batch); only global rank 0 publishes the
  artifact and the checkpoints; RNG states are saved per global rank (``rng_state_<RANK>.pth``).
- ``LOCAL_RANK`` / ``LOCAL_WORLD_SIZE``: the rank and the number of processes on this node. The GPU is chosen
  by ``LOCAL_RANK``; the node's work folder (local disk) is shared by its processes, and local rank 0 of
  each node downloads the checkpoint to resume from and uploads its node's RNG states.
- ``GROUP_RANK`` (torchrun's node rank; ``NODE_RANK`` as accelerate names it): which node this is.
"""
from __future__ import annotations

import os


def distributed():
    """torch.distributed when a multi-process run (accelerate/torchrun) has initialised it, else None."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def global_rank() -> int:
    return _env_int("RANK", 0)


def world_size() -> int:
    return _env_int("WORLD_SIZE", 1)


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


def local_world_size() -> int:
    return _env_int("LOCAL_WORLD_SIZE", world_size())


def node_rank() -> int:
    return _env_int("GROUP_RANK", _env_int("NODE_RANK", 0))


def node_count() -> int:
    """Nodes of this run: ``WORLD_SIZE / LOCAL_WORLD_SIZE`` (torchrun starts the same number on every node)."""
    return max(world_size() // max(local_world_size(), 1), 1)


def topology() -> dict[str, int]:
    """``{"nodes", "processes_per_node", "world_size"}`` of this run, as saved beside every checkpoint."""
    return {"nodes": node_count(), "processes_per_node": local_world_size(), "world_size": world_size()}


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
    """True on global rank 0 only (on every node, ``LOCAL_RANK`` 0 is not enough: only one process publishes)."""
    return global_rank() == 0


def is_node_leader() -> bool:
    """True on local rank 0 of every node: the process that does its node's local-disk work."""
    return local_rank() == 0


def wait_for_everyone() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
