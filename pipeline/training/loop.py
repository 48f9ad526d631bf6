"""The training loop every training stage uses (teacher and student alike).

It trains a :class:`Distiller` for a fixed recipe on one process or many (torchrun + DDP), evaluates
on the held-out split each epoch, and keeps full resume state in the stage's scratch folder, so a
killed run continues where its last checkpoint left off. The final model is the last epoch's (never
selected on the test set).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from pipeline.config import OptimConfig, TrainingConfig
from pipeline.distill import Distiller
from pipeline.errors import CheckpointError, ConfigError, PipelineError, out_of_memory
from pipeline.progress import progress_bar
from pipeline.training import speed
from pipeline.training.data import EpochSampler, ShardSampler, mix_seed
from pipeline.training.device_data import DeviceLoader
from pipeline.training.distributed import all_gather_object, all_reduce_sum, broadcast_buffers, world
from pipeline.training.monitor import Monitor, epoch_line
from pipeline.training.state import FORMAT, RESUME_FILE, capture_rng, load_state, restore_rng, save_state, seed_rng


class NonFiniteLossError(PipelineError):
    exit_code = 1


class TrainingOutOfMemoryError(PipelineError):
    """The device ran out of memory; the message suggests a smaller batch."""


@dataclass
class History:
    epochs: list[dict] = field(default_factory=list)

    @property
    def last(self) -> dict:
        return self.epochs[-1] if self.epochs else {}


SCHEDULES = ("step", "cosine")


MAX_EPOCHS = 100_000


def check_optim(cfg: OptimConfig, where: str) -> None:
    """Refuse a recipe that SGD or the schedule would reject, or silently misread, before any training."""
    problems = []
    if not 1 <= cfg.epochs <= MAX_EPOCHS:
        problems.append(f"epochs must be in [1, {MAX_EPOCHS}], got {cfg.epochs}")
    if not cfg.lr > 0:
        problems.append(f"lr must be positive, got {cfg.lr}")
    if not 0 <= cfg.momentum < 1:
        problems.append(f"momentum must be in [0, 1), got {cfg.momentum}")
    if cfg.nesterov and cfg.momentum == 0:
        problems.append("nesterov needs a momentum > 0")
    if not cfg.weight_decay >= 0:
        problems.append(f"weight_decay must be >= 0, got {cfg.weight_decay}")
    if not cfg.lr_decay > 0:
        problems.append(f"lr_decay must be positive, got {cfg.lr_decay}")
    if any(not 0 <= m <= MAX_EPOCHS for m in cfg.milestones) or len(cfg.milestones) > 1000:
        problems.append(f"milestones must be at most 1000 epochs in [0, {MAX_EPOCHS}], got {cfg.milestones!s:.80}")
    if cfg.schedule not in SCHEDULES:
        problems.append(f"schedule must be one of {', '.join(SCHEDULES)}, got {cfg.schedule!r}")
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))


def build_optimizer(params: list[nn.Parameter], cfg: OptimConfig, impl: str = "auto") -> torch.optim.Optimizer:
    """SGD; ``impl`` picks the kernels only (the update and the state dict are the same, up to float rounding)."""
    return torch.optim.SGD(
        params,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        nesterov=cfg.nesterov,
        **speed.OPTIMIZER_IMPLS[impl],
    )


def lr_factor(epoch: int, cfg: OptimConfig) -> float:
    """The learning rate of a (0-based) epoch over the base rate: step decay at milestones, or cosine to zero."""
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / max(cfg.epochs, 1)))
    return cfg.lr_decay ** sum(epoch >= m for m in cfg.milestones)


def lr_at(epoch: int, cfg: OptimConfig) -> float:
    return cfg.lr * lr_factor(epoch, cfg)


def _out_of_memory(where: str, batch: int) -> TrainingOutOfMemoryError:
    current = world()
    per_rank = batch // current.size
    return TrainingOutOfMemoryError(
        f"out of memory {where} with {per_rank} images per process (data.batch_size={batch} over {current.size} "
        f"process(es)); use a smaller batch, e.g. --set data.batch_size={max(batch // 2, current.size)}, "
        "or training.amp=bf16 to halve activation memory"
    )


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, desc: str = "eval") -> dict[str, float]:
    """Top-1 (%) and mean cross-entropy; with a sharded loader (under torchrun) summed over the ranks."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, correct, count
    try:
        for batch in _bar(loader, desc, leave=False):
            images, targets = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
            logits = model(images)
            sums[0] += F.cross_entropy(logits.float(), targets, reduction="sum")
            sums[1] += (logits.argmax(1) == targets).sum()
            sums[2] += targets.numel()
    except RuntimeError as exc:
        if not out_of_memory(exc):
            raise
        raise TrainingOutOfMemoryError(
            f"out of memory in {desc} with batches of {loader.batch_size}; lower data.eval_batch_size"
        ) from None
    if isinstance(loader.sampler, ShardSampler):
        all_reduce_sum(sums)
    model.train(was_training)
    loss, correct, total = sums.tolist()
    return {"top1": 100.0 * correct / max(total, 1), "loss": loss / max(total, 1)}


