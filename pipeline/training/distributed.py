"""Processes started by torchrun: who we are, the process group, and the few collectives training needs.

The pipeline runs unchanged under ``torchrun --nproc_per_node N -m pipeline run ...``: :func:`launch`
joins the process group that torchrun describes in the environment (gloo on CPU, NCCL on GPU), and
:func:`world` tells library code its rank and the number of processes. Work that only rank 0 does
runs under :func:`solo`, where the world is a single process, so it never waits on a collective that
the other ranks will not join. Outside torchrun every helper here is a no-op for one process.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipeline.errors import ConfigError, PipelineError


@dataclass(frozen=True)
class World:
    """This process's place among the processes training together."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.size > 1


_SINGLE = World()
_WORLD: ContextVar[World] = ContextVar("pipeline_world")


def world() -> World:
    return _WORLD.get(_SINGLE)


@contextmanager
def solo() -> Iterator[World]:
    """Run the block as a world of one (rank 0's private work while the other ranks are elsewhere)."""
    token = _WORLD.set(_SINGLE)
    try:
        yield _SINGLE
    finally:
        _WORLD.reset(token)


def resolve_device(name: str) -> torch.device:
    """The device this process trains on; under torchrun a GPU process uses ``cuda:LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"device {name!r} was requested but CUDA is not available; use --set device=cpu")
    current = world()
    if device.type == "cuda" and current.is_distributed:
        if device.index is not None:
            raise ConfigError(
                "under torchrun every process uses its own GPU (cuda:LOCAL_RANK); "
                f"pass --device cuda or auto, not {name}"
            )
        if current.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"torchrun started local rank {current.local_rank} but this node has {torch.cuda.device_count()} "
                "GPU(s); set --nproc_per_node to at most the number of GPUs"
            )
        device = torch.device("cuda", current.local_rank)
    return device


@contextmanager
def launch(device_name: str) -> Iterator[World]:
    """Join torchrun's process group for the block (nothing to do for a single process).

    The group is left in place when the block raises: the other ranks are then blocked in a collective,
    torchrun stops them when this process exits, and a clean teardown could wait for them forever.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_available() and dist.is_initialized():  # embedded in a program that set up its own group
        token = _WORLD.set(World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))))
        try:
            yield world()
        finally:
            _WORLD.reset(token)
        return
    if size <= 1:
        yield world()
        return
    if not dist.is_available():
        raise PipelineError("this PyTorch build has no torch.distributed; run without torchrun")
    current = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    token = _WORLD.set(current)
    try:
        device = resolve_device(device_name)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
        yield current
        dist.destroy_process_group()
    finally:
        _WORLD.reset(token)


def backend() -> str:
    return dist.get_backend() if world().is_distributed else "none"


def barrier() -> None:
    if world().is_distributed:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place (on the training device: NCCL needs CUDA tensors)."""
    if world().is_distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (small picklable values: decisions, tokens)."""
    if not world().is_distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    if not world().is_distributed:
        return [obj]
    out: list[Any] = [None] * world().size
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics drift apart when each rank sees its own data)."""
    if world().is_distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def check_shared_folder(path: Path) -> None:
    """Fail early when the run folder is not on storage every rank sees (multi-node without a shared FS).

    The ranks read upstream artifacts and resume state from the run folder that rank 0 writes.
    """
    current = world()
    if not current.is_distributed:
        return
    probe = path / f".shared-probe-{broadcast_object(secrets.token_hex(8) if current.is_main else None)}"
    if current.is_main:
        probe.touch()
    barrier()
    seen = all_gather_object(probe.exists())
    barrier()
    if current.is_main:
        probe.unlink(missing_ok=True)
    missing = [rank for rank, ok in enumerate(seen) if not ok]
    if missing:
        raise ConfigError(
            f"the run folder {path} is not visible to rank(s) {missing}; with several nodes, --out must be on "
            "a filesystem every node mounts at the same path (NFS, Lustre, ...)"
        )
