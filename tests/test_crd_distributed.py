"""CRD's memory banks stay identical across DDP ranks: each rank applies the whole global batch."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.distill import build_distiller
from pipeline.models import build_model

pytestmark = pytest.mark.xdist_group("subprocess")

CLASSES, SAMPLES, BATCH = 4, 32, 8


def _setup():
    torch.manual_seed(0)
    teacher = build_model("resnet20", CLASSES).eval()
    torch.manual_seed(1)
    student = build_model("resnet20", CLASSES)
    distiller = build_distiller("crd", student, teacher, {"nce_k": 8}, num_samples=SAMPLES).train()
    student.eval()  # running BN statistics: a half batch then embeds each sample exactly as the whole batch does
    gen = torch.Generator().manual_seed(2)
    images = torch.randn(BATCH, 3, 32, 32, generator=gen)
    targets = torch.arange(BATCH) % CLASSES
    indices = torch.randperm(SAMPLES, generator=gen)[:BATCH]
    return distiller, images, targets, indices


def _rank(rank: int, port: int, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        distiller, images, targets, indices = _setup()
        half = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
        distiller(images[half], targets[half], indices[half])
        # numpy copies: tensors sent through a queue share memory that dies with this process
        queue.put((rank, *(t.numpy().copy() for t in (distiller.memory_s, distiller.memory_t, distiller.labels))))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # 60 s here (2 CPU cores, one thread)
def test_banks_match_a_single_process_step_on_the_global_batch():
    torch.set_num_threads(1)
    distiller, images, targets, indices = _setup()
    with torch.no_grad():  # single process, whole batch: the reference bank update
        distiller(images, targets, indices)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, rest) for r, *rest in (queue.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank in (0, 1):
        memory_s, memory_t, labels = (torch.from_numpy(a) for a in results[rank])
        torch.testing.assert_close(memory_s, distiller.memory_s, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(memory_t, distiller.memory_t, atol=1e-6, rtol=1e-5)
        assert torch.equal(labels, distiller.labels)
    assert not torch.equal(distiller.memory_s[indices], _setup()[0].memory_s[indices])  # the step moved the bank