def _bar(loader: Iterable, desc: str, total: int | None = None, leave: bool = True) -> Iterable:
    return progress_bar(loader, desc=desc, total=total, leave=leave) if world().is_main else loader


def fit(
    distiller: Distiller,
    train_loader: DataLoader | DeviceLoader,
    val_loader: DataLoader | None,
    cfg: OptimConfig,
    device: torch.device,
    scratch: Path | None = None,
    log: Callable[[str], None] = print,
    desc: str = "train",
    seed: int = 0,
    training: TrainingConfig | None = None,
    logdir: Path | None = None,
    test_loader: DataLoader | None = None,
) -> History:
    """Train for ``cfg.epochs`` epochs, resuming from the state in ``scratch`` if there is one.

    With ``test_loader`` each epoch's record also holds the test top-1, for reporting the best epoch
    beside the last one (labelled as such); nothing is selected on it.

    ``train_loader`` must come from :func:`~pipeline.training.make_loader` (its sampler makes the data
    order resumable). Under torchrun every rank calls this; rank 0 alone writes the resume state and
    the TensorBoard events (``logdir``).
    """
    training = training or TrainingConfig()
    speed.check_training(training, device)
    if speed.AUTO in (training.amp, training.channels_last):
        log(f"{desc}: {speed.describe(training, device)}")
        training = speed.resolve(training, device)
    if not isinstance(getattr(train_loader, "sampler", None), EpochSampler):
        raise TypeError("fit() needs a training loader built by pipeline.training.make_loader(train=True)")
    with speed.backend_flags(training, device):
        try:
            trainer = _Trainer(
                distiller,
                train_loader,
                val_loader,
                cfg,
                training,
                device,
                scratch,
                log,
                desc,
                seed,
                logdir,
                test_loader,
            )
        except RuntimeError as exc:
            if not out_of_memory(exc):
                raise
            raise _out_of_memory(f"setting up {desc} on {device}", train_loader.sampler.batch_size) from None
        return trainer.run()


def _like(saved: object, made: object, what: str) -> None:
    """``saved`` has the form of ``made``, a fresh object's state dict: torch's ``load_state_dict`` of schedulers,
    scalers and optimizer groups takes any values, and training then fails steps later."""
    where = _mismatch(saved, made, "", skip="params")
    if where is not None:
        joint = ": " if where and not where.startswith("[") else ""
        raise ValueError(f"{what}{joint}{where} is not of the form this run's is")


def _mismatch(saved: object, made: object, at: str, skip: str = "") -> str | None:
    """Where ``saved`` first differs from ``made`` in type, keys or length ('' for the top), or None if nowhere."""
    if type(saved) is not type(made) or (isinstance(made, list | tuple | dict) and len(saved) != len(made)):  # type: ignore[arg-type]
        return at
    if isinstance(made, dict):
        if set(saved) != set(made):  # type: ignore[arg-type]
            return at
        inner = ((f"{at}.{k}" if at else str(k), saved[k], v) for k, v in made.items() if k != skip)  # type: ignore[index]
    elif isinstance(made, list | tuple):
        inner = ((f"{at}[{i}]", a, b) for i, (a, b) in enumerate(zip(saved, made)))  # type: ignore[call-overload]
    else:
        return None
    return next((w for where, a, b in inner if (w := _mismatch(a, b, where, skip)) is not None), None)


