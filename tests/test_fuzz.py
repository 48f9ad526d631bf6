"""Property-based fuzzing of the CLI, config files and manifests (issue 13).

Every generated input must end with exit status 0, 1, 2 or 130, never with an exception escaping the CLI
(a traceback), must change no file outside its run folder, and, when it is refused (status 2), must be
refused before any stage starts. The stages' own work is replaced by a stub that writes one file, so a case
takes milliseconds while the runner, store and manifests run for real.

CI runs ``KDPIPE_FUZZ_EXAMPLES`` (default 40) examples per property; a larger budget runs by hand::

    KDPIPE_FUZZ_EXAMPLES=2000 KDPIPE_FUZZ_RANDOM=1 KDPIPE_FUZZ_LOG=fuzz.tsv pytest -n0 tests/test_fuzz.py

(``KDPIPE_FUZZ_RANDOM=1`` draws new cases instead of CI's fixed ones; ``KDPIPE_FUZZ_LOG`` appends each case's
property test, exit status, whether a stage started and the error line, for the figures in docs/fuzzing.md.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.cli import run_cli
from stages import STAGES, StageResult, get_stage, stage_order

ORDER = stage_order()

EXAMPLES = int(os.environ.get("KDPIPE_FUZZ_EXAMPLES", "40"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not os.environ.get("KDPIPE_FUZZ_RANDOM"),  # CI: the same cases every run
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture
def started(monkeypatch) -> list[str]:
    """Stub every stage's work: it records that the stage started and writes one small artifact."""
    calls: list[str] = []
    get_stage("teacher")  # registers every stage

    def run(self, ctx) -> StageResult:
        calls.append(self.name)
        return _stub(self, ctx)

    for name in ORDER:
        monkeypatch.setattr(STAGES.get(name), "run", run)
    return calls


def _config_keys() -> list[str]:
    from pipeline.config import Config

    def walk(obj, prefix: str):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                yield f"{prefix}{f.name}"
                yield from walk(value, f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}"

    return sorted(walk(Config(), ""))


KEYS = _config_keys()
METHOD_OPTIONS = ["temperature", "ce_weight", "kd_weight", "nce_k", "m", "mixed_kernels", "schedule", "bogus"]
VALUES = st.one_of(
    st.sampled_from(
        [
            "null",
            "",
            "~",
            ".inf",
            "-.inf",
            ".nan",
            "0",
            "-1",
            "1",
            "2",
            "1e999",
            "1.0e999",
            "7" * 5000,
            "true",
            "maybe",
            "[]",
            "{}",
            "[1, 2]",
            "{a: 1}",
            "{1: 2}",
            "abc",
            "/abs/path",
            "../up",
            "'  '",
            "cpu",
            "meta",
            "&a [*a]",
            "!!python/object:os.system x",
            "[[[[[[]]]]]]",
            "kd",
            "crd",
            "kdiffusion",
            "synthetic",
        ]
    ),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=12),
)
SETS = st.lists(
    st.tuples(
        st.one_of(
            st.sampled_from(KEYS),
            st.sampled_from(METHOD_OPTIONS).map(lambda k: f"student.method_args.{k}"),
            st.text(max_size=10),
        ),
        VALUES,
    ).map(lambda kv: ["--set", f"{kv[0]}={kv[1]}"]),
    max_size=4,
)
OPTIONS = st.lists(
    st.one_of(
        st.tuples(st.just("--method"), st.sampled_from(["kd", "vanilla", "crd", "dkd", "kdiffusion", "nope", ""])),
        st.tuples(st.just("--seed"), st.sampled_from(["0", "1", "-1", "x", "7" * 400, str(2**32)])),
        st.tuples(st.just("--device"), st.sampled_from(["auto", "cpu", "cuda:7", "meta", "mps", "", "x" * 300])),
        st.tuples(st.just("--preset"), st.sampled_from(["default", "../../x", "p" * 300, "", "nope"])),
        st.tuples(st.just("--data-root"), st.sampled_from(["", "/nonexistent", "d" * 5000])),
        st.tuples(st.just("--teacher-checkpoint"), st.sampled_from(["", "/no/such.pth", "c" * 100_000])),
        st.tuples(st.just("--checkpoint"), st.sampled_from(["", "/no/such.safetensors"])),
    ).map(list),
    max_size=3,
)
STAGE_ARGS = st.lists(st.sampled_from(["all", *ORDER]), max_size=2)
OUT = st.sampled_from(["run", "", "a-file", "foreign", "a-file/run"])
TINY = [a for item in ("data.synthetic.train_size=16", "data.synthetic.test_size=8") for a in ("--set", item)]


