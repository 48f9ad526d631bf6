"""KDiffusion: progressive distillation through a re-parameterized diffusion reverse process.

X. Yao, F. Lu, Y. Zhang, X. Zhang, W. Zhao, B. Yu, "Progressively Knowledge Distillation via
Re-parameterizing Diffusion Reverse Process", AAAI 2024 (DOI 10.1609/aaai.v38i15.29579); implemented
from ``docs/kdiffusion-spec.md`` (decisions D1-D22 there).

The student's conv+BN at each chosen :class:`~pipeline.models.ReparamSite` becomes an m-branch block
(:mod:`pipeline.reparam.multibranch`); the branches' tapped features feed a K = m step reverse chain per
layer (:class:`DiffusionLayerLoss`), paired from the end with the teacher's stage taps. The objective is

    L = λ_ce·CE + λ_kd·T²·KL + r(epoch)·[λ_diff·Σ_l L_diff^(l) + λ_guided·L_guided],

with r the linear feature-loss warm-up [D19]. After training the blocks fuse into the plain student.
"""

from __future__ import annotations

import inspect
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.distill import register_method
from pipeline.distill.base import EPOCHS, TEMPERATURE, WEIGHT, Bound, Distiller
from pipeline.distill.features import teacher_head
from pipeline.distill.kd import kd_loss
from pipeline.distill.kdiffusion.chain import STEP_WEIGHTS, TARGET_MODES
from pipeline.distill.kdiffusion.loss import FEATURE_LOSSES, DiffusionLayerLoss, branch_features, guided_loss
from pipeline.distill.kdiffusion.schedule import SCHEDULES, make_schedule
from pipeline.errors import ConfigError
from pipeline.models.hooks import FeatureTaps
from pipeline.models.spec import ReparamSite, Tap
from pipeline.reparam.multibranch import apply_multibranch, branch_tap

__all__ = ["KDiffusion", "KDiffusionMulti", "KDiffusionSingle", "KDiffusionSingleAverage"]