class _Trainer:
    def __init__(
        self,
        distiller: Distiller,
        train_loader: DataLoader | DeviceLoader,
        val_loader: DataLoader | None,
        optim: OptimConfig,
        training: TrainingConfig,
        device: torch.device,
        scratch: Path | None,
        log: Callable[[str], None],
        desc: str,
        seed: int,
        logdir: Path | None,
        test_loader: DataLoader | None = None,
    ):
        self.world = world()
        self.distiller, self.train_loader, self.val_loader = distiller, train_loader, val_loader
        self.sampler: EpochSampler = train_loader.sampler
        self.optim, self.training, self.device = optim, training, device
        self.log, self.desc, self.seed = log, desc, seed
        self.resume_path = scratch / RESUME_FILE if scratch is not None else None
        self.memory_format = speed.memory_format(training)

        distiller.to(device, memory_format=self.memory_format)
        if training.teacher_graph and distiller.teacher_graph_ok:
            distiller.use_teacher_graph()
            log(
                f"{desc}: the teacher is traced on the first batch into a graph optimized for inference "
                "(training.teacher_graph)"
            )
        self.graph_note_logged = False
        use_sync_bn = training.sync_bn and self.world.is_distributed
        self.batchnorms = speed.convert_sync_batchnorm(distiller) if use_sync_bn else {}
        if training.compile:
            speed.compile_models(distiller.student, distiller.teacher)
        self.optimizer = build_optimizer(distiller.trainable_parameters(), optim, training.optimizer_impl)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda epoch: lr_factor(epoch, optim))
        self.scaler = speed.grad_scaler(training, device)

        self.history = History()
        self.test_loader = test_loader
        self.epoch = self.step = self.global_step = 0
        self.partial: dict = {}
        self._resume()
        self.model: nn.Module = distiller
        if self.world.is_distributed:
            self.model = DistributedDataParallel(
                distiller,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=training.find_unused_parameters,
            )
        if training.cuda_graphs:
            self.model = speed.graphed(self.model)
        # Points up to the checkpoint's step were logged before it was saved; later ones are a killed run's.
        self.monitor = Monitor(
            logdir if training.tensorboard and self.world.is_main else None, training.log_every, self.global_step + 1
        )

    # -- resume state -------------------------------------------------------------------------------

    def _resume(self) -> None:
        state = load_state(self.resume_path) if self.resume_path is not None else None
        if state is None:
            seed_rng(mix_seed(self.seed, self.world.rank))
            return
        try:  # the file is this stage's own, but an edit or another tool's file must not end in a traceback
            self._check_state(state)
            self.distiller.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            self.history.epochs = state["history"]
            self.epoch, self.step, self.global_step = state["epoch"], state["step"], state["global_step"]
            self.partial = state["partial"]
            rngs = state["rng"]
            if len(rngs) == self.world.size:
                restore_rng(rngs[self.world.rank], self.device)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as exc:
            raise CheckpointError(
                f"the resume state {self.resume_path} does not fit this stage ({type(exc).__name__}: "
                f"{str(exc).strip()[:200]}); delete it to restart the stage"
            ) from None
        where = f"epoch {self.epoch + 1}, step {self.step}" if self.step else f"the end of epoch {self.epoch}"
        if len(rngs) == self.world.size:
            self.log(f"{self.desc}: resumed at {where} from {self.resume_path}")
        else:
            seed_rng(mix_seed(self.seed, self.world.rank, self.epoch, self.step))
            self.log(
                f"{self.desc}: resumed at {where} from {self.resume_path}, saved by {len(rngs)} process(es) and "
                f"continued by {self.world.size}: same data order, but not bit-exact"
            )

    def _check_state(self, state: dict) -> None:
        """The plain values of a resume state have the types and ranges that the loop reads later."""

        def count(value, high: float) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= high

        def number(value) -> bool:
            return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)

        position = (state["epoch"], state["step"], state["global_step"])
        if not (count(position[0], self.optim.epochs) and count(position[1], self.sampler.steps_per_epoch)):
            raise ValueError(f"position {position[:2]} is outside {self.optim.epochs} epochs of "
                             f"{self.sampler.steps_per_epoch} steps")  # fmt: skip
        if not count(position[2], 2**62):
            raise ValueError(f"global_step {position[2]!r} is not a step count")
        partial, history = state["partial"], state["history"]
        sums = partial.get("sums", {}) if isinstance(partial, dict) else None
        if not (isinstance(sums, dict) and all(isinstance(k, str) and number(v) for k, v in sums.items())) or not all(
            number(partial.get(k, 0.0)) for k in ("seen", "correct", "seconds")
        ):
            raise ValueError("the partial epoch's sums are not numbers")
        plain = str | int | float | bool | type(None)
        if not isinstance(history, list) or not all(
            isinstance(epoch, dict) and all(isinstance(k, str) and isinstance(v, plain) for k, v in epoch.items())
            for epoch in history
        ):
            raise ValueError("the history is not a list of epochs of plain values")
        if not isinstance(state["rng"], list):
            raise ValueError("the RNG states are not a list")
        optimizer = state["optimizer"]
        _like(optimizer["param_groups"], self.optimizer.state_dict()["param_groups"], "the optimizer's param_groups")
        _like(state["scheduler"], self.scheduler.state_dict(), "the LR schedule's state")
        _like(state["scaler"], self.scaler.state_dict(), "the AMP scaler's state")
        # torch's load_state_dict takes an optimizer's per-parameter state as it is, and its step then fails on it
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        per_param = optimizer["state"]
        for index, values in per_param.items():
            if not (isinstance(index, int) and 0 <= index < len(params) and isinstance(values, dict)):
                raise ValueError(f"the optimizer's state names parameter {index!r}, which it does not have")
            for name, value in values.items():
                if not isinstance(value, torch.Tensor) or (value.dim() and value.shape != params[index].shape):
                    raise ValueError(f"the optimizer's {name} of parameter {index} does not fit it")

    def _save(self) -> None:
        """Every rank contributes its RNG state; rank 0 writes the file."""
        if self.resume_path is None:
            return
        rngs = all_gather_object(capture_rng(self.device))
        if self.world.is_main:
            state = {
                "format": FORMAT,
                "epoch": self.epoch,
                "step": self.step,
                "global_step": self.global_step,
                "model": self.distiller.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": rngs,
                "world_size": self.world.size,
                "history": self.history.epochs,
                "partial": self.partial,
            }
            save_state(self.resume_path, state)
        self.monitor.flush()

    # -- training -----------------------------------------------------------------------------------

    def run(self) -> History:
        started, first = time.perf_counter(), self.epoch
        try:
            while self.epoch < self.optim.epochs:
                record = self._train_epoch()
                scored = (self.epoch + 1) % self.training.val_every == 0 or self.epoch + 1 == self.optim.epochs
                if self.val_loader is not None and scored:
                    broadcast_buffers(self.distiller)  # every rank evaluates rank 0's model
                    val = evaluate(self.distiller.student, self.val_loader, self.device, f"{self.desc} val")
                    record.update({f"val_{k}": v for k, v in val.items()})
                if self.test_loader is not None:
                    test = evaluate(self.distiller.student, self.test_loader, self.device, f"{self.desc} test")
                    record.update({f"test_{k}": v for k, v in test.items()})
                self.history.epochs.append(record)
                self.scheduler.step()
                self.epoch, self.step, self.partial = self.epoch + 1, 0, {}
                self._save()
                eta = (time.perf_counter() - started) / (self.epoch - first) * (self.optim.epochs - self.epoch)
                self.log(epoch_line(self.desc, self.epoch, self.optim.epochs, record, eta))
                self.monitor.epoch(self.global_step, record)
        except RuntimeError as exc:  # torch.OutOfMemoryError, a cuDNN/cuBLAS allocation failure, a failed compile
            failed_compile = speed.compile_error(exc, self.training)
            if failed_compile is not None:
                raise failed_compile from None
            if not out_of_memory(exc):
                raise
            where = f"in {self.desc} at epoch {self.epoch + 1}, step {self.step + 1}"
            raise _out_of_memory(where, self.sampler.batch_size) from None
        finally:
            self.monitor.close()
            speed.restore_batchnorm(self.distiller, self.batchnorms)
        broadcast_buffers(self.distiller)
        return self.history

    def _train_epoch(self) -> dict:
        steps = self.sampler.steps_per_epoch
        self.sampler.set_epoch(self.epoch, self.step)
        self.model.train()
        self.sums: dict[str, float] = defaultdict(float, self.partial.get("sums", {}))
        self.seen, self.correct = self.partial.get("seen", 0.0), self.partial.get("correct", 0.0)
        seconds, tic = self.partial.get("seconds", 0.0), time.perf_counter()
        self.lr = self.optimizer.param_groups[0]["lr"]
        self.bar = _bar(
            self.train_loader, f"{self.desc} {self.epoch + 1}/{self.optim.epochs}", total=len(self.train_loader)
        )
        pending, block = None, 0  # this rank's metric sums not read yet, over ``block`` steps
        for batch in self.bar:
            stats = self._train_step(batch, steps)
            if self.distiller.teacher_graph_note and not self.graph_note_logged:
                self.log(f"{self.desc}: the teacher runs as a module, not a graph: {self.distiller.teacher_graph_note}")
                self.graph_note_logged = True
            pending = stats if pending is None else pending + stats
            self.step += 1
            self.global_step += 1
            block += 1
            every = self.training.checkpoint_every
            save = every and self.global_step % every == 0 and self.step < steps
            # Deferred: one host read per log interval (and before a save, so no checkpoint holds a NaN step).
            interval_end = self.step == steps or self.global_step % self.monitor.every == 0
            if not self.training.defer_metrics or save or interval_end:
                self._read_metrics(pending, block)
                pending, block = None, 0
            if save:
                elapsed = seconds + time.perf_counter() - tic
                self.partial = {"sums": dict(self.sums), "seen": self.seen, "correct": self.correct, "seconds": elapsed}
                self._save()
        seconds += time.perf_counter() - tic
        seen = self.seen
        return {
            "epoch": self.epoch + 1,
            "lr": self.lr,
            "train_top1": 100.0 * self.correct / max(seen, 1),
            "images_per_s": seen / max(seconds, 1e-9),
            **{f"loss/{k}": v / max(seen, 1) for k, v in self.sums.items()},
        }

    def _train_step(self, batch: tuple | list, steps: int) -> torch.Tensor:
        """One optimizer step; returns this rank's per-term loss sums, correct count and batch size, on the device.

        Nothing here waits for the device: the caller reads the figures (:meth:`_read_metrics`) every step,
        or every ``training.log_every`` steps with ``training.defer_metrics``.
        """
        images, targets, *extra = batch
        images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
        targets = targets.to(self.device, non_blocking=True)
        extra = [x.to(self.device, non_blocking=True) if isinstance(x, torch.Tensor) else x for x in extra]
        self.distiller.set_progress(self.epoch + self.step / steps)
        if self.training.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are consumed
        with speed.autocast(self.training, self.device):
            logits, losses = self.model(images, targets, *extra)
        self.loss_names = list(losses)
        n = targets.shape[0]
        stats = torch.stack(
            [
                *(value.detach().float() * n for value in losses.values()),
                (logits.detach().argmax(1) == targets).sum().float(),
                torch.full((), float(n), device=self.device),
            ]
        )
        loss = sum(value.float() for value in losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return stats

    def _read_metrics(self, pending: torch.Tensor, block: int) -> None:
        """Sum ``pending`` over the ranks (one collective), stop on a non-finite loss, and log the figures.

        Every rank reads at the same steps, so a non-finite loss on any rank stops all of them together.
        """
        *loss_sums, correct, seen = all_reduce_sum(pending).tolist()
        values = {key: total / seen for key, total in zip(self.loss_names, loss_sums)}
        bad = [key for key, value in values.items() if not math.isfinite(value)]
        if bad:
            first = self.global_step - block + 1
            when = (
                f"at epoch {self.epoch + 1}, step {self.step} (global step {self.global_step})"
                if block == 1
                else f"in epoch {self.epoch + 1}, steps {self.step - block + 1}-{self.step} (global steps "
                f"{first}-{self.global_step}; training.defer_metrics reads the losses once per interval)"
            )
            raise NonFiniteLossError(
                f"{self.desc}: non-finite loss term {', '.join(repr(k) for k in bad)} {when}: "
                + ", ".join(f"{k}={v:.4g}" for k, v in values.items())
                + f"; training stopped, {self.last_good()}; lower the learning rate or that loss's weight"
            )
        self.seen += seen
        self.correct += correct
        for key, value in values.items():
            self.sums[key] += value * seen
        self.monitor.step(self.global_step, values, self.lr, steps=block)
        if self.bar is not self.train_loader:
            self.bar.set_postfix(loss=f"{sum(values.values()):.3f}", refresh=False)

    def last_good(self) -> str:
        if self.resume_path is None or not self.resume_path.is_file():
            return "no checkpoint was saved yet"
        return f"the last good checkpoint is kept in {self.resume_path}"
