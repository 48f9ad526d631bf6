"""The KDiffusion distiller: variants, option errors, gradient flow (I8), shuffle invariance (I7), m = 1 (I12)."""

import inspect

import pytest
import torch

from pipeline.artifacts.checkpoint import ModelMeta
from pipeline.distill import METHODS, build_distiller, method_names
from pipeline.errors import ConfigError
from pipeline.models import build_model
from pipeline.models.loading import build_for_meta
from pipeline.reparam.multibranch import multibranch_blocks

CLASSES = 4


def _distiller(method="kdiffusion", student="resnet20", teacher="resnet20", **args):
    torch.manual_seed(0)
    args.setdefault("warmup_epochs", 0)
    return build_distiller(method, build_model(student, CLASSES), build_model(teacher, CLASSES), args)


def _batch(n=4, size=32):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, size, size, generator=gen), torch.randint(0, CLASSES, (n,), generator=gen)


def test_variants_are_registered_with_their_defaults():
    names = method_names()
    for name in ("kdiffusion", "kdiffusion_multi", "kdiffusion_single", "kdiffusion_single_avg"):
        assert name in names
    defaults = {
        name: {p.name: p.default for p in inspect.signature(METHODS.get(name).__init__).parameters.values()}
        for name in ("kdiffusion", "kdiffusion_multi", "kdiffusion_single", "kdiffusion_single_avg")
    }
    assert (defaults["kdiffusion"]["layers"], defaults["kdiffusion"]["lambda_guided"]) == (3, 0.1)
    assert (defaults["kdiffusion_multi"]["layers"], defaults["kdiffusion_multi"]["lambda_guided"]) == (3, 0.0)
    assert (defaults["kdiffusion_single"]["layers"], defaults["kdiffusion_single"]["feature_loss"]) == (1, "chain")
    assert defaults["kdiffusion_single_avg"]["feature_loss"] == "average"
    assert all(d["m"] == 4 and d["target_mode"] == "mean" and d["schedule"] == "cosine" for d in defaults.values())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"m": 0}, r"option m must be in \[1, 64\]"),
        ({"layers": 1.5}, "layers must be an integer"),
        ({"target_mode": "noise"}, "target_mode"),
        ({"schedule": "sigmoid"}, "unknown schedule"),
        ({"layers": 4}, "declares 3 re-parameterization sites.*set student.method_args.layers=3"),
        ({"feature_loss": "kl"}, "feature_loss"),
        ({"lambda_guided": -0.1}, r"option lambda_guided must be in \[0, 1e\+06\]"),
        ({"branches": 4}, "has no option 'branches'"),
    ],
)
def test_bad_options_are_config_errors(args, message):
    with pytest.raises(ConfigError, match=message):
        _distiller(**args)


def test_variants_build_the_expected_blocks_and_losses():
    x, y = _batch()
    for method, layers, keys in (
        ("kdiffusion", 3, {"ce", "diff", "guided"}),
        ("kdiffusion_multi", 3, {"ce", "diff"}),
        ("kdiffusion_single", 1, {"ce", "diff"}),
        ("kdiffusion_single_avg", 1, {"ce", "avg"}),
    ):
        d = _distiller(method, m=2, lambda_kd=0.5)
        assert len(multibranch_blocks(d.student)) == layers == len(d.layer_losses)
        logits, losses = d(x, y)
        assert set(losses) == keys | {"kd"}, method
        assert logits.shape == (4, CLASSES) and all(torch.isfinite(v) for v in losses.values())


def test_i8_gradients_reach_every_branch_and_bridge_and_never_the_teacher():
    d = _distiller("kdiffusion", m=3)
    x, y = _batch()
    _, losses = d(x, y)
    sum(losses.values()).backward()
    for name, block in multibranch_blocks(d.student).items():
        for i, branch in enumerate(block.branches):
            for p in (branch.conv.weight, branch.bn.weight, branch.bn.bias):
                assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} branch {i}"
    for loss_fn in d.layer_losses:
        assert loss_fn.bridge.weight.grad.abs().sum() > 0 and loss_fn.bridge.bias.grad.abs().sum() > 0
    assert all(p.grad is None for p in d.teacher.parameters())
    assert not any(p.requires_grad for p in d.teacher.parameters())


