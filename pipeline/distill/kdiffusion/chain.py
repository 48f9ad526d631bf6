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

__all__ = ["STEP_WEIGHTS", "TARGET_MODES", "forward_states", "reverse_chain_loss", "step_weights"]

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
