"""KDiffusion schedule and posterior coefficients: spec §4-5, invariants I1-I4."""

import itertools
import math

import numpy as np
import pytest

from pipeline.distill.kdiffusion.schedule import Schedule, cosine_grid, linear1000, make_schedule, posterior
from pipeline.errors import ConfigError

# Spec §4: the default K = 4 cosine table, and the K = 2 / K = 8 / linear1000 rows.
COSINE4 = {
    "alpha_bar": [1, 0.9203, 0.7027, 0.3798, 0],
    "a": [0.9203, 0.7636, 0.5405, 0],
    "c": [0.3911, 0.6457, 0.8413, 1],
    "u": [0, 0.2308, 0.3197, 0],
    "v": [1, 0.7581, 0.5813, 0.3798],
    "w": [0, 0.1260, 0.4187, 0.8557],
}
COSINE2 = {"alpha_bar": [1, 0.7027, 0], "u": [0, 0], "v": [1, 0.7027]}
COSINE8 = {
    "alpha_bar": [1, 0.9787, 0.9203, 0.8272, 0.7027, 0.5517, 0.3798, 0.1936, 0],
    "u": [0, 0.2594, 0.4354, 0.5300, 0.5713, 0.5596, 0.4531, 0],
    "v": [1, 0.7400, 0.5601, 0.4547, 0.3876, 0.3392, 0.2921, 0.1936],
}
LINEAR4 = {
    "alpha_bar": [1, 0.7239, 0.2803, 0.0579, 0.0064],
    "u": [0, 0.2000, 0.1909, 0.1094],
    "v": [1, 0.6679, 0.2693, 0.0572],
}


def _values(schedule: Schedule, key: str) -> list[float]:
    return list(schedule.alpha_bar) if key == "alpha_bar" else getattr(schedule, key)[1:]


@pytest.mark.parametrize(
    ("schedule", "table"),
    [(cosine_grid(4), COSINE4), (cosine_grid(2), COSINE2), (cosine_grid(8), COSINE8), (linear1000(4), LINEAR4)],
    ids=["cosine4", "cosine2", "cosine8", "linear1000_4"],
)
def test_i1_spec_tables_are_reproduced(schedule, table):
    for key, expected in table.items():
        np.testing.assert_allclose(_values(schedule, key), expected, atol=1e-4, err_msg=key)


@pytest.mark.parametrize("schedule", [cosine_grid(k) for k in (1, 2, 4, 8)] + [linear1000(k) for k in (1, 4, 8)])
def test_i1_schedule_shape(schedule):
    ab = schedule.alpha_bar
    assert ab[0] == 1.0
    assert all(b < a for a, b in itertools.pairwise(ab))
    if schedule.name == "cosine":
        assert ab[-1] == 0.0
    else:
        assert 0.0 < ab[-1] < 0.01
    for k in range(1, schedule.steps + 1):
        assert schedule.a[k] ** 2 + schedule.c[k] ** 2 == pytest.approx(1.0, abs=1e-12)
    assert schedule.beta2 == pytest.approx([1 - b * b for b in ab], abs=1e-15)


@pytest.mark.parametrize("schedule", [cosine_grid(4), cosine_grid(8), linear1000(4)], ids=lambda s: s.name)
def test_i2_forward_recursion_equals_marginal(schedule):
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal(1000)
    eps = rng.standard_normal((schedule.steps + 1, 1000))
    ab, a, c = schedule.alpha_bar, schedule.a, schedule.c

    def ratio(k: int, i: int) -> float:  # α̂_k / α̂_i, written as a product so that α̂_K = 0 is fine
        return math.prod(a[j] for j in range(i + 1, k + 1))

    x = x0
    for k in range(1, schedule.steps + 1):
        x = a[k] * x + c[k] * eps[k]
        marginal = ab[k] * x0 + sum(ratio(k, i) * c[i] * eps[i] for i in range(1, k + 1))
        np.testing.assert_allclose(x, marginal, atol=1e-6)
        variance = sum(ratio(k, i) ** 2 * c[i] ** 2 for i in range(1, k + 1))
        assert variance == pytest.approx(1 - ab[k] ** 2, abs=1e-10)


@pytest.mark.parametrize("schedule", [cosine_grid(4), cosine_grid(8), linear1000(4)], ids=lambda s: s.name)
def test_i3_posterior_identities(schedule):
    ab, beta2 = schedule.alpha_bar, schedule.beta2
    for k in range(1, schedule.steps + 1):
        for s in range(k):
            a_ks = ab[k] / ab[s]
            assert a_ks**2 * beta2[s] + (1 - a_ks**2) == pytest.approx(beta2[k], abs=1e-12)
            u, v, _ = posterior(ab[k], ab[s])
            assert u * ab[k] + v == pytest.approx(ab[s], abs=1e-12)
    assert (schedule.u[1], schedule.v[1], schedule.w[1]) == (0.0, 1.0, 0.0)
    # The poster's eq. 10 with n = τ_k, n - t = τ_{k-1}, α̂_{n2t} := α̂_n / α̂_{n-t}.
    for k in range(1, schedule.steps + 1):
        n2t = ab[k] / ab[k - 1]
        b2_n2t = 1 - n2t**2
        assert schedule.u[k] == pytest.approx(beta2[k - 1] * n2t / beta2[k], abs=1e-12)
        assert schedule.v[k] == pytest.approx(b2_n2t * ab[k - 1] / beta2[k], abs=1e-12)
        assert schedule.w[k] == pytest.approx(b2_n2t * beta2[k - 1] / beta2[k], abs=1e-12)


@pytest.mark.parametrize(("k", "s"), [(4, 3), (3, 2), (2, 1), (4, 2)])
def test_i4_monte_carlo_posterior(k, s):
    """Sample x_s ~ q(·|x_0), x_k ~ q(·|x_s); regressing x_s on x_k recovers u, v·x_0 and w (σ = 1)."""
    ab = cosine_grid(4).alpha_bar
    rng = np.random.default_rng(k * 10 + s)
    n, x0 = 2_000_000, 0.7
    x_s = ab[s] * x0 + math.sqrt(1 - ab[s] ** 2) * rng.standard_normal(n)
    a_ks = ab[k] / ab[s]
    x_k = a_ks * x_s + math.sqrt(1 - a_ks**2) * rng.standard_normal(n)
    slope, intercept = np.polyfit(x_k, x_s, 1)
    residual = np.var(x_s - (slope * x_k + intercept))
    u, v, w = posterior(ab[k], ab[s])
    assert slope == pytest.approx(u, abs=3e-3)
    assert intercept == pytest.approx(v * x0, abs=3e-3)
    assert residual == pytest.approx(w, abs=3e-3)


def test_bad_schedules_are_refused():
    with pytest.raises(ValueError, match="decrease strictly"):
        Schedule("bad", (1.0, 0.5, 0.6))
    with pytest.raises(ValueError, match="at least 1 step"):
        cosine_grid(0)
    with pytest.raises(ConfigError, match="cosine, linear1000"):
        make_schedule("sigmoid", 4)
