"""Each baseline loss against a reference re-derived here from its paper and official code.

Fixed tensors in, the value out, to 1e-6. The references are written out plainly (explicit exp/log
sums, masks, reshape-means) from the formulas of the official repositories named in each docstring,
without calling the module under test, so a wrong reduction, temperature power, mask or weight shows.
Inputs are float64 so the comparison measures the formula, not rounding; modules that compute in fp32 on
purpose (the logit and attention losses) are held to 1e-6 relative.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.distill.at import at_loss
from pipeline.distill.crd import nce_loss
from pipeline.distill.dkd import dkd_parts
from pipeline.distill.kd import kd_loss
from pipeline.distill.ofd import bn_margin, ofd_loss
from pipeline.distill.reviewkd import hcl_loss
from pipeline.distill.vid import GaussianRegressor

TOL = 1e-6


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _close(value: torch.Tensor, reference: float) -> None:
    value = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
    assert abs(value - reference) <= TOL * max(1.0, abs(reference)), (value, reference)


def _softmax(z: torch.Tensor) -> torch.Tensor:
    e = torch.exp(z - z.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


# --- KD (Hinton et al. 2015; RepDistiller distiller_zoo/KD.py DistillKL) -------------------------------


def test_kd_matches_the_softened_kl_times_t_squared():
    g = _gen(0)
    zs, zt = torch.randn(6, 10, generator=g, dtype=torch.float64) * 3, torch.randn(6, 10, generator=g).double() * 3
    T = 4.0
    p_s, p_t = _softmax(zs / T), _softmax(zt / T)
    # DistillKL: F.kl_div(log p_s, p_t, size_average=False) * T**2 / batch
    reference = (p_t * (torch.log(p_t) - torch.log(p_s))).sum().item() * T**2 / zs.shape[0]
    _close(kd_loss(zs, zt, T), reference)


# --- DKD (Zhao et al. 2022; mdistiller distillers/DKD.py dkd_loss) --------------------------------------


def _mdistiller_dkd(zs, zt, target, alpha, beta, T):
    gt = torch.zeros_like(zs).scatter_(1, target[:, None], 1.0)
    other = 1.0 - gt
    p_s, p_t = _softmax(zs / T), _softmax(zt / T)
    # cat_mask: [sum over the target, sum over the rest]
    b_s = torch.stack([(p_s * gt).sum(1), (p_s * other).sum(1)], dim=1)
    b_t = torch.stack([(p_t * gt).sum(1), (p_t * other).sum(1)], dim=1)
    tckd = (b_t * (torch.log(b_t) - torch.log(b_s))).sum() * T**2 / zs.shape[0]
    # the official code removes the target class by subtracting 1000 from its logit before the softmax
    q_t = _softmax(zt / T - 1000.0 * gt)
    log_q_s = torch.log(_softmax(zs / T - 1000.0 * gt).clamp_min(1e-300))
    nckd = (q_t * other * (torch.log(q_t.clamp_min(1e-300)) - log_q_s)).sum() * T**2 / zs.shape[0]
    return alpha * tckd + beta * nckd, tckd, nckd


def test_dkd_matches_mdistillers_dkd_loss():
    g = _gen(1)
    zs, zt = torch.randn(8, 7, generator=g).double() * 2, torch.randn(8, 7, generator=g).double() * 4
    target = torch.randint(0, 7, (8,), generator=g)
    total, tckd_ref, nckd_ref = _mdistiller_dkd(zs, zt, target, 1.0, 8.0, 4.0)
    tckd, nckd = dkd_parts(zs, zt, target, 4.0)
    _close(tckd.double().mean(), tckd_ref.item())
    _close(nckd.double().mean(), nckd_ref.item())
    _close(1.0 * tckd.double().mean() + 8.0 * nckd.double().mean(), total.item())


def test_dkd_parts_recompose_kd():
    """The paper's identity: KD = TCKD + (1 - p_t^target) NCKD, per sample."""
    g = _gen(2)
    zs, zt = torch.randn(5, 9, generator=g).double(), torch.randn(5, 9, generator=g).double() * 3
    target = torch.randint(0, 9, (5,), generator=g)
    T = 2.0
    tckd, nckd = dkd_parts(zs, zt, target, T)
    p_t = _softmax(zt / T)
    kd_rows = (p_t * (torch.log(p_t) - torch.log(_softmax(zs / T)))).sum(1) * T**2
    expected = tckd + (1 - p_t.gather(1, target[:, None])[:, 0]) * nckd
    torch.testing.assert_close(expected.double(), kd_rows, rtol=TOL, atol=TOL)  # the module computes in fp32


