"""Hostile and careless settings (issue 13): one line, exit 2, and no stage started, for every case.

Each case is a command line (plus, for some, a config file's bytes); the run folder must stay untouched
because every one of them can be refused before the first stage starts.
"""

from __future__ import annotations

import pytest

from pipeline.cli import run_cli

BILLION_LAUGHS = "\n".join(
    ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    + ["data: {root: *a8}"]
)

CONFIG_FILES = {
    "int-key": (b"1: 2\n", "key 1; option names must be strings"),
    "null-key": (b"~: 3\n", "key None; option names must be strings"),
    "nested-int-key": (b"data: {1: 2}\n", "key 1; option names must be strings"),
    "latin-1": ("name: caf\xe9\n".encode("latin-1"), "is not UTF-8 text"),
    "deep": (b"[" * 5000 + b"]" * 5000, "nested deeper than 32 levels"),
    "billion-laughs": (BILLION_LAUGHS.encode(), "expands to more than 100000 values"),
    "huge": (b"# " + b"x" * (2 << 20) + b"\n", "larger than 1024 KiB"),
    "long-seed": (b"seed: " + b"7" * 5000 + b"\n", "holds a value YAML cannot convert"),
    "empty": (b"", "must hold a non-empty mapping"),
    "absolute-name": (b"name: /tmp/elsewhere\n", "must be a plain folder name"),
    "dotdot-name": (b"name: ../../elsewhere\n", "must be a plain folder name"),
    "null-section": (b"teacher:\n", "teacher is null; give its settings or leave it out"),
    "null-subsection": (b"teacher: {optim: null}\n", "teacher.optim is null"),
    "list-section": (b"data: [1, 2]\n", "data must be a mapping, got [1, 2]"),
    "number-section": (b"student: 3\n", "student must be a mapping, got 3"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_FILES))
def test_hostile_config_files_are_refused_in_one_line(case, tmp_path, capsys):
    content, message = CONFIG_FILES[case]
    path = tmp_path / "exp.yaml"
    path.write_bytes(content)
    _refused(["run", "--config", str(path)], message, tmp_path, capsys)


LONG = "7" * 5000

OPTIONS = [
    (["--set", f"seed={LONG}"], "holds a value YAML cannot convert"),
    (["--seed", LONG], "Invalid value for '--seed'"),
    (["--preset", "p" * 300], "unknown preset 'ppppp"),
    (["--preset", "../../x"], "unknown preset '../../x'"),
    (["--preset", "../presets/default"], "unknown preset"),
    (["--preset", ""], "--preset is empty; give a name that `presets` lists, or leave it out"),
    (["--preset", " "], "--preset is empty"),
    (["--set", "data=[1, 2]"], "data must be a mapping, got [1, 2]"),
    (["--set", "teacher=3"], "teacher must be a mapping, got 3"),
    (["--teacher-checkpoint", "/" + "c" * 100_000], "teacher.checkpoint is too long for a file path"),
    (["--teacher-checkpoint", "/" + "c" * 200 + "/t.pth"], "..." + "c" * 34 + "/t.pth (207 characters) does not exist"),
    (["--teacher-checkpoint", ""], "teacher.checkpoint is empty"),
    (["--data-root", ""], "data.root is empty"),
    (["--out", ""], "--out is empty"),
    (["--out", "run\udcff"], "--out 'run\\udcff' is not valid UTF-8"),  # the byte 0xff of a Latin-1 file name
    (["--threads", "100000"], "--threads 100000 is more than the"),
    (["--set", "name=/abs/run"], "must be a plain folder name"),
    (["--set", "name=.."], "must be a plain folder name"),
    (["--device", "meta"], "unknown device 'meta'; use auto, cpu, cuda or cuda:N"),
    (["--device", "mps"], "unknown device 'mps'"),
    (["--device", "xla"], "unknown device 'xla'"),
    (["--device", "cpu:3"], "unknown device 'cpu:3'"),
    (["--set", "teacher.optim.lr=.inf"], "teacher.optim.lr must be a finite number"),
    (["--set", "student.optim.weight_decay=.inf"], "student.optim.weight_decay must be a finite number"),
    (["--set", "teacher.optim.lr_decay=.nan"], "teacher.optim.lr_decay must be a finite number"),
    (["--set", "student.optim.lr=-.inf"], "must be a finite number"),
    (["--set", "teacher.optim.epochs=1000000000000"], "epochs must be in [1, 100000]"),
    (["--set", "data.batch_size=1000000000000"], "data.batch_size must be at least 1 and at most"),
    (["--set", "data.synthetic.train_size=1000000000000"], "data.synthetic.train_size must be"),
    (["--set", f"data.synthetic.seed={2**40}"], "data.synthetic.seed must be"),
    (["--set", "data.split_seed=-1"], "data.split_seed must be at least 0"),
    (["--set", f"verify.samples={2**70}"], "out of range"),
    (["--set", "teacher=null"], "teacher is null; give its settings or leave it out"),
    (["--set", "teacher.optim=null"], "teacher.optim is null"),
    (["--set", "data=null"], "data is null"),
    (["--set", "data="], "data is null"),
    (["--set", "student={}"], "student is empty"),
    (["--data-root", "/tmp"], "the dataset is 'synthetic', which reads no files"),
    (["--method", "kd", "--set", "student.method_args.ce_weight=abc"], "option ce_weight must be a number, got 'abc'"),
    (["--method", "kd", "--set", "student.method_args.temperature=0"], "option temperature must be in (0, 10000]"),
    (["--method", "kd", "--set", "student.method_args.kd_weight=-1"], "option kd_weight must be in [0, 1e+06]"),
    (["--method", "kd", "--set", "student.method_args.temperature=.nan"], "option temperature must be a finite number"),
    (["--method", "kd", "--set", "student.method_args.ce_weight=.inf"], "option ce_weight must be a finite number"),
    (["--method", "crd", "--set", f"student.method_args.nce_k={10**12}"], "option nce_k must be in [1, 1.04858e+06]"),
    (["--method", "crd", "--set", "student.method_args.nce_k=1.5"], "option nce_k must be an integer"),
    (["--method", "crd", "--set", "student.method_args.nce_m=1"], "option nce_m must be in [0, 1)"),
    (["--method", "kdiffusion", "--set", "student.method_args.mixed_kernels=maybe"], "must be true or false"),
    (["--method", "kdiffusion", "--set", "student.method_args.m=true"], "option m must be an integer"),
    (["--method", "kdiffusion", "--set", "student.method_args.schedule=[1]"], "option schedule must be a string"),
    (["--method", "vid", "--set", "student.method_args.eps=0"], "option eps must be in (0, 1]"),
    (["--method", "vid", "--set", "student.method_args.init_variance=0.000001"], "need init_variance > eps > 0"),
]


