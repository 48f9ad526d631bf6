"""What a running training reports: TensorBoard scalars, the epoch log line, and the overall ETA.

Only rank 0 reports. Event files go to ``<run>/tensorboard/<stage>/``, outside the hashed stage
folder: they are logs, not artifacts, and they must survive a crash. After a resume, TensorBoard is
told to drop the killed run's points past the checkpoint (``purge_step``), so the curves continue
without a doubled stretch.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

from pipeline.progress import format_duration

LOSS_TAG = "train/loss/{}"


def _wait_for_a_later_second(logdir: Path) -> None:
    """TensorBoard reads event files in name order, and a name is the creation second then a writer
    count: a resume within the killed run's second could sort first (``.10`` before ``.9``), and the
    killed run's ``purge_step`` marker would then drop the resumed points."""
    fields = [path.name.split(".")[3] for path in logdir.glob("events.out.tfevents.*")]
    seconds = [int(field) for field in fields if field.isdigit()]
    wait = max(seconds, default=0) + 1 - time.time()
    if 0 < wait <= 2:  # a file from a clock far ahead cannot be waited out
        time.sleep(wait)


class Monitor:
    """TensorBoard writer for rank 0 (a no-op without a folder); step-level losses averaged over ``every`` steps."""

    def __init__(self, logdir: Path | None, every: int, purge_step: int):
        self.writer = None
        self.every = every
        self._sums: dict[str, float] = defaultdict(float)
        self._count = 0
        if logdir is not None:
            from torch.utils.tensorboard import SummaryWriter

            logdir.mkdir(parents=True, exist_ok=True)
            _wait_for_a_later_second(logdir)
            self.writer = SummaryWriter(str(logdir), purge_step=purge_step)

    def step(self, global_step: int, losses: dict[str, float], lr: float, steps: int = 1) -> None:
        """Record the mean losses of the ``steps`` steps that end at ``global_step``."""
        if self.writer is None:
            return
        for key, value in losses.items():
            self._sums[key] += value * steps
        self._count += steps
        if global_step % self.every == 0:
            for key, total in self._sums.items():
                self.writer.add_scalar(LOSS_TAG.format(key), total / self._count, global_step)
            self.writer.add_scalar("train/loss", sum(self._sums.values()) / self._count, global_step)
            self.writer.add_scalar("train/lr", lr, global_step)
            self._sums.clear()
            self._count = 0

    def epoch(self, global_step: int, record: dict) -> None:
        if self.writer is None:
            return
        scalars = {
            "train/top1": record.get("train_top1"),
            "train/images_per_s": record.get("images_per_s"),
            "train/lr": record.get("lr"),
            "val/top1": record.get("val_top1"),
            "val/loss": record.get("val_loss"),
            **{f"epoch/loss/{k[len('loss/') :]}": v for k, v in record.items() if k.startswith("loss/")},
        }
        for tag, value in scalars.items():
            if value is not None:
                self.writer.add_scalar(tag, value, global_step)
        self.flush()

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def epoch_line(desc: str, epoch: int, epochs: int, record: dict, eta_s: float) -> str:
    figures = " ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch" and isinstance(v, int | float))
    return f"{desc} epoch {epoch}/{epochs}: {figures} eta={format_duration(eta_s)}"
