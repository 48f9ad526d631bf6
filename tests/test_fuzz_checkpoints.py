"""Property-based fuzzing of the weights files a user imports (``--teacher-checkpoint``): a real ResNet-20
state dict, wrapped as training scripts save it, with one key or one value changed. Every case ends with the
teacher imported (exit 0) or one ``error:`` line (exit 2), and a value the model cannot use (NaN, integers or
complex numbers for weights, a sparse tensor, another shape) is always refused.
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from pipeline.cli import run_cli
from pipeline.models import build_model
from tests.test_fuzz import EXAMPLES, FUZZ

SETS = [
    a
    for item in (
        "data.synthetic.train_size=32",
        "data.synthetic.test_size=16",
        "data.num_classes=4",
        "data.batch_size=16",
        "teacher.arch=resnet20",
    )
    for a in ("--set", item)
]
STATE = {k: v.clone() for k, v in build_model("resnet20", 4).state_dict().items()}
KEYS = sorted(STATE)

# (name, change of one tensor, whether the model can use the result)
VALUE_EDITS = {
    "none": (lambda t: t, True),
    "float16": (lambda t: t.half() if t.is_floating_point() else t, True),
    "bfloat16": (lambda t: t.bfloat16() if t.is_floating_point() else t, True),
    "float64": (lambda t: t.double() if t.is_floating_point() else t, True),
    "int64": (lambda t: t.long(), False),
    "bool": (lambda t: t.bool(), False),
    "uint8": (lambda t: t.to(torch.uint8), False),
    "complex": (lambda t: t.to(torch.complex64), False),
    "nan": (lambda t: t.float().fill_(float("nan")), False),
    "inf": (lambda t: t.float().fill_(float("-inf")), False),
    "sparse": (lambda t: t.float().reshape(-1, 1).to_sparse().reshape(t.shape) if t.dim() else t.to_sparse(), False),
    "shape": (lambda t: torch.zeros(*t.shape, 2), False),
    "scalar": (lambda t: torch.tensor(1.0), False),
    "empty": (lambda t: torch.zeros(0), False),
}
KEY_EDITS = st.sampled_from(["none", "drop", "add", "rename", "not a tensor"])
WRAPPERS = st.sampled_from(["bare", "state_dict", "net", "module.", "model. beside others", "with optimizer"])


def _wrap(state: dict, wrapper: str) -> dict:
    if wrapper == "state_dict":
        return {"state_dict": state, "epoch": 3}
    if wrapper == "net":
        return {"net": state, "acc": 91.5}
    if wrapper == "module.":
        return {f"module.{k}": v for k, v in state.items()}
    if wrapper == "model. beside others":
        return {**{f"model.{k}": v for k, v in state.items()}, "loss.weight": torch.ones(3)}
    if wrapper == "with optimizer":
        return {"model": state, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}}
    return state


@pytest.mark.slow
@FUZZ
@given(
    key=st.sampled_from(KEYS),
    value_edit=st.sampled_from(sorted(VALUE_EDITS)),
    key_edit=KEY_EDITS,
    wrapper=WRAPPERS,
    fmt=st.sampled_from(["pth", "safetensors"]),
)
def test_fuzz_imported_weights_load_or_are_one_error(key, value_edit, key_edit, wrapper, fmt, capsys):
    change, usable = VALUE_EDITS[value_edit]
    state = dict(STATE)
    try:
        state[key] = change(STATE[key].clone())
    except RuntimeError:  # a change that does not apply to this tensor (e.g. a 0-d counter)
        return
    if key_edit == "drop":
        del state[key]
    elif key_edit == "add":
        state["extra.weight"] = torch.ones(2)
    elif key_edit == "rename":
        state[f"{key}_old"] = state.pop(key)
    elif key_edit == "not a tensor":
        state[key] = [1.0, 2.0]
    if key.endswith("num_batches_tracked"):  # an integer counter: any real number of its shape will do
        usable = value_edit in ("none", "float16", "bfloat16", "float64", "int64", "uint8", "bool", "scalar")
        # a missing counter is filled in, as in checkpoints from before PyTorch 0.4.1
        usable = (usable and key_edit == "none") or key_edit == "drop"
    else:
        usable = usable and key_edit == "none"
    workdir = Path(tempfile.mkdtemp(prefix="fuzz-ckpt-"))
    try:
        path = workdir / f"teacher.{fmt}"
        if fmt == "safetensors":
            if wrapper != "bare" or key_edit == "not a tensor" or value_edit == "sparse":
                return  # safetensors holds one flat mapping of dense tensors
            save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        else:
            torch.save(_wrap(state, wrapper), path)
        argv = ["run", "teacher", "--out", str(workdir / "run"), "--teacher-checkpoint", str(path), *SETS]
        code = run_cli(argv)
        err = capsys.readouterr().err
        assert code in (0, 2) and "Traceback" not in err, (code, err)
        if code == 2:
            assert err.strip().splitlines()[-1].startswith("error: "), err
        assert code == (0 if usable else 2), (value_edit, key_edit, wrapper, fmt, err)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kdiffusion_checkpoint(path: Path) -> dict:
    """A pipeline checkpoint of a ResNet-20 student as KDiffusion trains it (m-branch blocks), and its metadata."""
    from pipeline.artifacts.checkpoint import ModelMeta, save_checkpoint
    from pipeline.models import model_info
    from pipeline.reparam import apply_reparam

    sites = [[s.conv, s.bn] for s in model_info("resnet20").reparam_sites]
    reparam = {"kind": "multibranch", "sites": sites, "m": 2, "mixed_kernels": False, "scale_init": False}
    model = apply_reparam(build_model("resnet20", 4), reparam)
    meta = ModelMeta("resnet20", 4, 32, [0.5] * 3, [0.25] * 3, list("abcd"), reparam=reparam)
    save_checkpoint(path, model.state_dict(), meta)
    return dataclasses.asdict(meta)


META_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(),
    st.text(max_size=8),
    st.sampled_from(["multibranch", "layer1.0.conv1", "timm:resnet18", "gray", "fused", "../x", "bn1"]),
    st.lists(st.sampled_from(["layer1.0.conv1", "layer1.0.bn1", "fc", "", 3]), max_size=3),
    st.dictionaries(st.sampled_from(["kind", "sites", "m", "bogus"]), st.integers(0, 3), max_size=2),
)


@pytest.mark.slow
@settings(FUZZ, max_examples=5 * EXAMPLES)  # about 0.02 s a case
@given(
    path=st.lists(st.integers(0, 40), min_size=1, max_size=4),
    value=META_VALUES,
    added=st.one_of(st.none(), st.tuples(st.booleans(), st.sampled_from(["bogus", "m", "kind", "arch"]), META_VALUES)),
)
def test_fuzz_checkpoint_metadata_loads_or_is_one_error(tmp_path_factory, path, value, added):
    """A pipeline checkpoint whose metadata has one value changed anywhere (`run export --checkpoint`, `predict`'s
    sources): the model loads, or a PipelineError says why; any other exception would be a traceback."""
    from safetensors.torch import load_file

    from pipeline.errors import PipelineError
    from pipeline.models.loading import load_model
    from tests.test_fuzz import _mutate

    folder = tmp_path_factory.mktemp("fuzz-meta")
    original = folder / "student.safetensors"
    meta = _kdiffusion_checkpoint(original)
    edited = folder / "edited.safetensors"
    meta = _mutate(meta, path, value)
    if added is not None:  # a key set (or added) at the top or in the reparam record
        in_reparam, key, extra = added
        target = meta.get("reparam") if in_reparam and isinstance(meta, dict) else meta
        if isinstance(target, dict):
            target[key] = extra
    save_file(load_file(str(original)), str(edited), metadata={"pipeline": json.dumps(meta)})
    try:
        model, loaded = load_model(edited)
    except PipelineError:
        return
    assert loaded.num_classes == model(torch.zeros(1, 3, 32, 32)).shape[1]


@pytest.fixture(scope="module")
def resume_state(tmp_path_factory) -> tuple[Path, Path, dict]:
    """A finished small teacher run, its teacher folder removed, and the resume state its training saved last:
    the rerun resumes from whatever that file then holds."""
    import pipeline.training.loop as loop

    run = tmp_path_factory.mktemp("fuzz-resume") / "run"
    saved: list[tuple[Path, bytes]] = []  # the file goes once the stage is committed; its bytes are kept

    def save(path: Path, state: dict) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        saved.append((path, buffer.getvalue()))
        original(path, state)

    original = loop.save_state
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "save_state", save)
        argv = ["run", "teacher", "--out", str(run), *SETS, "--set", "training.checkpoint_every=1"]
        assert run_cli(argv) == 0
    path, data = saved[0]  # the first: mid-epoch, as a killed run leaves it
    return run, path, torch.load(io.BytesIO(data), weights_only=True)


RESUME_VALUES = st.one_of(
    st.none(),
    st.integers(-5, 10**6),
    st.text(max_size=4),
    st.lists(st.integers(), max_size=3),
    st.sampled_from([torch.zeros(3), torch.full((2, 2), float("nan")), torch.zeros(0, dtype=torch.int64)]),
)


@pytest.mark.slow
@FUZZ
@given(path=st.lists(st.integers(0, 60), min_size=1, max_size=4), value=RESUME_VALUES)
def test_fuzz_an_edited_resume_state_resumes_or_is_one_error(resume_state, path, value, capsys):
    """A training stage's resume state (.scratch/<stage>/resume.pt), one value replaced: the rerun resumes, or
    says in one line to delete the file; never a traceback."""
    from tests.test_fuzz import _mutate

    run, file, state = resume_state
    shutil.rmtree(run / "teacher", ignore_errors=True)
    file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(_mutate(state, path, value), file)
    code = run_cli(["run", "teacher", "--out", str(run), *SETS, "--set", "training.checkpoint_every=1"])
    err = capsys.readouterr().err
    assert code in (0, 1, 2) and "Traceback" not in err, (code, err)
    if code == 2:
        assert err.strip().splitlines()[-1].startswith("error: "), err


@pytest.mark.slow
@pytest.mark.parametrize(
    "path, value, message",
    [
        (["partial"], None, "the partial epoch's sums are not numbers"),  # 'NoneType' has no attribute 'get'
        (["scheduler", "base_lrs"], [None], "the LR schedule's state: base_lrs[0] is not of the form"),
        (["optimizer", "param_groups"], [], "the optimizer's param_groups is not of the form"),
        (["optimizer", "param_groups"], [{"lr": 0.1}], "the optimizer's param_groups[0] is not of the form"),
        (["format"], torch.zeros(3), "is not resume state of this pipeline version"),  # an ambiguous tensor
        (["epoch"], 10**6, "position (1000000, "),
    ],
)
def test_an_edited_resume_state_is_one_error(resume_state, path, value, message, capsys):
    run, file, state = resume_state
    shutil.rmtree(run / "teacher", ignore_errors=True)
    edited = dict(state)
    if len(path) == 2:
        edited[path[0]] = {**state[path[0]], path[1]: value}
    else:
        edited[path[0]] = value
    file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(edited, file)
    assert run_cli(["run", "teacher", "--out", str(run), *SETS, "--set", "training.checkpoint_every=1"]) == 2
    err = capsys.readouterr().err
    assert message in err and "delete it to restart the stage" in err, err
