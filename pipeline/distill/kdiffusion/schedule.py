"""Noise schedules on the K-step reverse grid and the DDPM posterior coefficients (spec §4-5).

Notation follows the spec: ``alpha_bar[k]`` is α̂ at grid point τ_k, a *standard-deviation* factor
(the square root of DDPM's ᾱ), with ``alpha_bar[0] = 1``; β̂² = 1 - α̂². Everything is computed in
float64 Python floats, so the chain can multiply tensors of any dtype by exact constants.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.registry import Registry

__all__ = ["SCHEDULES", "Schedule", "cosine_grid", "linear1000", "make_schedule", "posterior"]


def posterior(alpha_bar_k: float, alpha_bar_s: float) -> tuple[float, float, float]:
    """``(u, v, w/σ²)`` of q(x_s | x_k, x_0) = N(u·x_k + v·x_0, w) for grid points s < k (spec eq. 10).

    With α̂_{k|s} = α̂_k/α̂_s and β̂²_{k|s} = 1 - α̂²_{k|s}:
    u = α̂_{k|s} β̂_s² / β̂_k²,  v = α̂_s β̂²_{k|s} / β̂_k²,  w = β̂²_{k|s} β̂_s² / β̂_k² · σ².
    """
    if not 0.0 <= alpha_bar_k < alpha_bar_s <= 1.0:
        raise ValueError(f"need 0 <= alpha_bar_k < alpha_bar_s <= 1, got {alpha_bar_k}, {alpha_bar_s}")
    a_ks = alpha_bar_k / alpha_bar_s
    beta2_k, beta2_s, beta2_ks = 1.0 - alpha_bar_k**2, 1.0 - alpha_bar_s**2, 1.0 - a_ks**2
    return a_ks * beta2_s / beta2_k, alpha_bar_s * beta2_ks / beta2_k, beta2_ks * beta2_s / beta2_k


@dataclass(frozen=True)
class Schedule:
    """α̂ on the grid τ_0..τ_K and the per-step coefficients of reverse step k (τ_k -> τ_{k-1}).

    Lists ``a``, ``c``, ``u``, ``v``, ``w`` are indexed 1..K (index 0 is an unused 0.0), so code reads
    like the spec's equations.
    """

    name: str
    alpha_bar: tuple[float, ...]

    def __post_init__(self) -> None:
        ab = self.alpha_bar
        if len(ab) < 2 or ab[0] != 1.0 or any(b >= a for a, b in itertools.pairwise(ab)) or ab[-1] < 0.0:
            raise ValueError(f"alpha_bar must start at 1 and decrease strictly to >= 0, got {ab}")

    @property
    def steps(self) -> int:
        return len(self.alpha_bar) - 1

    @property
    def a(self) -> list[float]:
        return [0.0] + [self.alpha_bar[k] / self.alpha_bar[k - 1] for k in range(1, self.steps + 1)]

    @property
    def c(self) -> list[float]:
        return [0.0] + [math.sqrt(1.0 - a * a) for a in self.a[1:]]

    @property
    def beta2(self) -> list[float]:
        return [1.0 - b * b for b in self.alpha_bar]

    def _posterior(self, i: int) -> list[float]:
        return [0.0] + [posterior(self.alpha_bar[k], self.alpha_bar[k - 1])[i] for k in range(1, self.steps + 1)]

    @property
    def u(self) -> list[float]:
        return self._posterior(0)

    @property
    def v(self) -> list[float]:
        return self._posterior(1)

    @property
    def w(self) -> list[float]:
        """Posterior variance of each step in units of σ_S²."""
        return self._posterior(2)


def cosine_grid(steps: int, s: float = 0.008, zero_terminal: bool = True) -> Schedule:
    """Nichol & Dhariwal's cosine schedule evaluated at τ = k/K, as a std factor; α̂_K forced to 0 [D11]."""
    if steps < 1:
        raise ValueError(f"the reverse chain needs at least 1 step, got {steps}")
    f0 = math.cos(math.pi / 2 * s / (1 + s))
    ab = [math.cos(math.pi / 2 * (k / steps + s) / (1 + s)) / f0 for k in range(steps + 1)]
    ab[0] = 1.0
    ab[-1] = 0.0 if zero_terminal else max(ab[-1], 0.0)
    return Schedule("cosine", tuple(ab))


def linear1000(steps: int, n: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
    """DDPM's linear β on n = 1000 steps, α̂_t = sqrt(ᾱ_t), read on the grid τ_k = round(k·n/K)."""
    if not 1 <= steps <= n:
        raise ValueError(f"the reverse chain needs 1..{n} steps, got {steps}")
    log_abar = [0.0]
    for t in range(n):
        beta = beta_start + (beta_end - beta_start) * t / (n - 1)
        log_abar.append(log_abar[-1] + math.log1p(-beta))
    return Schedule("linear1000", tuple(math.exp(0.5 * log_abar[round(k * n / steps)]) for k in range(steps + 1)))


SCHEDULES: Registry[Callable[[int], Schedule]] = Registry("schedule")
SCHEDULES.register(cosine_grid, name="cosine")
SCHEDULES.register(linear1000, name="linear1000")


def make_schedule(name: str, steps: int) -> Schedule:
    return SCHEDULES.get(name)(steps)
