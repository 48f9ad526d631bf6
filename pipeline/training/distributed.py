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


DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def check_device(name: str) -> torch.device | None:
    """The device ``name`` stands for (``None`` for auto); only the CPU and CUDA GPUs are supported, so ``meta``,
    ``mps`` or ``xla`` are refused here rather than failing inside a stage."""
    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index):
        shown = name if len(name) <= 40 else name[:37] + "..."
        raise ConfigError(f"unknown device {shown!r}; use {DEVICE_CHOICES}")
    return device


def check_available(device: torch.device | None, name: str) -> None:
    """A CUDA device asked for where this process sees none (no GPU, or ``CUDA_VISIBLE_DEVICES`` hides them)."""
    if device is not None and device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was requested but CUDA is not available; use --set device=cpu")


def device_type(name: str) -> str:
    """The kind of device (``cpu`` or ``cuda``) a run with ``device=name`` trains on, without claiming one."""
    device = check_device(name)
    return device.type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(name: str) -> torch.device:
    """The device this process trains on; under torchrun a GPU process uses ``cuda:LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = check_device(name)
    check_available(device, name)
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


_TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def torchrun_world_size() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 without torchrun), refusing a partial or malformed environment: a
    stray ``WORLD_SIZE=4`` in a shell must not leave the run waiting for processes that never start."""
    raw = os.environ.get("WORLD_SIZE", "1").strip() or "1"
    ints = {key: os.environ.get(key, "0").strip() for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    ints["WORLD_SIZE"] = raw
    for key, value in ints.items():
        if not (value.isdigit() and len(value) <= 6):
            raise ConfigError(f"{key}={value[:20]!r} is not a process number; start the run with torchrun")
    size = int(raw)
    if size < 1:
        raise ConfigError(f"WORLD_SIZE={raw} must be at least 1")
    if size > 1 and not (dist.is_available() and dist.is_initialized()):
        missing = [key for key in _TORCHRUN_ENV if not os.environ.get(key)]
        if missing:
            raise ConfigError(
                f"WORLD_SIZE={size} is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not; "
                "start distributed runs with torchrun (or unset WORLD_SIZE)"
            )
    return size


@contextmanager
def launch(device_name: str) -> Iterator[World]:
    """Join torchrun's process group for the block (nothing to do for a single process).

    The group is left in place when the block raises: the other ranks are then blocked in a collective,
    torchrun stops them when this process exits, and a clean teardown could wait for them forever.
    """
    size = torchrun_world_size()
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
    if not 0 <= current.rank < size:
        raise ConfigError(f"RANK={current.rank} is outside WORLD_SIZE={size}; start the run with torchrun")
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