def test_i8_the_chain_alone_trains_every_branch():
    d = _distiller("kdiffusion_multi", m=4, lambda_ce=0.0)
    x, y = _batch()
    _, losses = d(x, y)
    assert losses["ce"].item() == 0.0
    losses["diff"].backward()
    for block in multibranch_blocks(d.student).values():
        assert all(b.conv.weight.grad.abs().sum() > 0 for b in block.branches)


def test_i7_logits_do_not_depend_on_the_permutation():
    d = _distiller("kdiffusion_multi", m=4)
    x, y = _batch()
    torch.manual_seed(10)
    logits_a, losses_a = d(x, y)
    torch.manual_seed(11)
    logits_b, losses_b = d(x, y)
    assert torch.equal(logits_a, logits_b)
    assert losses_a["diff"].item() != losses_b["diff"].item()


def test_i12_one_branch_kdiffusion_equals_single_layer_average():
    chain = _distiller("kdiffusion_single", m=1)
    average = _distiller("kdiffusion_single_avg", m=1)
    average.load_state_dict(chain.state_dict())
    x, y = _batch()
    _, a = chain(x, y)
    _, b = average(x, y)
    torch.testing.assert_close(a["diff"], b["avg"], atol=1e-6, rtol=1e-6)


def test_bridges_stay_out_of_the_student_and_checkpoints_rebuild():
    d = _distiller("kdiffusion", m=2, mixed_kernels=True)
    assert not any("bridge" in k for k in d.student.state_dict())
    assert any(k.startswith("layer_losses.") and ".bridge." in k for k in d.state_dict())
    settings = d.reparam_settings()
    assert settings["kind"] == "multibranch" and settings["m"] == 2 and settings["mixed_kernels"] is True
    meta = ModelMeta("resnet20", CLASSES, 32, [0.5] * 3, [0.25] * 3, reparam=settings)
    rebuilt = build_for_meta(meta)
    rebuilt.load_state_dict(d.student.state_dict(), strict=True)


def test_warmup_ramps_the_feature_terms():
    d = _distiller("kdiffusion", m=2, warmup_epochs=4)
    x, y = _batch()
    d.set_progress(0.0)
    _, at_start = d(x, y)
    assert at_start["diff"].item() == 0.0 and at_start["guided"].item() == 0.0
    torch.manual_seed(0)
    d.set_progress(1.0)
    _, quarter = d(x, y)
    torch.manual_seed(0)
    d.set_progress(9.0)
    _, full = d(x, y)
    assert quarter["diff"].item() == pytest.approx(full["diff"].item() / 4, rel=1e-5)
    assert d.warmup_factor() == 1.0