def _snapshot(root: Path, skip: Path | None = None) -> dict[str, str]:
    """Every path below ``root`` (but ``skip``) with its content's hash; links are listed, not followed."""
    files = {}
    for folder, subfolders, names in os.walk(root):
        for name in sorted(subfolders + names):
            path = Path(folder) / name
            if skip is not None and (path == skip or skip in path.parents):
                continue
            if path.is_symlink():
                files[str(path)] = f"-> {os.readlink(path)}"
            elif path.is_file():
                files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                files[str(path)] = "dir"
    return files


def _check(argv: list[str], workdir: Path, run: Path | None, started: list[str], capsys) -> int:
    """Run the CLI in ``workdir`` and assert the properties; returns the exit status."""
    before = _snapshot(workdir, run)
    started.clear()
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        code = run_cli(argv)  # an exception escaping here is a traceback for the user: the test fails
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    assert code in (0, 1, 2, 130), (argv, code, err)
    assert "Traceback" not in err, (argv, err)
    if code == 2:
        assert not started, f"{argv!r} started {started} before it was refused: {err}"
        assert err.strip().splitlines()[-1].startswith("error: "), err
    assert _snapshot(workdir, run) == before, f"{argv!r} changed files outside its run folder"
    if os.environ.get("KDPIPE_FUZZ_LOG"):
        with open(os.environ["KDPIPE_FUZZ_LOG"], "a") as log:
            test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
            last = err.strip().splitlines()[-1][:100] if code and err.strip() else ""
            log.write(f"{test}\t{argv[0]}\t{code}\t{int(bool(started))}\t{last}\n")
    return code


def _workdir() -> Path:
    workdir = Path(tempfile.mkdtemp(prefix="fuzz-"))
    (workdir / "a-file").write_text("not a folder")
    (workdir / "foreign" / "teacher").mkdir(parents=True)
    (workdir / "foreign" / "teacher" / "thesis.txt").write_text("keep")
    return workdir


@FUZZ
@given(stages=STAGE_ARGS, options=OPTIONS, sets=SETS, out=OUT)
def test_fuzz_command_lines(stages, options, sets, out, started, capsys):
    workdir = _workdir()
    try:
        argv = ["run", *stages, "--out", out, *TINY, *(a for o in options for a in o), *(a for s in sets for a in s)]
        _check(argv, workdir, workdir / "run" if out == "run" else None, started, capsys)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


YAML_DATA = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=6), st.integers()), children, max_size=3)
    ),
    max_leaves=12,
)
CONFIG_TEXT = st.one_of(
    YAML_DATA.map(lambda data: json.dumps(data, default=str).encode()),
    st.binary(max_size=64),
    st.sampled_from(
        [
            b"a: &a [1, 2]\nb: [*a, *a, *a]\n",
            b"seed: 1\n" * 3,
            b"\xff\xfe\x00",
            b"name: /etc\n",
            b"teacher: null\n",
            b"data:\n  root: ''\n",
            b"student: {method_args: {temperature: .nan}}\n",
            b"!!binary AAAA",
        ]
    ),
)