# --- AT (Zagoruyko & Komodakis 2017; RepDistiller distiller_zoo/AT.py, mdistiller distillers/AT.py) -----


def _at_map(f: torch.Tensor, p: float) -> torch.Tensor:
    m = f.pow(p).mean(1).reshape(f.shape[0], -1)
    return m / m.pow(2).sum(1, keepdim=True).sqrt()


def test_at_matches_repdistillers_attention_loss_with_pooling():
    g = _gen(3)
    fs = torch.randn(4, 6, 8, 8, generator=g).double()  # student larger: pooled 8x8 -> 4x4 as the official code
    ft = torch.randn(4, 10, 4, 4, generator=g).double()
    pooled = fs.reshape(4, 6, 4, 2, 4, 2).mean(dim=(3, 5))
    reference = (_at_map(pooled, 2) - _at_map(ft, 2)).pow(2).mean().item()
    _close(at_loss(fs, ft, 2.0), reference)


# --- FitNet (Romero et al. 2015; RepDistiller HintLoss = nn.MSELoss) --------------------------------------
# FitNet's loss is the plain element mean of squared errors; its reference is the MSE written out:


def test_fitnet_hint_is_the_element_mean_squared_error():
    from pipeline.distill.fitnet import FitNet

    assert "F.mse_loss(pred.float(), target.float())" in _source(FitNet.losses)
    g = _gen(4)
    a, b = torch.randn(3, 4, 5, 5, generator=g).double(), torch.randn(3, 4, 5, 5, generator=g).double()
    _close(F.mse_loss(a, b), ((a - b) ** 2).sum().item() / a.numel())


def _source(fn) -> str:
    import inspect

    return inspect.getsource(fn)


# --- VID (Ahn et al. 2019; RepDistiller distiller_zoo/VID.py VIDLoss) -------------------------------------


def test_vid_matches_repdistillers_vid_loss():
    torch.manual_seed(5)
    q = GaussianRegressor(3, 5, 4, init_variance=5.0, eps=1e-5).double()
    with torch.no_grad():
        q.raw_variance.copy_(torch.linspace(-1.0, 2.0, 4))
    g = _gen(5)
    s = torch.randn(2, 3, 6, 6, generator=g).double()
    t = torch.randn(2, 4, 3, 3, generator=g).double()  # student pooled 6x6 -> 3x3, as VIDLoss does
    s_pooled = s.reshape(2, 3, 3, 2, 3, 2).mean(dim=(3, 5))
    w1, w2, w3 = (layer.weight[:, :, 0, 0] for layer in (q.mean[0], q.mean[2], q.mean[4]))
    h = torch.einsum("oc,nchw->nohw", w1, s_pooled).clamp_min(0)
    h = torch.einsum("oc,nchw->nohw", w2, h).clamp_min(0)
    mu = torch.einsum("oc,nchw->nohw", w3, h)
    var = (torch.log(1.0 + torch.exp(q.raw_variance)) + 1e-5).view(1, -1, 1, 1)
    reference = (0.5 * ((mu - t) ** 2 / var + torch.log(var))).mean().item()
    _close(q(s, t), reference)


def test_vid_variance_starts_at_init_pred_var():
    q = GaussianRegressor(3, 5, 4, init_variance=5.0, eps=1e-5)
    torch.testing.assert_close(q.variance(), torch.full((4,), 5.0), rtol=0, atol=1e-5)


# --- OFD (Heo et al. 2019; clovaai/overhaul-distillation CIFAR-100/distiller.py) --------------------------


