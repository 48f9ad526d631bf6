"""The reverse chain, its targets and the per-layer losses (spec §2.3-2.4, §6-7): I5, I6, I8, I11, I12, I14."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.distill.kdiffusion.chain import forward_states, reverse_chain_loss, step_weights
from pipeline.distill.kdiffusion.loss import (
    DiffusionLayerLoss,
    align_spatial,
    branch_features,
    guided_loss,
    standardize,
)
from pipeline.distill.kdiffusion.schedule import cosine_grid, linear1000


def _closed_form(branches, x0, schedule, perm):
    """Spec §6.3: e_K = s_{π_K} - α̂_K x0, e_{k-1} = u_k e_k + v_k d_k, L = Σ_k mean(e_{k-1}²)."""
    K, u, v, ab = schedule.steps, schedule.u, schedule.v, schedule.alpha_bar
    e = branches[perm[K - 1]] - ab[K] * x0
    loss = 0.0
    for k in range(K, 0, -1):
        e = u[k] * e + v[k] * (branches[perm[k - 1]] - x0)
        loss = loss + (e**2).mean()
    return loss


@pytest.mark.parametrize("schedule", [cosine_grid(4), cosine_grid(8), linear1000(4)], ids=lambda s: s.name)
def test_i5_mean_mode_matches_the_closed_form(schedule):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 5, 4, 4, generator=gen, dtype=torch.float64)
    branches = [torch.randn(3, 5, 4, 4, generator=gen, dtype=torch.float64) for _ in range(schedule.steps)]
    perm = torch.randperm(schedule.steps, generator=gen).tolist()
    loss = reverse_chain_loss(branches, x0, schedule, perm, "mean")
    assert loss.item() == pytest.approx(_closed_form(branches, x0, schedule, perm).item(), abs=1e-10)


def test_i5_mean_mode_is_unbiased_with_zero_terminal_snr():
    x0 = torch.randn(4, 6, 3, 3, dtype=torch.float64)
    perm = [2, 0, 3, 1]
    cosine = reverse_chain_loss([x0.clone() for _ in range(4)], x0, cosine_grid(4), perm, "mean")
    assert cosine.item() < 1e-28
    # linear1000 keeps α̂_K > 0, so a chain started at a student feature carries the residual u_K·e_K.
    linear = reverse_chain_loss([x0.clone() for _ in range(4)], x0, linear1000(4), perm, "mean")
    assert linear.item() > 1e-4


def test_i6_student_noise_starts_at_the_first_served_branch():
    schedule = cosine_grid(4)
    x0 = torch.randn(2, 3, 4, 4)
    branches = [torch.randn(2, 3, 4, 4, requires_grad=True) for _ in range(4)]
    perm = [1, 3, 0, 2]
    states = forward_states(x0, branches, perm, schedule, "student_noise")
    assert torch.equal(states[4], branches[perm[3]].detach())  # x^T_{τ_K} == s_{π_K} == z_K, bit-exactly
    assert not any(s.requires_grad for s in states)
    assert torch.equal(states[0], x0)


def test_i8_targets_carry_no_gradient_and_every_branch_gets_one():
    schedule = cosine_grid(4)
    teacher = torch.randn(2, 3, 4, 4, requires_grad=True)
    x0, mu, sd = standardize(teacher)
    assert not (x0.requires_grad or mu.requires_grad or sd.requires_grad)
    for mode in ("mean", "gaussian", "student_noise"):
        branches = [torch.randn(2, 3, 4, 4, requires_grad=True) for _ in range(4)]
        assert not any(s.requires_grad for s in forward_states(x0, branches, [0, 1, 2, 3], schedule, mode))
        reverse_chain_loss(branches, x0, schedule, [3, 1, 0, 2], mode).backward()
        assert all(b.grad is not None and b.grad.abs().sum() > 0 for b in branches), mode
    assert teacher.grad is None


def test_gaussian_targets_are_noisy_but_centered():
    schedule = cosine_grid(4)
    x0 = torch.zeros(20000)
    states = forward_states(x0, [], [], schedule, "gaussian")
    for k in range(1, 5):
        assert states[k].mean().item() == pytest.approx(0.0, abs=0.03)
        assert states[k].var().item() == pytest.approx(schedule.beta2[k], abs=0.03)


def test_step_weights():
    schedule = cosine_grid(4)
    assert step_weights(schedule) == [0.0, 1.0, 1.0, 1.0, 1.0]
    assert step_weights(schedule, "kl_clipped")[1] == pytest.approx(10.0)  # w_1 = 0 is clipped to 0.05
    assert step_weights(schedule, "x0")[4] == pytest.approx(1 / 0.3798**2, rel=1e-3)
    with pytest.raises(ValueError, match="uniform, kl_clipped, x0"):
        step_weights(schedule, "snr")


def test_chain_refuses_a_wrong_branch_count():
    with pytest.raises(ValueError, match="4 branches"):
        reverse_chain_loss([torch.zeros(1)] * 3, torch.zeros(1), cosine_grid(4), [0, 1, 2])


def test_standardize_per_channel():
    t = torch.randn(8, 3, 5, 5) * torch.tensor([1.0, 10.0, 100.0]).view(1, 3, 1, 1) + 7
    x0, mu, sd = standardize(t)
    torch.testing.assert_close(x0.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(x0.var((0, 2, 3), unbiased=False), torch.ones(3), atol=1e-3, rtol=0)
    torch.testing.assert_close(x0 * sd + mu, t)


def test_align_spatial_pools_the_larger_map():
    student, teacher = torch.randn(4, 2, 6, 2, 2), torch.randn(2, 7, 8, 8)
    s, t = align_spatial(student, teacher)
    assert s is student and t.shape == (2, 7, 2, 2)
    torch.testing.assert_close(t, F.adaptive_avg_pool2d(teacher, 2))
    s, t = align_spatial(torch.randn(4, 2, 6, 8, 8), torch.randn(2, 7, 4, 4))
    assert s.shape == (4, 2, 6, 4, 4) and t.shape == (2, 7, 4, 4)


def test_i11_bridge_and_pooling_commute_with_the_branch_mean():
    gen = torch.Generator().manual_seed(1)
    feats = torch.randn(4, 2, 6, 8, 8, generator=gen)
    bridge = nn.Conv2d(6, 5, 1)
    with torch.no_grad():
        bridged = bridge(feats.flatten(0, 1)).unflatten(0, (4, 2))
        torch.testing.assert_close(bridge(feats.mean(0)), bridged.mean(0), atol=1e-6, rtol=0)
    pooled, _ = align_spatial(feats, torch.zeros(2, 5, 4, 4))
    torch.testing.assert_close(F.adaptive_avg_pool2d(feats.mean(0), 4), pooled.mean(0), atol=1e-6, rtol=0)


def test_branch_features_embeddings():
    x = [torch.randn(2, 4, 3, 3) for _ in range(3)]
    y = torch.stack(x).mean(0)
    shortcut = torch.randn(2, 4, 3, 3)
    feats = branch_features(y + shortcut, y, x, "identity")
    for i in range(3):
        torch.testing.assert_close(feats[i], x[i] + shortcut)
    torch.testing.assert_close(feats.mean(0), y + shortcut)
    head = torch.randn(2, 5, 3, 3)
    feats = branch_features(torch.cat([head, y], 1), y, x, "concat_tail")
    for i in range(3):
        assert torch.equal(feats[i], torch.cat([head, x[i]], 1))
    with pytest.raises(ValueError, match="must match its tap"):
        branch_features(torch.randn(2, 5, 3, 3), y, x, "identity")


def test_i12_one_branch_chain_is_plain_feature_l2():
    torch.manual_seed(0)
    chain = DiffusionLayerLoss(6, 5, cosine_grid(1), feature_loss="chain")
    average = DiffusionLayerLoss(6, 5, cosine_grid(1), feature_loss="average")
    average.load_state_dict(chain.state_dict())
    student, teacher = torch.randn(1, 4, 6, 4, 4), torch.randn(4, 5, 8, 8)
    a, b = chain(student, teacher), average(student, teacher)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-6, rtol=1e-6)
    x0, _, _ = standardize(F.adaptive_avg_pool2d(teacher, 4))
    with torch.no_grad():
        direct = F.mse_loss(chain.bridge(student[0]), x0)
    torch.testing.assert_close(a.loss.detach(), direct, atol=1e-6, rtol=1e-6)
    linear = DiffusionLayerLoss(6, 5, linear1000(1))
    linear.load_state_dict(chain.state_dict())
    torch.testing.assert_close(linear(student, teacher).loss, a.loss, atol=1e-6, rtol=1e-6)


def test_layer_loss_modes_and_fp32_under_autocast():
    torch.manual_seed(0)
    student, teacher = torch.randn(4, 2, 6, 4, 4), torch.randn(2, 5, 4, 4)
    chain = DiffusionLayerLoss(6, 5, cosine_grid(4))
    per_branch = DiffusionLayerLoss(6, 5, cosine_grid(4), feature_loss="branch_average")
    per_branch.load_state_dict(chain.state_dict())
    out = per_branch(student, teacher)
    with torch.no_grad():
        bridged = chain.bridge(student.flatten(0, 1)).unflatten(0, (4, 2))
    x0, _, _ = standardize(teacher)
    expected = torch.stack([F.mse_loss(s, x0) for s in bridged]).mean()
    torch.testing.assert_close(out.loss.detach(), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = chain(student.bfloat16(), teacher.bfloat16())
    assert result.loss.dtype == torch.float32 and result.x_hat.dtype == torch.float32
    with pytest.raises(ValueError, match="target_mode"):
        DiffusionLayerLoss(6, 5, cosine_grid(4), target_mode="noise")


def test_shuffle_changes_only_the_loss():
    torch.manual_seed(0)
    loss_fn = DiffusionLayerLoss(6, 5, cosine_grid(4))
    student, teacher = torch.randn(4, 2, 6, 4, 4), torch.randn(2, 5, 4, 4)
    a, b = loss_fn(student, teacher, perm=[0, 1, 2, 3]), loss_fn(student, teacher, perm=[3, 2, 1, 0])
    assert torch.equal(a.x_hat, b.x_hat)
    assert not torch.allclose(a.loss, b.loss)


class _Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(F.relu(x), 1).flatten(1))


def test_i14_guided_term():
    torch.manual_seed(0)
    head = _Head().requires_grad_(False)
    teacher_feat = torch.randn(4, 5, 3, 3)
    x0, mu, sd = standardize(teacher_feat)
    logits = head(teacher_feat)
    assert guided_loss(x0, mu, sd, head, logits).item() < 1e-10
    x_hat = torch.randn(4, 5, 3, 3, requires_grad=True)
    before = guided_loss(x_hat, mu, sd, head, logits)
    assert before.item() > 1e-3
    before.backward()
    assert x_hat.grad.abs().sum() > 0 and head.fc.weight.grad is None
    with torch.no_grad():
        head.fc.bias.add_(3.0)
    after = guided_loss(x_hat, mu, sd, head, head(teacher_feat))
    torch.testing.assert_close(after, before.detach())


def _chain_gradient_closed_form(branches, x0, schedule, perm):
    """dL/ds_i from spec §6.3's closed form, without autograd.

    Unrolling e_{k-1} = u_k e_k + v_k d_k gives e_{k-1} = Σ_{j≥k} C[k, j] d_{π_j} + C[k, K+1] e_K with
    C[k, j] = v_j Π_{k≤i<j} u_i and C[k, K+1] = Π_{k≤i≤K} u_i. L = Σ_k mean(e_{k-1}²), so
    dL/ds_{π_j} = Σ_k 2 C[k, j] e_{k-1} / N, plus the start term through e_K for j = K.
    """
    K, u, v, ab = schedule.steps, schedule.u, schedule.v, schedule.alpha_bar
    d = {j: branches[perm[j - 1]] - x0 for j in range(1, K + 1)}
    e_start = branches[perm[K - 1]] - ab[K] * x0
    coef = {}
    for k in range(1, K + 1):
        for j in range(k, K + 1):
            coef[k, j] = v[j] * math.prod(u[i] for i in range(k, j))
        coef[k, K + 1] = math.prod(u[i] for i in range(k, K + 1))
    errors = {k: sum(coef[k, j] * d[j] for j in range(k, K + 1)) + coef[k, K + 1] * e_start for k in range(1, K + 1)}
    n = x0.numel()
    grads = [torch.zeros_like(x0) for _ in branches]
    for k in range(1, K + 1):
        for j in range(k, K + 1):
            grads[perm[j - 1]] += 2 * coef[k, j] * errors[k] / n
        grads[perm[K - 1]] += 2 * coef[k, K + 1] * errors[k] / n
    return grads


@pytest.mark.parametrize("schedule", [cosine_grid(4), cosine_grid(8), linear1000(4)], ids=lambda s: s.name)
def test_gradient_flows_through_the_running_state_as_the_closed_form_says(schedule):
    # The coupling through z is what makes the transfer progressive: a later step's error reaches every
    # branch that built z, so branch π_j's gradient carries the terms C[k, j] for k < j as well.
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64)
    branches = [
        torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(schedule.steps)
    ]
    perm = torch.randperm(schedule.steps, generator=gen).tolist()
    reverse_chain_loss(branches, x0, schedule, perm, "mean").backward()
    expected = _chain_gradient_closed_form([b.detach() for b in branches], x0, schedule, perm)
    for i, (branch, grad) in enumerate(zip(branches, expected)):
        torch.testing.assert_close(branch.grad, grad, atol=1e-12, rtol=1e-9, msg=f"branch {i}")


def test_the_first_served_branch_is_trained_by_every_later_step():
    # Cosine K = 4 (spec §6.3): L = ‖d_1‖² + ‖.758 d_2 + .134 d_3 + .028 d_4‖² + ‖.581 d_3 + .121 d_4‖² + ‖.380 d_4‖².
    # With every branch but π_4 exact, only d_4 is non-zero, and its gradient is 2(.028² + .121² + .380²)·d_4/N:
    # without the running state's gradient it would be the last term's alone.
    schedule = cosine_grid(4)
    x0 = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    perm = [2, 0, 3, 1]
    offset = torch.randn_like(x0)
    branches = [x0.clone().requires_grad_(True) for _ in range(4)]
    with torch.no_grad():
        branches[perm[3]].add_(offset)
    reverse_chain_loss(branches, x0, schedule, perm, "mean").backward()
    u, v = schedule.u, schedule.v
    weight = (v[4] * u[3] * u[2]) ** 2 + (v[4] * u[3]) ** 2 + v[4] ** 2
    assert weight == pytest.approx(0.028**2 + 0.121**2 + 0.380**2, abs=2e-3)
    torch.testing.assert_close(branches[perm[3]].grad, 2 * weight * offset / x0.numel(), atol=1e-12, rtol=1e-9)


class _LinearHead(nn.Module):
    """GAP then a linear layer: a head whose gradient has a closed form."""

    def __init__(self, channels=5, classes=3):
        super().__init__()
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


def test_guided_term_value_and_gradient_match_their_closed_forms():
    # L = mean((W·GAP(x̂ ⊙ sd + mu) + b - z)²); dL/dx̂[b,c,h,w] = 2/(B·J) · Σ_j r[b,j] W[j,c] · sd[c] / (H·W).
    torch.manual_seed(0)
    head = _LinearHead().double().requires_grad_(False)
    teacher_feat = torch.randn(4, 5, 3, 3, dtype=torch.float64) * 2 + 1
    _, mu, sd = standardize(teacher_feat)
    logits = torch.randn(4, 3, dtype=torch.float64)
    x_hat = torch.randn(4, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    loss = guided_loss(x_hat, mu, sd, head, logits)
    raw = x_hat.detach() * sd + mu
    residual = raw.mean((2, 3)) @ head.fc.weight.T + head.fc.bias - logits
    assert loss.item() == pytest.approx((residual**2).mean().item(), rel=1e-12)
    assert loss.item() > 0.1
    loss.backward()
    per_channel = 2 * residual @ head.fc.weight / residual.numel()  # (B, C)
    expected = (per_channel[:, :, None, None] * sd / 9).expand_as(x_hat)
    torch.testing.assert_close(x_hat.grad, expected, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("schedule", [cosine_grid(4), cosine_grid(8), linear1000(4)], ids=lambda s: s.name)
def test_batched_chain_gradient_matches_the_closed_form(schedule):
    from pipeline.distill.kdiffusion.chain import batched_chain_loss

    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64)
    branches = torch.randn(schedule.steps, 2, 3, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    perm = torch.randperm(schedule.steps, generator=gen).tolist()
    batched_chain_loss(branches, x0, schedule, perm, "mean").backward()
    expected = _chain_gradient_closed_form(list(branches.detach()), x0, schedule, perm)
    for i, grad in enumerate(expected):
        torch.testing.assert_close(branches.grad[i], grad, atol=1e-12, rtol=1e-9, msg=f"branch {i}")
