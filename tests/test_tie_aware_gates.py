"""The numeric gates judge the model, not near-ties or logit scale (pipeline.compare, the gates built on it).

Top-1 agreement excuses a flip only between classes the reference itself has tied within the set's error
level (2 x the 90th percentile of the per-sample max error); NaN/inf never passes; the fp32 parity gate is
Polygraphy's element rule (beyond both atol and rtol * |ref|), not a bare absolute bound.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper
from torch import nn

from exports.fp16 import FP16_MAX, convert_fp16
from exports.metadata import DeployMeta
from exports.onnx_export import export_onnx
from exports.precisions import PRECISIONS, Conversion, convert_to_fp16, fp16_gate, int8_gate
from exports.runners import run_onnx
from pipeline.artifacts.checks import TOLERANCES
from pipeline.compare import allclose_fraction, diff_stats
from pipeline.config import ExportConfig
from stages.export import fp32_parity_gate

pytestmark = pytest.mark.accuracy  # verdicts on trained or converted models (CI reruns these under AVX2)

N, C = 50, 10  # one flip in 50 is 0.98, under the fp16 gate's 0.99


def as_fp16(x: np.ndarray) -> np.ndarray:
    """What an fp16 model's output looks like: the fp32 logits rounded to fp16."""
    return x.astype(np.float16).astype(np.float32)


@pytest.fixture
def logits() -> np.ndarray:
    ref = np.random.default_rng(0).normal(scale=2.0, size=(N, C)).astype(np.float32)
    ref[np.arange(N), np.arange(N) % C] += 6.0  # every sample has a confident top class
    return ref


def checks_by_name(result) -> dict:
    return {c.name: c for c in result.checks}


def test_a_near_tie_flipped_by_fp16_rounding_passes_and_the_strict_figure_shows_it(logits):
    ref = logits.copy()
    ref[0] = 0.0
    ref[0, :2] = [8.0, 8.002]  # class 1 leads by less than fp16's spacing at 8 (0.0078): both round to 8.0
    cand = as_fp16(ref)
    assert ref[0].argmax() == 1 and cand[0].argmax() == 0  # a real flip

    stats = diff_stats(ref, cand)
    assert stats["top1_agreement_strict"] == pytest.approx(1 - 1 / N)
    assert stats["top1_agreement"] == 1.0 and stats["top1_ties_excused"] == 1
    assert 0.002 <= stats["tie_tolerance"] < 0.05  # fp16 rounding error of logits up to ~12, times two

    result = fp16_gate(ref, cand)
    assert result, [c.describe() for c in result.checks]
    assert result.metrics["fp16_top1_agreement_strict"] < TOLERANCES["onnx.fp16_top1_agreement"]  # strict fails
    assert result.metrics["fp16_top1_ties_excused"] == 1
    assert result.metrics["fp16_tie_tolerance"] == stats["tie_tolerance"]
    assert "1 flip(s) excused as ties" in checks_by_name(result)["onnx_fp16_top1_agreement"].describe()
    # the engine's fp16 gate reads the same figure
    assert all(PRECISIONS.get("fp16").engine_gate(diff_stats(ref, cand)))


def test_a_confident_sample_flipped_fails_agreement(logits):
    cand = as_fp16(logits)
    cand[3] = cand[3][::-1].copy()  # localized damage: one sample's logits permuted
    ref_top, cand_top = logits[3].argmax(), cand[3].argmax()
    assert ref_top != cand_top and logits[3, ref_top] - logits[3, cand_top] > 1.0  # confident, not a tie

    stats = diff_stats(logits, cand)
    assert stats["top1_agreement"] == stats["top1_agreement_strict"] == pytest.approx(1 - 1 / N)
    assert stats["top1_ties_excused"] == 0 and stats["tie_tolerance"] < 0.05  # one bad sample cannot raise tau
    result = fp16_gate(logits, cand)
    assert not checks_by_name(result)["onnx_fp16_top1_agreement"]
    assert not all(PRECISIONS.get("int8").engine_gate(stats))