def test_a_larger_student_map_is_pooled_to_the_teacher():
    d = _distiller("kdiffusion", student="resnet20", teacher="vgg8", m=2)  # student 8x8 vs teacher 4x4 at the end
    _, losses = d(*_batch())
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize(
    ("args", "message"), [("{mm: 4}", "has no option 'mm'"), ("{target_mode: literal}", "unknown target_mode")]
)
def test_bad_method_args_fail_before_any_stage_runs(tmp_path, capsys, args, message):
    from pipeline.cli import run_cli

    code = run_cli(["run", "all", "--out", str(tmp_path / "run"), "--set", f"student.method_args={args}"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "run" / "teacher").exists()


def test_method_switch_drops_the_presets_kdiffusion_options(tmp_path, capsys):
    from pipeline.cli import run_cli

    # The default preset sets KDiffusion's warm-up; --method kd runs without it (here it stops at the
    # missing teacher, after the configuration was accepted).
    code = run_cli(["run", "train", "--method", "kd", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "has no option warmup_epochs (set for another method); ignored" in err
    assert "stage 'teacher' has no artifacts" in err
    code = run_cli(
        ["run", "train", "--method", "kd", "--out", str(tmp_path), "--set", "student.method_args.warmup_epochs=2"]
    )
    assert code == 2 and "method 'kd' has no option 'warmup_epochs'" in capsys.readouterr().err


def test_config_overrides_switching_method_drop_the_presets_options():
    from pipeline.config import load_config

    notes = []
    cfg = load_config("default", None, ["student.method=kd"], log=notes.append)
    assert cfg.student.method_args == {} and "warmup_epochs" in notes[0]
    cfg = load_config("default", None, ["student.method=kdiffusion_single"])
    assert cfg.student.method_args == {"warmup_epochs": 1}
    cfg = load_config("default", None, ["student.method=kd", "student.method_args.temperature=2"])
    assert cfg.student.method_args == {"temperature": 2}


def test_a_config_file_switching_method_drops_the_presets_options(tmp_path):
    from pipeline.config import load_config

    file = tmp_path / "mine.yaml"
    file.write_text("student: {method: kd}\n")
    assert load_config("default", file).student.method_args == {}
    file.write_text("student: {method: kd, method_args: {warmup_epochs: 3}}\n")  # written for kd: kept, then refused
    assert load_config("default", file).student.method_args == {"warmup_epochs": 3}


def _tapped_run(d, x, y, taps):
    """Run the distiller once, capturing ``taps`` (name -> Tap) on the student; and the final teacher feature.

    The teacher is tapped in a pass of its own: the guided term runs the teacher head again on the student's
    prediction, and a hook on it would report that second call.
    """
    from pipeline.models.hooks import FeatureTaps

    with FeatureTaps(d.student, taps) as student:
        _, losses = d(x, y)
    with torch.no_grad(), FeatureTaps(d.teacher, {"t": d.teacher_taps["tap0"]}) as teacher:
        d.teacher(x)
    return losses, student.features, teacher.features["t"]


def _standardized(t):
    mu = t.mean((0, 2, 3), keepdim=True)
    sd = (t.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5).sqrt()
    return (t - mu) / sd, mu, sd


def test_guided_term_is_the_teacher_head_on_the_fused_prediction_with_its_gradient():
    # Spec §7: L_guided = MSE(h_T(x̂ ⊙ sd + mu), z^T) with x̂ = bridge(fused student feature); gradients flow
    # through the frozen head and the bridge into every branch.
    d = _distiller("kdiffusion", m=3, layers=1, lambda_guided=0.5, lambda_ce=0.0)
    x, y = _batch()
    losses, student, teacher = _tapped_run(d, x, y, {"fused": d.sites[0].tap})
    with torch.no_grad():
        teacher_logits = d.teacher(x)
    _, mu, sd = _standardized(teacher.detach())
    bridge = d.layer_losses[0].bridge
    x_hat = bridge(student["fused"])
    expected = 0.5 * torch.nn.functional.mse_loss(d.teacher.forward_head(x_hat * sd + mu), teacher_logits)
    assert expected.item() > 1e-3
    torch.testing.assert_close(losses["guided"], expected, atol=1e-6, rtol=1e-5)
    assert losses["guided"].requires_grad, "the guided term must train the student"
    block = next(iter(multibranch_blocks(d.student).values()))
    params = [bridge.weight, bridge.bias] + [b.conv.weight for b in block.branches]
    got = torch.autograd.grad(losses["guided"], params, retain_graph=True)
    want = torch.autograd.grad(expected, params)
    for p, g, w in zip(("bridge.weight", "bridge.bias", *(f"branch{i}" for i in range(3))), got, want):
        assert w.abs().sum() > 0, p
        torch.testing.assert_close(g, w, atol=1e-7, rtol=1e-4, msg=p)


def test_single_layer_average_reads_the_fused_feature_not_a_branch():
    # Spec §11: Single Layer Average is MSE(bridge(mean_i s̃_i), x^T_0). With m > 1 the fused feature differs
    # from any one branch's, so a control that read branch 0 would give another value and gradient.
    from pipeline.models.spec import Tap
    from pipeline.reparam.multibranch import branch_tap

    d = _distiller("kdiffusion_single_avg", m=3, lambda_ce=0.0, lambda_diff=2.0)
    x, y = _batch()
    site = d.sites[0]
    taps = {"fused": site.tap, "out": Tap(site.conv), "b0": branch_tap(site, 0)}
    losses, student, teacher = _tapped_run(d, x, y, taps)
    x0, _, _ = _standardized(teacher.detach())
    bridge = d.layer_losses[0].bridge
    expected = 2.0 * torch.nn.functional.mse_loss(bridge(student["fused"]), x0)
    torch.testing.assert_close(losses["avg"], expected, atol=1e-6, rtol=1e-5)
    branch0 = student["fused"] + (student["b0"] - student["out"])  # s̃_0: the tap as if the block output branch 0
    assert (branch0 - student["fused"]).abs().max() > 1e-3
    from_branch0 = 2.0 * torch.nn.functional.mse_loss(bridge(branch0), x0)
    assert abs(from_branch0.item() - losses["avg"].item()) > 1e-3 * losses["avg"].item()
    block = next(iter(multibranch_blocks(d.student).values()))
    weights = [b.conv.weight for b in block.branches]
    got = torch.autograd.grad(losses["avg"], weights, retain_graph=True)
    want = torch.autograd.grad(expected, weights)
    for i, (g, w) in enumerate(zip(got, want)):
        assert w.abs().sum() > 0, f"branch {i}"
        torch.testing.assert_close(g, w, atol=1e-7, rtol=1e-4, msg=f"branch {i}")


def test_average_layer_loss_with_several_branches_uses_their_mean():
    from pipeline.distill.kdiffusion.loss import DiffusionLayerLoss
    from pipeline.distill.kdiffusion.schedule import cosine_grid

    torch.manual_seed(0)
    loss_fn = DiffusionLayerLoss(6, 5, cosine_grid(1), feature_loss="average")
    student, teacher = torch.randn(3, 2, 6, 4, 4), torch.randn(2, 5, 4, 4)
    out = loss_fn(student, teacher)
    x0, _, _ = _standardized(teacher)
    with torch.no_grad():
        fused = torch.nn.functional.mse_loss(loss_fn.bridge(student.mean(0)), x0)
        first = torch.nn.functional.mse_loss(loss_fn.bridge(student[0]), x0)
    torch.testing.assert_close(out.loss.detach(), fused)
    assert abs(first.item() - fused.item()) > 1e-3


@pytest.mark.parametrize("method", ["kdiffusion", "dkd", "reviewkd"])
def test_an_unset_warmup_is_the_reference_fraction_of_the_run(method):
    """20 of 240 epochs: a 20-epoch run warms up over 1.67 epochs, not the whole run; the train stage's params
    (its fingerprint) hold the value used, and a value the user set is kept."""
    from pipeline.config import load_config
    from pipeline.distill.catalog import resolve_method_args
    from stages.train import TrainStage

    args, note = resolve_method_args(method, {}, 20)
    assert args == {"warmup_epochs": 1.6667} and "warmup_epochs=1.6667" in note and "240" in note
    assert resolve_method_args(method, {"warmup_epochs": 3}, 20) == ({"warmup_epochs": 3}, "")
    assert resolve_method_args("kd", {}, 20) == ({}, "")
    cfg = load_config(None, None, [f"student.method={method}", "student.optim.epochs=24"])
    assert TrainStage().params(cfg)["method_args"]["warmup_epochs"] == 2.0
