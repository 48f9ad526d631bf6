"""The per-layer reverse chain over the student branches and its per-step L2 loss (spec §6).

The m branches (already bridged into standardized teacher space) are the x0-predictions of a K = m step
deterministic reverse process [D10, D12]: it starts at branch π_K ("x^T_n := x^S_n", exact because the
default schedule has α̂_K = 0) and each step k takes the DDPM posterior mean with branch π_k as x0:

    z_K = s_{π_K};   P_k = u_k z_k + v_k s_{π_k};   z_{k-1} = P_k.

The targets are the same posterior means on the teacher side, T_k = u_k x^T_{τ_k} + v_k x^T_0, built
without gradient from one of three readings of the noisy teacher state x^T_{τ_k} [D13]:

- ``mean`` (default): its expectation α̂_k x^T_0, unbiased (every L_k is 0 when every branch is x^T_0);
- ``student_noise``: the literal eq. 4 forward process with the detached branch π_k as the noise of step k;
- ``gaussian``: α̂_k x^T_0 + β̂_k ξ with fresh ξ ~ N(0, I).

L_diff = Σ_k weight_k · mean((P_k - T_k)²), uniform weights by default [D14].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.distill.kdiffusion.schedule import Schedule

__all__ = [
    "STEP_WEIGHTS",
    "TARGET_MODES",
    "batched_chain_loss",
    "chain_coefficients",
    "forward_states",
    "reverse_chain_loss",
    "step_weights",
]

TARGET_MODES = ("mean", "student_noise", "gaussian")
STEP_WEIGHTS = ("uniform", "kl_clipped", "x0")


def step_weights(schedule: Schedule, kind: str = "uniform") -> list[float]:
    """Per-step loss weights indexed 1..K: ``uniform`` 1, ``kl_clipped`` 1/(2·max(w_k/σ², 0.05)), ``x0`` 1/v_k²."""
    steps = range(1, schedule.steps + 1)
    if kind == "uniform":
        return [0.0] + [1.0 for _ in steps]
    if kind == "kl_clipped":
        return [0.0] + [1.0 / (2.0 * max(schedule.w[k], 0.05)) for k in steps]
    if kind == "x0":
        return [0.0] + [1.0 / schedule.v[k] ** 2 for k in steps]
    raise ValueError(f"unknown step_weight {kind!r}; choose one of: {', '.join(STEP_WEIGHTS)}")


@torch.no_grad()
def forward_states(
    x0: Tensor, branches: Sequence[Tensor], perm: Sequence[int], schedule: Schedule, mode: str = "mean"
) -> list[Tensor]:
    """The teacher-side states x^T_{τ_0..τ_K} of spec §6.2 (index k holds x^T_{τ_k}); never carry gradient."""
    ab = schedule.alpha_bar
    if mode == "mean":
        return [ab[k] * x0 for k in range(schedule.steps + 1)]
    if mode == "gaussian":
        return [ab[k] * x0 + (1.0 - ab[k] ** 2) ** 0.5 * torch.randn_like(x0) for k in range(schedule.steps + 1)]
    if mode == "student_noise":
        a, c = schedule.a, schedule.c
        states = [x0]
        for k in range(1, schedule.steps + 1):
            states.append(a[k] * states[-1] + c[k] * branches[perm[k - 1]].detach())
        return states
    raise ValueError(f"unknown target_mode {mode!r}; choose one of: {', '.join(TARGET_MODES)}")


def reverse_chain_loss(
    branches: Sequence[Tensor],
    x0: Tensor,
    schedule: Schedule,
    perm: Sequence[int],
    mode: str = "mean",
    weights: Sequence[float] | None = None,
) -> Tensor:
    """Σ_k weight_k · MSE(P_k, T_k) for one layer.

    Args:
        branches: The m bridged branch features s_i, each shaped like ``x0``.
        x0: The standardized teacher feature x^T_0 (no gradient).
        schedule: A schedule with K = m steps.
        perm: ``perm[k - 1]`` is the branch that serves reverse step k.
        mode: How the noisy teacher states are formed (:data:`TARGET_MODES`).
        weights: Per-step weights indexed 1..K (:func:`step_weights`); uniform when ``None``.
    """
    steps = schedule.steps
    if len(branches) != steps or sorted(perm) != list(range(steps)):
        raise ValueError(f"a {steps}-step chain needs {steps} branches and a permutation of them")
    weights = weights if weights is not None else step_weights(schedule)
    u, v = schedule.u, schedule.v
    states = forward_states(x0, branches, perm, schedule, mode)
    z = branches[perm[steps - 1]]
    loss = x0.new_zeros(())
    for k in range(steps, 0, -1):
        with torch.no_grad():
            target = u[k] * states[k] + v[k] * x0
        pred = v[k] * branches[perm[k - 1]] if u[k] == 0.0 else u[k] * z + v[k] * branches[perm[k - 1]]
        loss = loss + weights[k] * F.mse_loss(pred, target)
        z = pred
    return loss


def chain_coefficients(schedule: Schedule, perm: Sequence[int]) -> list[list[float]]:
    """The reverse chain unrolled: row ``k - 1`` holds P_k as a combination of the branches, P_k = Σ_i row[i] s_i.

    P_k = u_k z_k + v_k s_{π_k} with z_K = s_{π_K} and z_{k-1} = P_k is linear in the branches, so every
    step's prediction is one row of a K x m matrix of exact float64 constants.
    """
    steps = schedule.steps
    z = [0.0] * steps
    z[perm[steps - 1]] = 1.0
    rows: list[list[float]] = [[] for _ in range(steps)]
    for k in range(steps, 0, -1):
        row = [schedule.u[k] * c for c in z]
        row[perm[k - 1]] += schedule.v[k]
        rows[k - 1] = z = row
    return rows


def batched_chain_loss(
    branches: Tensor,
    x0: Tensor,
    schedule: Schedule,
    perm: Sequence[int],
    mode: str = "mean",
    weights: Sequence[float] | None = None,
) -> Tensor:
    """:func:`reverse_chain_loss` in a few batched kernels instead of a handful per step (same value up to rounding).

    ``branches`` is the stacked ``(m, ...)`` tensor. All K predictions come from one contraction with
    :func:`chain_coefficients`; with ``mode="mean"`` the targets are c_k x0, so they are one broadcast too.
    """
    steps = schedule.steps
    if branches.shape[0] != steps or sorted(perm) != list(range(steps)):
        raise ValueError(f"a {steps}-step chain needs {steps} branches and a permutation of them")
    weights = weights if weights is not None else step_weights(schedule)
    u, v, ab = schedule.u, schedule.v, schedule.alpha_bar
    # One small host-to-device copy per call: the coefficients (they change with perm), target factors, weights.
    table = [[*row, u[k] * ab[k] + v[k], weights[k]] for k, row in enumerate(chain_coefficients(schedule, perm), 1)]
    table = torch.tensor(table, dtype=branches.dtype).to(branches.device, non_blocking=True)
    coeffs, target_factor, step_weight = table[:, :steps], table[:, steps], table[:, steps + 1]
    preds = torch.tensordot(coeffs, branches, dims=1)  # (K, ...)
    with torch.no_grad():
        if mode == "mean":
            targets = target_factor.view(-1, *([1] * x0.dim())) * x0
        else:
            states = forward_states(x0, list(branches), perm, schedule, mode)
            targets = torch.stack([u[k] * states[k] + v[k] * x0 for k in range(1, steps + 1)])
    per_step = (preds - targets).pow(2).flatten(1).mean(1)
    return (per_step * step_weight).sum()
