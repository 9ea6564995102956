"""Distributed training through ``torchrun``: one process per device, the same code as one process.

``init_distributed()`` reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (set by ``torchrun``) and,
with more than one process, joins the default process group: NCCL on GPUs, Gloo on CPUs.
Launch with ``torchrun --nproc_per_node=N -m dynaslice.cli train CONFIG`` (multi-node: add
torchrun's ``--nnodes``/``--rdzv-*`` options; nothing here changes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def init_distributed(device: str = "auto") -> DistEnv:
    """The process's place in the job, read from the environment; joins the process group if needed.

    ``device``: ``auto`` (CUDA if available), ``cpu`` or ``cuda``. With CUDA each process uses
    ``cuda:LOCAL_RANK``.
    """
    rank, world, local = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is available; use train.device=cpu or auto")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    return DistEnv(rank, world, local, dev)


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_mean(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The mean of ``t`` over ranks (in place; returns ``t``)."""
    if env.distributed:
        dist.all_reduce(t)
        t /= env.world_size
    return t