@FUZZ
@given(content=CONFIG_TEXT, stages=STAGE_ARGS)
def test_fuzz_config_files(content, stages, started, capsys):
    workdir = _workdir()
    try:
        (workdir / "exp.yaml").write_bytes(content)
        argv = ["run", *stages, "--config", "exp.yaml", "--out", "run", *TINY]
        _check(argv, workdir, workdir / "run", started, capsys)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def _stubbed_stages():
    """Every stage's work replaced by :func:`_stub`, for a module-scoped fixture (``started`` is per test)."""
    with pytest.MonkeyPatch.context() as patch:
        get_stage("teacher")
        for name in ORDER:
            patch.setattr(STAGES.get(name), "run", lambda self, ctx: _stub(self, ctx))
        yield patch


@pytest.fixture(scope="module")
def stubbed_run(tmp_path_factory) -> Path:
    """A run folder whose every stage was made by the stub (real manifests, chained)."""
    out = tmp_path_factory.mktemp("fuzz-run") / "run"
    with _stubbed_stages():
        assert run_cli(["run", "all", "--out", str(out), *TINY]) == 0
    return out


def _stub(stage, ctx) -> StageResult:
    for name in ("artifact.bin", *stage.outputs):  # the runner refuses a stage that misses a declared output
        (ctx.out / name).parent.mkdir(parents=True, exist_ok=True)
        (ctx.out / name).write_bytes(stage.name.encode())
    return StageResult(metrics={"value": 1.0})


JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=8),
    st.sampled_from(["/etc/passwd", "../../../../etc/passwd", "0" * 64, "ok", "failed"]),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


def _mutate(data, path: list, value):
    """Set the item at ``path`` (indices reduced modulo the container sizes) to ``value``."""
    if not path or not isinstance(data, dict | list) or not data:
        return value
    if isinstance(data, dict):
        key = sorted(data)[path[0] % len(data)]
        return {**data, key: _mutate(data[key], path[1:], value)}
    index = path[0] % len(data)
    return [*data[:index], _mutate(data[index], path[1:], value), *data[index + 1 :]]


@pytest.mark.slow
@FUZZ
@given(
    stage=st.sampled_from([s for s in ORDER]),
    path=st.lists(st.integers(min_value=0, max_value=50), min_size=1, max_size=4),
    value=JSON_VALUES,
    rerun=st.sampled_from([[], ["all"], ["fuse"], ["export"]]),
)
def test_fuzz_manifests_every_edit_is_detected(stubbed_run, stage, path, value, rerun, started, capsys):
    workdir = Path(tempfile.mkdtemp(prefix="fuzz-"))
    try:
        run = workdir / "run"
        shutil.copytree(stubbed_run, run, symlinks=True)
        manifest = run / stage / "manifest.json"
        original = json.loads(manifest.read_text())
        edited = _mutate(original, path, value)
        manifest.write_text(json.dumps(edited))
        code = _check(["inspect", str(run)], workdir, None, started, capsys)
        if edited != original:
            assert code == 2, f"inspect missed an edit of {stage}/manifest.json at {path}: {value!r}"
        if rerun:
            _check(["run", *rerun, "--out", str(run), *TINY], workdir, run, started, capsys)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


class _Ended:
    def __init__(self, code: int):
        self.code = code

    def poll(self) -> int:
        return self.code

    def stop(self) -> None:
        pass


