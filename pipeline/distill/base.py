"""The distiller contract shared by every method, and the registry methods join by name.

Imports no method: a stage that only needs the contract (``teacher`` trains with the vanilla one) must not
depend on every method's code (pipeline.artifacts.code_version); ``pipeline.distill.catalog`` loads them all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from pipeline.registry import Registry


@dataclass(frozen=True)
class Bound:
    """The interval a numeric method option must lie in (``open`` ends exclude the bound itself).

    Every numeric option of every method declares one, next to the method (``Distiller.option_bounds``), so
    ``temperature=0`` or ``nce_k=10**12`` is refused before any stage runs, not when ``train`` builds the method
    after the teacher has trained.
    """

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def problem(self, value: float) -> str:
        """Why ``value`` is outside the interval, or ``""``."""
        if not math.isfinite(value):
            return "must be a finite number"
        too_low = value <= self.low if self.low_open else value < self.low
        too_high = value >= self.high if self.high_open else value > self.high
        if too_low or too_high:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"must be in {left}{self.low:g}, {self.high:g}{right}"
        return ""


WEIGHT = Bound(0.0, 1e6)  # a loss weight: 0 turns the term off
TEMPERATURE = Bound(0.0, 1e4, low_open=True)
EPOCHS = Bound(0.0, 1e5)  # warm-up lengths


class Distiller(nn.Module):
    """Student + frozen teacher + training-only modules.

    Subclasses put their own trainable modules on ``self`` (they then live in the distiller's
    state_dict, never in the student's) and implement :meth:`losses`.
    """

    requires_teacher = True
    # Methods with per-sample state (CRD's memory bank) set this: they are built with ``num_samples``
    # (the training set's size) and the training loop passes each sample's dataset index as ``indices=``.
    needs_indices = False
    # The frozen teacher's forward runs under ``torch.inference_mode`` (no autograd bookkeeping at all) in
    # the methods that call :meth:`teacher_grad_off`; benchmarks turn this off to time it against ``no_grad``.
    teacher_inference_mode = True
    # Methods that read the teacher only through :meth:`teacher_outputs` (one eval-mode forward: its logits and
    # its tapped features): their teacher may run as a graph optimized for inference (``training.teacher_graph``).
    teacher_graph_ok: ClassVar[bool] = False
    # The allowed interval of each numeric option (its type comes from the ``__init__`` annotation).
    option_bounds: ClassVar[dict[str, Bound]] = {}

    def __init__(self, student: nn.Module, teacher: nn.Module | None):
        super().__init__()
        self.student = student
        # Not registered as a submodule: the teacher is neither trained nor saved with the method.
        object.__setattr__(self, "teacher", teacher)
        self._graph_wanted = False
        self._teacher_graphs: dict[tuple, nn.Module | None] = {}  # per tap set, made on its first batch
        self.teacher_graph_note = ""  # why the teacher runs as itself although a graph was wanted
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)
        self.progress = 0.0  # training progress in epochs (fractional), for warm-ups

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def _apply(self, fn, recurse: bool = True) -> Distiller:
        # The one hook behind to(), cuda(), cpu(), half() and friends: the unregistered teacher follows them all.
        if self.teacher is not None:
            self.teacher._apply(fn, recurse)
            self._teacher_graphs = {}  # traced from the old weights: made again
        return super()._apply(fn, recurse)

    def teacher_grad_off(self) -> AbstractContextManager:
        """The context for the teacher's forward: ``inference_mode`` (cheaper) or ``no_grad``.

        Tensors made under ``inference_mode`` may be read by autograd-tracked ops outside it, but not saved
        for their backward; a loss that would save one raw must clone it first.
        """
        return torch.inference_mode() if self.teacher_inference_mode else torch.no_grad()

    def use_teacher_graph(self) -> None:
        """Run :meth:`teacher_outputs` through the teacher traced as a graph optimized for inference
        (:func:`pipeline.models.inference_graph.inference_graph`), made from the first batch it sees."""
        if not self.teacher_graph_ok:
            raise ValueError(f"{type(self).__name__} reads its teacher other than by one eval-mode forward")
        self._graph_wanted = True

    def teacher_outputs(self, images: torch.Tensor, taps: Sequence = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The teacher's logits for ``images`` and its features at ``taps`` (:class:`~pipeline.models.spec.Tap`),
        without autograd (:meth:`teacher_grad_off`)."""
        from pipeline.distill.features import TappedModel, tapped_forward  # not for the stages that need no method

        taps = tuple(taps)
        if self._graph_wanted and taps not in self._teacher_graphs and not self.teacher_graph_note:
            from pipeline.models.inference_graph import inference_graph

            self._teacher_graphs[taps], self.teacher_graph_note = inference_graph(
                TappedModel(self.teacher, taps), images
            )
        graph = self._teacher_graphs.get(taps)
        with self.teacher_grad_off():
            if graph is None:
                return tapped_forward(self.teacher, taps, images)
            logits, *features = graph(images)
            return logits, features

    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's logits for ``images``, without autograd (:meth:`teacher_outputs`)."""
        return self.teacher_outputs(images)[0]

    def set_progress(self, epochs: float) -> None:
        self.progress = epochs

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The student's and the method's own parameters (the teacher is frozen)."""
        return [p for p in self.parameters() if p.requires_grad]

    @classmethod
    def check_args(cls, args: dict) -> None:
        """Raise ``ValueError`` for option values the method would refuse; checked before any model is built."""

    def reparam_settings(self) -> dict:
        """How the method changed the student's structure (saved in checkpoint metadata); ``{}`` if not."""
        return {}

    def notes(self) -> list[str]:
        """Departures from the method's usual behaviour that the run log should show (e.g. a train-mode teacher)."""
        return []

    def forward(
        self, images: torch.Tensor, targets: torch.Tensor, *extra: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``extra`` holds the batch items after ``(images, targets)``, e.g. sample indices for CRD."""
        return self.losses(images, targets, *extra)

    def losses(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError


METHODS: Registry[type[Distiller]] = Registry("method")
register_method = METHODS.register