def test_damage_in_a_few_samples_still_counts(logits):
    cand = as_fp16(logits)
    for s in (1, 7, 20, 33):  # 8 % of the set, under the percentile's 10 %
        cand[s] = np.roll(cand[s], 3)
    stats = diff_stats(logits, cand)
    assert stats["top1_agreement"] == pytest.approx(1 - 4 / N) and stats["top1_ties_excused"] == 0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_candidate_fails_agreement_and_cosine(logits, bad):
    cand = as_fp16(logits)
    cand[5, 2] = bad
    result = checks_by_name(fp16_gate(logits, cand))
    assert not result["onnx_fp16_min_cosine"] and not result["onnx_fp16_top1_agreement"]

    everywhere = np.full_like(logits, bad)  # argmax of an all-NaN row is 0: must not count as agreeing
    stats = diff_stats(logits, everywhere)
    assert stats["top1_agreement"] == stats["top1_agreement_strict"] == 0.0 and stats["top1_ties_excused"] == 0
    result = fp16_gate(logits, everywhere)
    assert not any(result.checks)
    assert not any(PRECISIONS.get("fp16").engine_gate(stats))


def test_a_non_finite_sample_is_never_excused_as_a_tie():
    ref = np.array([[1.0, 1.0001, 0.0], [2.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    cand = ref.copy()
    cand[0, 0] = np.inf  # flips sample 0 between its near-tied classes, but with an inf error
    stats = diff_stats(ref, cand)
    assert stats["top1_agreement"] == stats["top1_agreement_strict"] == pytest.approx(2 / 3)
    assert stats["top1_ties_excused"] == 0


def test_single_sample_and_empty_sets():
    one = np.array([[1.0, 1.001, 0.0]])
    stats = diff_stats(one, np.array([[1.001, 1.0, 0.0]]))
    assert stats["top1_agreement_strict"] == 0.0 and stats["top1_agreement"] == 1.0  # its own error level
    assert stats["tie_tolerance"] == pytest.approx(0.002)
    empty = diff_stats(np.zeros((0, 4)), np.zeros((0, 4)))
    assert empty["top1_agreement"] == empty["top1_agreement_strict"] == 1.0
    assert empty["top1_ties_excused"] == 0 and empty["tie_tolerance"] == 0.0 and empty["max_abs"] == 0.0


def test_the_int8_gate_reports_the_tie_figures_and_keeps_a_label_verdict(logits):
    labels = np.arange(N) % C
    cand = logits.copy()
    cand[0] = cand[0][::-1].copy()
    result = int8_gate(logits, cand, labels)
    vs = result.report["vs_fp32"]
    assert vs["top1_agreement_strict"] == pytest.approx(1 - 1 / N) and vs["top1_ties_excused"] == 0
    assert "tie_tolerance" in vs
    assert [c.name for c in result.checks] == ["onnx_int8_top1_drop"]
    assert result.checks[0].value == pytest.approx(100 / N)  # label-based: one sample lost is 2 points
    skipped = int8_gate(logits, cand, labels, "dataset x has 5 classes, the model 10")
    assert "top1_agreement_strict" in skipped.report["vs_fp32"]


def test_at_chance_the_int8_drop_is_not_judged_and_agreement_with_fp32_is(logits):
    """timm:lcnet_035 with random weights: fp32 top-1 5.27% on 20 classes (chance 5%), INT8 3.71%, and the
    drop gate "failed" on noise. Near chance (the export stage's band) the drop is recorded as skipped with
    the reason, never as passed, and INT8 is judged by its tie-aware top-1 agreement with fp32."""
    labels = (logits.argmax(1) + 1) % C  # the model is always wrong: 0% top-1, chance is 10%
    cand = logits.copy()
    result = int8_gate(logits, cand, labels)
    assert [c.name for c in result.checks] == ["onnx_int8_top1_agreement"] and result.checks[0]
    assert result.metrics["int8_gate"] == "skipped" and "int8_top1_drop_pt" not in result.metrics
    assert result.notes == [
        "int8 accuracy gate skipped: fp32 top-1 0.00% is within 5 points of chance (10.00% for 10 classes), "
        "where a top-1 drop is noise; judged by agreement with fp32"
    ]
    assert result.report["accuracy_gate"].startswith("skipped: ") and result.report["fp32_top1"] == 0.0
    cand[:5] = cand[:5][:, ::-1]  # five confident flips in 50: agreement 0.9, under 0.99
    failed = int8_gate(logits, cand, labels).checks[0]
    assert not failed and failed.value == pytest.approx(0.9)
    right = logits.argmax(1)  # clear of chance: the label-based drop gate, as before
    assert [c.name for c in int8_gate(logits, logits, right).checks] == ["onnx_int8_top1_drop"]
    almost = np.where(np.arange(N) < 7, right, (right + 1) % C)  # 14%: chance 10% + 5 points is still near
    assert int8_gate(logits, logits, almost).metrics["int8_gate"] == "skipped"


# --- a real fp16 overflow ------------------------------------------------------------------------------

SIZE, CLASSES = 8, 4
META = DeployMeta(
    arch="overflow_cnn",
    num_classes=CLASSES,
    input_size=SIZE,
    mean=[0.0] * 3,
    std=[1.0] * 3,
    resize=SIZE,
    crop=SIZE,
    class_names=[f"c{i}" for i in range(CLASSES)],
)


class Overflow(nn.Module):
    """A conv whose activations reach ~5e5 (past fp16's 65504) with fp16-representable weights, then a
    scale back to O(1): in fp32 nothing is wrong, in fp16 the conv's output is inf."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.up = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 8, 1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, CLASSES)
        with torch.no_grad():
            self.up.weight.copy_(torch.randn(8, 3, 3, 3, generator=gen).clamp(-2, 2) * 3e4)  # |w| <= 6e4
            self.down.weight.copy_(torch.randn(8, 8, 1, 1, generator=gen))
            self.head.weight.copy_(torch.randn(CLASSES, 8, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.relu(self.down(self.up(x) * 1e-4))).flatten(1))


def run_node_by_node(path, images: np.ndarray) -> np.ndarray:
    """ONNX Runtime on ``path`` one node at a time, every activation handed on in the graph's own type.

    ONNX Runtime's x86 CPU provider has no fp16 kernels for these ops: it runs fp16 nodes in fp32 and
    drops the casts between them, so a whole-graph session never stores an fp16 activation and cannot
    overflow. A node's output that is a graph output must be materialized in its declared type, so
    running node by node stores each activation in fp16 as an fp16 engine does (fp32 accumulation,
    fp16 tensors between layers)."""
    model = onnx.load(str(path))
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    values = {graph.input[0].name: images.astype(np.float32)}
    for node in graph.node:
        feeds = {name: values[name] for name in node.input if name in values}
        inputs = [
            helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), value.shape)
            for name, value in feeds.items()
        ]
        outputs = [helper.make_empty_tensor_value_info(name) for name in node.output]
        single = helper.make_graph(
            [node], "node", inputs, outputs, [weights[name] for name in node.input if name in weights]
        )
        proto = helper.make_model(single, opset_imports=model.opset_import, ir_version=model.ir_version)
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        values.update(zip(node.output, session.run(None, feeds)))
    return values[graph.output[0].name]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_a_real_fp16_overflow_fails_the_fp16_gate_and_the_guard_fixes_it(tmp_path):
    gen = torch.Generator().manual_seed(1)
    calibration = torch.randn(32, 3, SIZE, SIZE, generator=gen).numpy()
    images = torch.randn(64, 3, SIZE, SIZE, generator=gen).numpy()
    model = Overflow().eval()
    assert max(p.abs().max() for p in model.parameters()) < FP16_MAX  # no weight is clamped: activations overflow
    src = export_onnx(model, tmp_path / "m.onnx", SIZE, 18, False, META)
    reference = run_onnx(src, images)
    assert np.isfinite(reference).all() and np.abs(reference).max() < 1e3
    np.testing.assert_allclose(run_node_by_node(src, images), reference, rtol=1e-5, atol=1e-4)  # same runner

    assert convert_fp16(src, tmp_path / "unguarded.onnx", None, 16384.0, META) == []
    # run_onnx (one whole-graph session on the x86 CPU provider) computes this model in fp32 and passes it
    unguarded = run_node_by_node(tmp_path / "unguarded.onnx", images)
    assert not np.isfinite(unguarded).all()  # the overflow is real: fp16 turned ~5e5 into inf
    result = fp16_gate(reference, unguarded)
    assert not checks_by_name(result)["onnx_fp16_min_cosine"]
    assert not checks_by_name(result)["onnx_fp16_top1_agreement"]

    kept = convert_fp16(src, tmp_path / "guarded.onnx", calibration, 16384.0, META)
    assert {"/up/Conv", "/Mul"} <= set(kept)  # the conv that writes the huge activation and its reader
    result = fp16_gate(reference, run_node_by_node(tmp_path / "guarded.onnx", images))
    assert result, [c.describe() for c in result.checks]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("guard", [False, True])
def test_the_export_catches_an_activation_overflow_that_a_cpu_run_cannot_show(tmp_path, guard):
    """On the x86 CPU provider the unguarded fp16 model's outputs pass the output gate (fp16 nodes run in
    fp32), so the conversion itself must fail on activations past 65504; with the guard there is none."""
    gen = torch.Generator().manual_seed(1)
    calibration = torch.randn(32, 3, SIZE, SIZE, generator=gen).numpy()
    src = export_onnx(Overflow().eval(), tmp_path / "m.onnx", SIZE, 18, False, META)
    settings = ExportConfig(fp16_guard=guard)
    job = Conversion(src, tmp_path / "fp16.onnx", calibration, settings, tmp_path, lambda p, q: META, lambda _: None)
    result = convert_to_fp16(job)
    if guard:
        assert not result.checks and "/up/Conv" in result.report["kept_fp32"]
        return
    (check,) = result.checks
    assert check.name == "onnx_fp16_range" and not check and check.value >= 1
    assert "/up/Conv" in result.report["overflow_nodes"]
    images = torch.randn(16, 3, SIZE, SIZE, generator=gen).numpy()
    assert fp16_gate(run_onnx(src, images), run_onnx(job.dst, images))  # what a CPU run alone would conclude


# --- the element rule and the fp32 parity gate ---------------------------------------------------------


def test_allclose_fraction_is_polygraphys_element_rule():
    # over atol (1e-4) but within rtol * |ref| (1e-3 * 1000 = 1): passes
    assert allclose_fraction([1000.0, 0.5], [1000.5, 0.5], atol=1e-4, rtol=1e-3) == 0.0
    # within atol, beyond rtol * |ref| (a logit near zero): passes
    assert allclose_fraction([1e-6], [5e-5], atol=1e-4, rtol=1e-3) == 0.0
    # beyond both: fails, even where the sum atol + rtol * |ref| (numpy's rule) would have passed it
    assert allclose_fraction([10.0, 0.0], [11.5, 0.0], atol=1.0, rtol=0.1) == 0.5
    # NaN and inf fail wherever the two differ; equal infinities agree
    assert allclose_fraction([1.0, 2.0], [np.nan, 2.0], atol=10.0, rtol=10.0) == 0.5
    assert allclose_fraction([1.0, 2.0], [np.inf, 2.0], atol=10.0, rtol=10.0) == 0.5
    assert allclose_fraction([np.inf, 1.0], [1.0, 1.0], atol=10.0, rtol=10.0) == 0.5
    assert allclose_fraction([np.inf, np.nan], [np.inf, np.nan], atol=1.0, rtol=1.0) == 0.5
    assert allclose_fraction(np.zeros((0, 3)), np.zeros((0, 3)), atol=1.0, rtol=1.0) == 0.0


def test_the_fp32_gate_judges_large_logits_relatively_and_still_catches_real_errors():
    rng = np.random.default_rng(3)
    reference = rng.normal(scale=100.0, size=(32, 10))
    reference[:, 0] = 200.0 + rng.random(32)  # large logits, as timm's dla34 with random weights has
    candidate = reference * (1 + 1e-6)  # relative error 1e-6: float32 rounding, not a broken export
    scale = float(np.abs(reference).max())
    atol = TOLERANCES["onnx.fp32_max_abs"] + TOLERANCES["onnx.fp32_scale_rtol"] * scale

    good = fp32_parity_gate(reference, candidate)
    assert good.metrics["onnx_max_abs"] > TOLERANCES["onnx.fp32_max_abs"]  # an absolute gate would fail it
    assert good, [c.describe() for c in good.checks]
    rtol = TOLERANCES["onnx.fp32_rtol"]
    assert good.report["allclose"] == {"atol": atol, "rtol": rtol, "scale": scale, "fraction_failed": 0.0}
    assert f"atol {atol:.3g} for max |PyTorch| {scale:.3g}, rtol {rtol:g}" in good.checks[0].detail
    assert {c.name for c in good.checks} == {"onnx_fp32_allclose", "onnx_top1_agreement"}

    for s, j in ((4, 0), (9, 3)):  # a large logit; an ordinary one
        broken = candidate.copy()
        broken[s, j] = reference[s, j] + 1.5 * max(atol, rtol * abs(reference[s, j]))  # beyond both bounds
        bad = fp32_parity_gate(reference, broken)
        assert not checks_by_name(bad)["onnx_fp32_allclose"], (s, j)
        assert bad.metrics["onnx_allclose_failed"] == pytest.approx(1 / reference.size)


def test_the_fp32_gate_allows_rounding_that_grows_with_the_largest_logit():
    """torchvision's wide_resnet101_2 with random weights: logits in the thousands, and ORT and PyTorch differ by
    5e-3 on the logits near zero (relative Frobenius error 7e-7): a correct export. 1 % off one logit is not."""
    rng = np.random.default_rng(4)
    reference = rng.normal(scale=2000.0, size=(16, 20))
    reference[0, :4] = [0.01, -0.02, 0.003, 0.0]  # logits near zero ...
    candidate = reference + rng.normal(scale=2e-3, size=reference.shape)  # ... off by about 5e-3 at most
    assert np.abs(candidate - reference)[0, :4].max() > 10 * TOLERANCES["onnx.fp32_max_abs"]
    assert fp32_parity_gate(reference, candidate), "rounding at the model's scale failed the gate"
    broken = candidate.copy()
    broken[3, 5] = reference[3, 5] * 1.01
    assert not checks_by_name(fp32_parity_gate(reference, broken))["onnx_fp32_allclose"]
    near_zero = candidate.copy()
    near_zero[0, 3] = 0.5  # where 0 was expected: beyond the scaled atol (about 0.06 here)
    assert not checks_by_name(fp32_parity_gate(reference, near_zero))["onnx_fp32_allclose"]


def test_identical_zero_logits_agree_and_zero_against_nonzero_does_not():
    """timm's gMLP and MLP-Mixer start with a zero head: random-weight logits are exactly 0 in fp32 and fp16, and
    the cosine of two equal zero vectors is 1, not the 0 of 0 / 0 guarded (the model matrix's false alarm)."""
    zeros = np.zeros((N, C), dtype=np.float32)
    assert diff_stats(zeros, zeros)["min_cosine"] == 1.0
    assert all(fp16_gate(zeros, zeros.astype(np.float16).astype(np.float32)).checks)
    ones = np.ones((N, C), dtype=np.float32)
    assert diff_stats(zeros, ones)["min_cosine"] == 0.0 and diff_stats(ones, zeros)["min_cosine"] == 0.0
    assert not all(fp16_gate(ones, zeros).checks)