def _official_margin(weight: list[float], bias: list[float]) -> list[float]:
    def cdf(x: float) -> float:
        return 0.5 * (1 + math.erf(x / math.sqrt(2)))

    out = []
    for s, m in zip(weight, bias):
        s = abs(s)
        if cdf(-m / s) > 0.001:
            out.append(-s * math.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi) / cdf(-m / s) + m)
        else:
            out.append(-3 * s)
    return out


def test_ofd_margin_matches_get_margin_from_bn():
    bn = nn.BatchNorm2d(5)
    weight, bias = [1.0, -0.5, 2.0, 0.3, 1.5], [0.0, 0.4, -1.0, 2.0, 6.0]  # the last: P(x<0) <= 0.001
    with torch.no_grad():
        bn.weight.copy_(torch.tensor(weight))
        bn.bias.copy_(torch.tensor(bias))
    reference = _official_margin(weight, bias)
    margin = bn_margin(bn)
    for got, want in zip(margin.tolist(), reference):
        assert abs(got - want) <= 1e-6 * max(1.0, abs(want))  # float32 margins, as the official FloatTensor


def test_ofd_matches_the_official_partial_l2():
    g = _gen(6)
    source = torch.randn(3, 4, 4, 4, generator=g).double()
    target = torch.randn(3, 4, 4, 4, generator=g).double()
    margin = torch.tensor([-0.5, -0.2, -1.0, -0.1]).double()
    clipped = torch.maximum(target, margin.view(1, -1, 1, 1))
    mask = ((source > clipped) | (clipped > 0)).double()
    reference = ((source - clipped) ** 2 * mask).sum().item() / source.shape[0]  # distillation_loss / batch
    _close(ofd_loss(source, target, margin.float()), reference)


# --- ReviewKD (Chen et al. 2021; dvlab-research/ReviewKD CIFAR-100 hcl) ------------------------------------


@pytest.mark.parametrize("size", [8, 4, 2])
def test_reviewkd_hcl_matches_the_official_hcl(size):
    g = _gen(7)
    fs, ft = torch.randn(2, 3, size, size, generator=g).double(), torch.randn(2, 3, size, size, generator=g).double()

    def pool(x: torch.Tensor, out: int) -> torch.Tensor:
        k = size // out
        return x.reshape(2, 3, out, k, out, k).mean(dim=(3, 5))

    loss, cnt, tot = ((fs - ft) ** 2).mean(), 1.0, 1.0
    for level in (4, 2, 1):
        if level >= size:
            continue
        cnt /= 2.0
        loss = loss + ((pool(fs, level) - pool(ft, level)) ** 2).mean() * cnt
        tot += cnt
    _close(hcl_loss(fs, ft), (loss / tot).item())


# --- CRD (Tian et al. 2020; RepDistiller crd/criterion.py ContrastLoss) ------------------------------------


def test_crd_nce_matches_contrastloss():
    g = _gen(8)
    scores = torch.rand(4, 17, generator=g).double() * 1e-3 + 1e-5  # column 0 the positive, 16 negatives
    n_data = 500
    m = scores.shape[1] - 1
    pn = 1.0 / n_data
    eps = 1e-7
    log_d1 = torch.log(scores[:, 0] / (scores[:, 0] + m * pn + eps))
    log_d0 = torch.log((m * pn) / (scores[:, 1:] + m * pn + eps))
    reference = (-(log_d1.sum() + log_d0.sum()) / scores.shape[0]).item()
    _close(nce_loss(scores, n_data), reference)


def test_at_pairs_stages_from_the_shallow_end_as_the_official_codes():
    """RepDistiller and mdistiller zip the stage lists: MobileNetV2-half's 2x2 stage has no WRN-16-2 partner."""
    from pipeline.distill.at import AT
    from pipeline.models import build_model

    student, teacher = build_model("mobile_half", 10), build_model("wrn_16_2", 10)
    at = AT(student, teacher)
    assert at.student_taps == list(student.info.stages[:3])
    assert at.teacher_taps == list(teacher.info.stages)
