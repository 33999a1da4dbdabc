"""Multi-process training helpers for ``torchrun`` (``torch.distributed`` + DDP).

The engine (:func:`graphmil.train.fit`) detects an initialised process group and then wraps the
model in :class:`torch.nn.parallel.DistributedDataParallel` and shards the training bags with
:class:`torch.utils.data.distributed.DistributedSampler`. Launch with::

    torchrun --nproc_per_node 2 -m graphmil train --config cfg.yaml
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "cleanup_distributed", "dist_info", "is_main_process",
           "barrier", "broadcast_object"]


@dataclass
class DistInfo:
    """Where this process stands: ``rank``, ``world_size``, ``local_rank``, ``is_distributed``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    is_distributed: bool = False


def dist_info() -> DistInfo:
    """The current process group's rank / world size (``DistInfo()`` when not distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return DistInfo(dist.get_rank(), dist.get_world_size(),
                        int(os.environ.get("LOCAL_RANK", dist.get_rank())), True)
    return DistInfo()


def init_distributed(backend: Optional[str] = None) -> DistInfo:
    """Initialise the default process group from ``torchrun``'s environment (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) when ``WORLD_SIZE > 1``; a no-op otherwise.

    Args:
        backend (str, optional): ``"gloo"`` or ``"nccl"`` (default: ``nccl`` with CUDA, else ``gloo``).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and dist.is_available() and not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist_info()


def cleanup_distributed() -> None:
    """Destroy the default process group if one is initialised."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """``True`` on rank 0 (and when not distributed): the process that writes files."""
    return dist_info().rank == 0


def barrier() -> None:
    """``dist.barrier()`` when distributed, else nothing."""
    if dist_info().is_distributed:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (identity when not distributed)."""
    if not dist_info().is_distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