@pytest.mark.parametrize("argv, message", OPTIONS, ids=[" ".join(a)[:60] for a, _ in OPTIONS])
def test_hostile_options_are_refused_before_any_stage(argv, message, tmp_path, capsys):
    _refused(["run", "all", *argv], message, tmp_path, capsys)


@pytest.mark.parametrize("argv", [["run", "all"], ["run", "all", "--dry-run"], ["run", "export"]])
def test_a_gpu_this_process_cannot_see_is_refused_before_any_stage(argv, tmp_path, capsys, monkeypatch):
    """A dry run fails where the run would, and nothing is made, not even the run folder."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # also where CI has a GPU
    _refused([*argv, "--device", "cuda:0"], "device 'cuda:0' was requested but CUDA is not available", tmp_path, capsys)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"WORLD_SIZE": "4"}, "WORLD_SIZE=4 is set but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not"),
        ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "x"}, "MASTER_PORT is not"),
        ({"WORLD_SIZE": "many"}, "WORLD_SIZE='many' is not a process number"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be at least 1"),
    ],
)
def test_a_partial_torchrun_environment_is_one_line(env, message, tmp_path, capsys, monkeypatch):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    _refused(["run", "all"], message, tmp_path, capsys)


def test_every_numeric_method_option_declares_its_range():
    """Ranges live next to each method; a new numeric option without one would accept 10**12 or -1."""
    from pipeline.distill import METHODS, method_names, option_types

    for name in method_names():
        bounds = METHODS.get(name).option_bounds
        for option, kind in option_types(name).items():
            if kind in (int, float):
                assert option in bounds, f"method {name!r} option {option!r} declares no Bound"


def test_method_defaults_are_within_their_declared_ranges():
    import inspect

    from pipeline.distill import METHODS, check_method_args, method_names, method_options

    for name in method_names():
        params = inspect.signature(METHODS.get(name).__init__).parameters
        check_method_args(name, {k: params[k].default for k in method_options(name)})


def _refused(argv: list[str], message: str, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    before = sorted(p.name for p in tmp_path.iterdir())
    if "--out" not in argv:
        argv = [*argv, "--out", str(out)]
    code = run_cli(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err, err
    lines = [line for line in err.strip().splitlines() if not line.startswith("note: ")]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "running" not in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("presets", [[""], [","], ["default", " "]])
def test_an_empty_preset_name_is_refused_by_sweep_too(presets, tmp_path, capsys):
    """`sweep --preset ''` must not quietly sweep the default preset either."""
    argv = ["sweep", *(a for p in presets for a in ("--preset", p)), "--dry-run", "--out", str(tmp_path / "run")]
    _refused(argv, "--preset is empty", tmp_path, capsys)


def test_a_sweep_folder_whose_name_is_not_utf8_is_refused(tmp_path, capsys):
    """TensorBoard writes the run folder's path as UTF-8: a Latin-1 name was a traceback in the first cell."""
    _refused(["sweep", "--method", "kd", "--out", str(tmp_path / "grid\udcff")], "is not valid UTF-8", tmp_path, capsys)