@register_method(name="kdiffusion")
class KDiffusion(Distiller):
    """KDiffusion, Multiple Layer + Target Guide (the paper's best row; the default method).

    The defaults are spec §10's; the variants ``kdiffusion_multi``, ``kdiffusion_single`` and
    ``kdiffusion_single_avg`` are this class with other defaults for ``layers``, ``feature_loss`` and
    ``lambda_guided``, and every option can be set on any of them.

    Args:
        m: Branches per block, which is also the number of reverse steps K.
        layers: How many of the deepest stages get a block and a chain (1: Single Layer, 3: Multiple Layer).
        feature_loss: ``chain`` (KDiffusion), ``average`` (Single Layer Average: L2 of the fused, bridged
            feature) or ``branch_average`` (the mean of the per-branch L2 losses).
        schedule: ``cosine`` (on the K-step grid, α̂_K = 0) or ``linear1000``.
        target_mode: ``mean``, ``student_noise`` (the literal eq. 4 targets) or ``gaussian``.
        step_weight: ``uniform``, ``kl_clipped`` or ``x0`` weights of the per-step losses.
        lambda_ce: Cross-entropy weight.
        lambda_kd: Hinton KD weight (off by default: the tabled feature methods run without it).
        temperature: KD temperature.
        lambda_diff: Weight of the summed feature losses of all layers.
        lambda_guided: Weight of the target-guided term at the final tap (0 turns it off).
        warmup_epochs: Epochs of linear warm-up of the feature terms (0: none).
        mixed_kernels: Make half of the branches 1x1 where the replaced conv is larger.
        scale_init: Start each branch's BN γ at √m so the branch mean keeps the layer's initial scale.
        batched_chain: Compute each layer's chain as a few batched kernels instead of step by step (a GPU
            speed option: the same loss up to float rounding).
    """

    teacher_graph_ok = True
    option_bounds: ClassVar[dict[str, Bound]] = {
        "m": Bound(1, 64),
        "layers": Bound(1, 16),
        "lambda_ce": WEIGHT,
        "lambda_kd": WEIGHT,
        "temperature": TEMPERATURE,
        "lambda_diff": WEIGHT,
        "lambda_guided": WEIGHT,
        "warmup_epochs": EPOCHS,
    }

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        m: int = 4,
        layers: int = 3,
        feature_loss: str = "chain",
        schedule: str = "cosine",
        target_mode: str = "mean",
        step_weight: str = "uniform",
        lambda_ce: float = 1.0,
        lambda_kd: float = 0.0,
        temperature: float = 4.0,
        lambda_diff: float = 1.0,
        lambda_guided: float = 0.1,
        warmup_epochs: float = 20.0,
        mixed_kernels: bool = False,
        scale_init: bool = False,
        batched_chain: bool = False,
    ):
        super().__init__(student, teacher)
        self.check_args(
            {
                "m": m,
                "layers": layers,
                "feature_loss": feature_loss,
                "schedule": schedule,
                "target_mode": target_mode,
                "step_weight": step_weight,
                "temperature": temperature,
                "warmup_epochs": warmup_epochs,
                "lambda_ce": lambda_ce,
                "lambda_kd": lambda_kd,
                "lambda_diff": lambda_diff,
                "lambda_guided": lambda_guided,
            }
        )
        self.m, self.layers, self.feature_loss, self.mixed_kernels = m, layers, feature_loss, mixed_kernels
        self.lambda_ce, self.lambda_kd, self.temperature = lambda_ce, lambda_kd, temperature
        self.lambda_diff, self.lambda_guided, self.warmup_epochs = lambda_diff, lambda_guided, warmup_epochs
        self.sites, teacher_stages = _paired_taps(student, teacher, layers)
        self.teacher_head = teacher_head(teacher)
        if lambda_guided and self.teacher_head is None:
            raise ConfigError(
                "the target-guided term needs the teacher's head after its last tap (forward_head(), or a Linear "
                "classifier on pooled features); this teacher has none: set student.method_args.lambda_guided=0"
            )
        apply_multibranch(student, self.sites, m=m, mixed_kernels=mixed_kernels, scale_init=scale_init)
        self.student_taps = {}
        for layer, site in enumerate(self.sites):
            self.student_taps[f"tap{layer}"] = site.tap
            self.student_taps[f"out{layer}"] = Tap(site.conv)
            for i in range(m):
                self.student_taps[f"branch{layer}.{i}"] = branch_tap(site, i)
        self.teacher_taps = {f"tap{layer}": tap for layer, tap in enumerate(teacher_stages)}
        student_chs, teacher_chs = self._probe_channels()
        steps = m if feature_loss == "chain" else 1
        self.layer_losses = nn.ModuleList(
            DiffusionLayerLoss(
                cs, ct, make_schedule(schedule, steps), target_mode, step_weight, feature_loss, batched_chain
            )
            for cs, ct in zip(student_chs, teacher_chs)
        )

    @classmethod
    def check_args(cls, args: dict) -> None:
        """Option values, checked on their own (the runner calls this before any stage runs)."""
        options = {
            p.name: p.default
            for p in inspect.signature(cls.__init__).parameters.values()
            if p.default is not inspect.Parameter.empty
        }
        options.update(args)
        for key in ("m", "layers"):
            if not isinstance(options[key], int) or isinstance(options[key], bool) or options[key] < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {options[key]!r}")
        for key, valid in (
            ("feature_loss", FEATURE_LOSSES),
            ("schedule", SCHEDULES.names()),
            ("target_mode", TARGET_MODES),
            ("step_weight", STEP_WEIGHTS),
        ):
            if options[key] not in valid:
                raise ValueError(f"unknown {key} {options[key]!r}; choose one of: {', '.join(valid)}")
        for key in ("lambda_ce", "lambda_kd", "lambda_diff", "lambda_guided"):
            if not options[key] >= 0:
                raise ValueError(f"{key} must be >= 0, got {options[key]!r}")
        if not options["temperature"] > 0:
            raise ValueError(f"temperature must be positive, got {options['temperature']!r}")
        if not options["warmup_epochs"] >= 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {options['warmup_epochs']!r}")

    def notes(self) -> list[str]:
        """For a student whose sites were found automatically: which ones, and which stages have none and why."""
        info = getattr(self.student, "info", None)
        if getattr(info, "family", "") not in ("timm", "torchvision"):
            return []
        skipped = info.extra.get("skipped_sites") or []
        return [f"KDiffusion sites: {', '.join(s.conv for s in self.sites)}"] + [
            f"KDiffusion site skipped: {reason}" for reason in skipped
        ]

    def reparam_settings(self) -> dict:
        return {
            "kind": "multibranch",
            "sites": [[site.conv, site.bn] for site in self.sites],
            "m": self.m,
            "mixed_kernels": self.mixed_kernels,
        }

    def warmup_factor(self) -> float:
        """r(epoch) = min(1, epoch / E_warm), evaluated at fractional epochs so it rises every step."""
        return 1.0 if self.warmup_epochs <= 0 else min(1.0, self.progress / self.warmup_epochs)

    def losses(self, images: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        with FeatureTaps(self.student, self.student_taps) as student_taps:
            logits = self.student(images)
        teacher_logits, teacher_features = self.teacher_outputs(images, self.teacher_taps.values())
        out = {"ce": self.lambda_ce * F.cross_entropy(logits, targets)}
        if self.lambda_kd:
            out["kd"] = self.lambda_kd * kd_loss(logits, teacher_logits, self.temperature)
        ramp = self.warmup_factor()
        feature = logits.new_zeros((), dtype=torch.float32)
        for layer, loss_fn in enumerate(self.layer_losses):
            result = loss_fn(self.student_features(student_taps.features, layer), teacher_features[layer])
            feature = feature + result.loss
        out["diff" if self.feature_loss == "chain" else "avg"] = ramp * self.lambda_diff * feature
        if self.lambda_guided:
            with torch.autocast(images.device.type, enabled=False):
                guided = guided_loss(
                    result.x_hat,
                    result.mu,
                    result.sd,
                    self.teacher_head,
                    teacher_logits.to(result.x_hat.dtype, copy=True),  # saved for backward: no inference tensor
                )
            out["guided"] = ramp * self.lambda_guided * guided
        return logits, out

    def student_features(self, features: dict[str, Tensor], layer: int) -> Tensor:
        """``(m, B, C, H, W)`` branch features of one layer; ``(1, ...)`` holding the fused one for ``average``."""
        tapped = features[f"tap{layer}"]
        if self.feature_loss == "average":
            return tapped.unsqueeze(0)
        branches = [features[f"branch{layer}.{i}"] for i in range(self.m)]
        return branch_features(tapped, features[f"out{layer}"], branches, self.sites[layer].embed)

    @torch.no_grad()
    def _probe_channels(self) -> tuple[list[int], list[int]]:
        """Channels of every paired tap, from one eval-mode pass; also checks that each site's embed fits its tap."""
        size = self.student.info.input_size
        param = next(self.student.parameters())
        images = torch.zeros(2, 3, size, size, device=param.device, dtype=param.dtype)
        student_mode = self.student.training
        self.student.eval()
        try:
            with FeatureTaps(self.student, self.student_taps) as student_taps:
                self.student(images)
            with FeatureTaps(self.teacher, self.teacher_taps) as teacher_taps:
                self.teacher(images.to(next(self.teacher.parameters()).device))
        finally:
            self.student.train(student_mode)
        features, student_chs = student_taps.features, []
        for layer, site in enumerate(self.sites):
            branches = [features[f"branch{layer}.{i}"] for i in range(self.m)]
            try:
                feats = branch_features(features[f"tap{layer}"], features[f"out{layer}"], branches, site.embed)
            except ValueError as exc:
                raise ConfigError(f"re-parameterization site {site.conv} of {self.student.info.name}: {exc}") from None
            student_chs.append(feats.shape[2])
        teacher_chs = [teacher_taps.features[f"tap{layer}"].shape[1] for layer in range(len(self.sites))]
        return student_chs, teacher_chs


def _paired_taps(student: nn.Module, teacher: nn.Module, layers: int) -> tuple[list[ReparamSite], list[Tap]]:
    """The deepest ``layers`` student sites and teacher stages, paired from the end [D3]."""
    sites = list(getattr(getattr(student, "info", None), "reparam_sites", ()))
    stages = list(getattr(getattr(teacher, "info", None), "stages", ()))
    student_name = getattr(getattr(student, "info", None), "name", type(student).__name__)
    teacher_name = getattr(getattr(teacher, "info", None), "name", type(teacher).__name__)
    if len(sites) < layers:
        skipped = getattr(getattr(student, "info", None), "extra", {}).get("skipped_sites") or []
        why = f" ({'; '.join(skipped)})" if skipped else ""
        hint = f": set student.method_args.layers={len(sites)} to branch the deepest {len(sites)}" if sites else ""
        raise ConfigError(
            f"student {student_name} declares {len(sites)} re-parameterization sites{why}; KDiffusion with "
            f"layers={layers} needs {layers}{hint}"
        )
    if len(stages) < layers:
        raise ConfigError(f"teacher {teacher_name} declares {len(stages)} stage taps; layers={layers} needs {layers}")
    return sites[-layers:], stages[-layers:]


def _variant(name: str, class_name: str, doc: str, **defaults) -> type[KDiffusion]:
    """A registered KDiffusion preset: same options, other defaults (visible in its signature)."""

    def __init__(self, student, teacher, **kwargs):
        KDiffusion.__init__(self, student, teacher, **{**defaults, **kwargs})

    signature = inspect.signature(KDiffusion.__init__)
    __init__.__signature__ = signature.replace(
        parameters=[p.replace(default=defaults.get(p.name, p.default)) for p in signature.parameters.values()]
    )
    cls = type(class_name, (KDiffusion,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})
    return register_method(cls, name=name)


KDiffusionMulti = _variant(
    "kdiffusion_multi",
    "KDiffusionMulti",
    "KDiffusion, Multiple Layer: chains at the last 3 stages, no guide.",
    lambda_guided=0.0,
)
KDiffusionSingle = _variant(
    "kdiffusion_single",
    "KDiffusionSingle",
    "KDiffusion, Single Layer: one chain at the last conv+BN before pooling, no guide.",
    layers=1,
    lambda_guided=0.0,
)
KDiffusionSingleAverage = _variant(
    "kdiffusion_single_avg",
    "KDiffusionSingleAverage",
    "KDiffusion control, Single Layer Average: m branches, L2 on the fused bridged feature, no chain.",
    layers=1,
    feature_loss="average",
    lambda_guided=0.0,
)