class InProcessBackend:
    """The sweep's cells as `run_cli` calls in this process, so that the stubbed stages apply; records each
    task's exit status."""

    codes: ClassVar[list[tuple[str, int]]] = []

    def __init__(self, slots: int = 1, gpus=(), threads: int = 0):
        self.slots = 1

    def start(self, task, slot: int) -> _Ended:
        task.log.parent.mkdir(parents=True, exist_ok=True)
        with open(task.log, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            code = run_cli(task.argv)
        InProcessBackend.codes.append((task.name, code))
        return _Ended(code)


@pytest.fixture
def in_process(monkeypatch, started) -> list[tuple[str, int]]:
    monkeypatch.setattr("pipeline.experiments.scheduler.LocalBackend", InProcessBackend)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # a cell's --threads must not outlive the case
    InProcessBackend.codes = []
    return InProcessBackend.codes


def _mostly(valid: list[str], hostile: list[str]) -> st.SearchStrategy[str]:
    """Values where a valid one is drawn about as often as a hostile one, so that cells run in many cases."""
    return st.one_of(st.sampled_from(valid), st.sampled_from(hostile))


SWEEP_OPTIONS = st.lists(
    st.one_of(
        st.tuples(st.just("--method"), _mostly(["kd", "kd,vanilla", "dkd,at"], ["kd,kd", ",", "", "nope", "kd,nope"])),
        st.tuples(st.just("--seed"), _mostly(["0", "0,1", "3"], ["1,1", "-1", "x", ",", "7" * 400, str(2**63)])),
        st.tuples(st.just("--teacher-seed"), _mostly(["0", "3"], ["-3", "x", str(2**64)])),
        st.tuples(st.just("--preset"), _mostly(["default"], ["default,default", "", ",", "../x", "nope"])),
        st.tuples(st.just("--device"), _mostly(["auto", "cpu"], ["cuda", "cuda:7", "meta", ""])),
        st.tuples(st.just("--data-root"), st.sampled_from(["", "/nonexistent", "a-file"])),
        st.tuples(st.just("--teacher-checkpoint"), st.sampled_from(["", "/no/such.pth", "a-file", "foreign"])),
        st.tuples(st.just("--jobs"), _mostly(["1", "2"], ["0", "-1", str(2**40)])),
        st.tuples(st.just("--threads"), _mostly(["1"], ["0", "4096", "x"])),
        st.tuples(st.just("--config"), st.sampled_from(["", "a-file", "/no/such.yaml", "foreign"])),
        st.just(("--dry-run",)),
    ).map(list),
    max_size=3,
)
AXES = [  # settings that make a valid axis, and the values to draw for them
    ("student.optim.lr", ["0.1", "0.05", "0", "-1", ".nan", "x"]),
    ("data.batch_size", ["4", "8", "0", "2.5"]),
    ("student.method_args.temperature", ["2", "4", "0", "abc"]),
    ("training.amp", ["off", "auto", "bf16", "bogus"]),
    ("export.precisions", ["[fp32]", "[fp32, fp16]", "[bogus]", "fp32"]),
    ("teacher.optim.epochs", ["1", "2", "0", str(10**12)]),
]
SWEEP_SETS = st.lists(
    st.one_of(
        st.sampled_from(AXES).flatmap(
            lambda kv: st.lists(st.sampled_from(kv[1]), min_size=1, max_size=2).map(
                lambda values, key=kv[0]: f"{key}={','.join(values)}"
            )
        ),
        st.tuples(st.one_of(st.sampled_from(KEYS), st.text(max_size=10)), VALUES).map(lambda kv: f"{kv[0]}={kv[1]}"),
    ).map(lambda item: ["--set", item]),
    max_size=2,
)
SWEEP_OUT = _mostly(["sweep", "a-sweep"], ["", "a-file", "foreign", "a-run"])


@pytest.fixture(scope="module")
def stubbed_sweep(tmp_path_factory) -> Path:
    """A finished sweep of two cells, made with the stubbed stages."""
    out = tmp_path_factory.mktemp("fuzz-sweep") / "sweep"
    with _stubbed_stages() as patch:
        patch.setattr("pipeline.experiments.scheduler.LocalBackend", InProcessBackend)
        InProcessBackend.codes = []
        assert run_cli(["sweep", "--out", str(out), "--method", "kd,vanilla", *TINY]) == 0
    return out


@pytest.mark.slow
@FUZZ
@given(options=SWEEP_OPTIONS, sets=SWEEP_SETS, out=SWEEP_OUT, config=st.one_of(st.none(), CONFIG_TEXT))
def test_fuzz_sweep_command_lines(stubbed_run, stubbed_sweep, options, sets, out, config, in_process, started, capsys):
    """Every mistake in a sweep's command line is refused before the first cell starts: once cells run, none of
    them fails on a setting (status 2)."""
    in_process.clear()  # the fixture lives across Hypothesis's examples
    workdir = _workdir()
    try:
        shutil.copytree(stubbed_run, workdir / "a-run", symlinks=True)
        shutil.copytree(stubbed_sweep, workdir / "a-sweep", symlinks=True)
        argv = ["sweep", "--out", out, *TINY, *(a for o in options for a in o), *(a for s in sets for a in s)]
        if config is not None:
            (workdir / "exp.yaml").write_bytes(config)
            argv += ["--config", "exp.yaml"]
        target = workdir / out if out in ("sweep", "a-sweep") else None
        code = _check(argv, workdir, target, started, capsys)
        assert not [c for c in in_process if c[1] == 2], f"{argv!r}: a cell refused its settings: {in_process}"
        if code == 2 or "--dry-run" in argv:
            assert not in_process, f"{argv!r} started cells {in_process}"
            if out == "sweep":
                assert not (workdir / "sweep").exists(), f"{argv!r} wrote a sweep folder it then refused"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


REAL_TINY = [
    a
    for item in (
        "data.synthetic.train_size=96",
        "data.synthetic.test_size=32",
        "data.num_classes=4",
        "data.batch_size=32",
        "teacher.arch=resnet20",
        "teacher.optim.epochs=1",
        "student.arch=resnet20",
        "student.optim.epochs=1",
        "verify.samples=16",
        "export.parity_samples=8",
    )
    for a in ("--set", item)
]


@pytest.fixture(scope="module")
def trained_sweep(tmp_path_factory) -> Path:
    """A finished sweep of two small cells (vanilla and KD) whose stages really ran, in this process."""
    out = tmp_path_factory.mktemp("fuzz-trained") / "sweep"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("pipeline.experiments.scheduler.LocalBackend", InProcessBackend)
        patch.setattr(torch, "set_num_threads", lambda n: None)
        assert run_cli(["sweep", "--out", str(out), "--method", "vanilla,kd", *REAL_TINY]) == 0
    return out


SWEEP_RECORD_EDITS = st.one_of(
    st.tuples(st.just("value"), st.lists(st.integers(0, 50), min_size=1, max_size=5), JSON_VALUES),
    st.tuples(st.just("bytes"), st.binary(max_size=32), st.none()),
)


@pytest.mark.slow
@FUZZ
@given(
    edit=SWEEP_RECORD_EDITS,
    command=st.one_of(
        st.tuples(st.just("compare"), st.sampled_from([[], ["--best"]]), st.sampled_from(["table", "json", "csv"])),
        st.tuples(st.just("report"), st.just([]), st.none()),
    ),
)
def test_fuzz_compare_and_report_read_an_edited_sweep_record(trained_sweep, edit, command, capsys):
    """compare and report on a sweep whose record (sweep.json) was edited: a table and a page, or one line and
    exit 2; never a traceback, and nothing written outside the sweep folder."""
    workdir = Path(tempfile.mkdtemp(prefix="fuzz-"))
    try:
        sweep = workdir / "sweep"
        shutil.copytree(trained_sweep, sweep, symlinks=True)
        record = sweep / "sweep.json"
        if edit[0] == "value":
            record.write_text(json.dumps(_mutate(json.loads(record.read_text()), edit[1], edit[2])))
        else:
            record.write_bytes(edit[1])
        name, flags, fmt = command
        argv = [name, str(sweep), *flags, *(["--format", fmt] if fmt else [])]
        code = _check(argv, workdir, sweep, [], capsys)
        assert code in (0, 2), (argv, code)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
