"""Support matrix: one small model of every timm family and every torchvision classifier, exported.

For each model a random-weight checkpoint with 20 classes is written (the model built exactly as the
pipeline builds ``timm:NAME`` / ``torchvision:NAME``, so the state dict loads strictly, by a worker process
per job that keeps torch and timm imported), then the
export-only path runs on it as a subprocess with a per-model timeout::

    python -m pipeline run export --checkpoint M.safetensors --set student.arch=timm:NAME \\
        --set data.image_size=64 --set 'export.precisions=[fp32,fp16,int8]' [MATRIX_SETS] --out <work>

and the verdict of each precision (the export manifest's checks), the ONNX Runtime latency (the export
report's ``latency``) and, for a failure, the one-line ``error: ...`` are recorded. Exit status 1 is a
gate that failed, 2 a model refused as unsupported (one line), SIGKILL the kernel's out-of-memory killer
(the machine's memory, not a bug: ``killed``), anything else or a ``Traceback`` on stderr is a traceback: a bug.

A timm *family* is the timm module a model is registered in (``timm.models._registry._model_to_module``,
e.g. ``resnet``, ``efficientnet``, ``vision_transformer``); its representative is the variant with the
fewest parameters (counted on the meta device, 20 classes; ``test_*`` models are left out where the
family has another). A torchvision classifier is every name of
``torchvision.models.list_models(module=torchvision.models)``; its family is its builder's module.

Inputs are 64 px, models with a "fixed" input size included (timm builds a transformer's token grid for the
size it is given); where the model cannot be built or run at 64 px, 96 px, and where 96 px cannot either, or
64 px fails later with an error (not a gate), its pretrained config's size (224 for torchvision). Every attempt
is recorded.

:data:`MATRIX_SETS` sizes the samples for a support matrix rather than an accuracy figure: random weights
have nothing to measure to a tenth of a point, and 178 models must fit an hour on two cores. Every gate
still judges (fp16 and INT8 against fp32 on 100 test images, one flip allowed; parity on 16; the INT8
ranges from 16 calibration images; latency a median of 5 passes); ``--set`` options given here come after them and win.

Resumable: results go to ``<out>/results.json`` (or ``--results``) as each model finishes, and a rerun skips
the models already there. The committed ``docs/model-matrix.json`` holds the results behind the doc, with the
machine of every run, so the next session carries on with ``--results docs/model-matrix.json``. Models run in
order of parameter count, smallest first. ``--jobs N`` exports N models at once, each child on a core of its own
(``OMP_NUM_THREADS=1`` unless set, and pinned to one CPU; ONNX Runtime's sessions then size their pools by that one
CPU, :func:`exports.runners.default_threads`, instead of pinning threads to the other jobs' cores). Each job's
exports are forked from one process that has imported the libraries (:func:`export_zygote`): the command recorded
runs as it would from a shell, less 5 s of imports. The doc gives the subprocess time, the wall clock of the
command(s), catalogue included, and the seconds of each export step summed over the models (``timings_s`` of the
export report).

Usage:
    OMP_NUM_THREADS=1 python benchmarks/model_matrix.py [--out runs/model-matrix] [--limit N]
        [--only fam1,fam2] [--timeout S] [--doc docs/model-matrix.md] [--no-torchvision] [--no-timm]
        [--precisions fp32,fp16,int8] [--set key=value ...] [--jobs N] [--doc-only] [--results PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import queue
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLASSES = 20
# sample counts for every export of the matrix (the pipeline's defaults are for a trained model's figures)
MATRIX_SETS = (
    "data.synthetic.train_size=128",  # the calibration images are drawn from it
    "data.synthetic.test_size=100",
    "export.eval_samples=100",  # fp16 / INT8 vs fp32: top-1 agreement >= 0.99 allows one flip in 100
    "export.calibration_samples=16",  # INT8 ranges and the fp16 guard: 16 images of every activation
    "export.parity_samples=16",  # fp32 ONNX vs PyTorch, 20 logits each
    "export.cpu_int8_latency=false",  # the matrix gives the exported INT8 model's latency, not a cpu-target one's
    "export.latency_runs=5",  # a median of 5 after 1 warm-up (on the session the checks warmed): a comparison
    "export.latency_warmup=1",
)
DEFAULT_SIZE = 64
SECOND_SIZE = 96  # where 64 px cannot be built: Inception runs at 96 px instead of its 299
PRECISIONS = ("fp32", "fp16", "int8")
# ``--distill``: the model as a KDiffusion student of a small zoo teacher, a few steps on a few synthetic images;
# what is judged is the path (branches placed, trained, fused back, the fused model equal to the trained one),
# not an accuracy
DISTILL_STAGES = ("teacher", "train", "fuse", "verify")
DISTILL_SETS = (
    "data.synthetic.train_size=64",
    "data.synthetic.test_size=32",
    "data.batch_size=32",
    "teacher.arch=resnet20",
    "teacher.optim.epochs=1",
    "teacher.optim.milestones=[]",
    "student.method=kdiffusion",
    "student.optim.epochs=1",
    "student.optim.milestones=[]",
    "verify.samples=32",
)
# a student with fewer sites than the default 3 layers: distilled again with as many layers as it has
SITES_REFUSAL = re.compile(r"declares (\d+) re-parameterization sites")

# --- the catalogue: families and their smallest variant ---


def timm_family(name: str) -> str:
    """The timm module ``name`` is registered in: its family (``resnet10t`` -> ``resnet``)."""
    from timm.models import _registry

    name = _registry.get_arch_name(name)
    module = _registry._model_to_module.get(name)
    if module is None:  # not registered under its own name: the module of its entrypoint
        module = _registry.model_entrypoint(name).__module__
    return module.rsplit(".", 1)[-1]


def torchvision_family(name: str) -> str:
    from torchvision.models import get_model_builder

    return "torchvision." + get_model_builder(name).__module__.rsplit(".", 1)[-1]


def smallest(counts: dict[str, int | None]) -> str | None:
    """The variant with the fewest parameters (ties: the name first in sort order); ``test_*`` models only
    where nothing else could be counted; ``None`` where nothing could be counted."""
    counted = {name: n for name, n in counts.items() if n is not None}
    real = {name: n for name, n in counted.items() if not name.startswith("test_")}
    pool = real or counted
    if not pool:
        return None
    return min(pool, key=lambda name: (pool[name], name))


def group_families(names: list[str], family=timm_family) -> dict[str, list[str]]:
    families: dict[str, list[str]] = {}
    for name in names:
        families.setdefault(family(name), []).append(name)
    return families


def count_parameters(build) -> int | None:
    """Parameters of the model ``build()`` makes, built on the meta device (no memory, no init cost)."""
    import torch

    try:
        with torch.device("meta"):
            model = build()
    except Exception:  # a model the meta device cannot build is left out of the choice
        return None
    return sum(p.numel() for p in model.parameters())


def count_timm(name: str) -> int | None:
    import timm

    return count_parameters(lambda: timm.create_model(name, num_classes=CLASSES))


def timm_catalogue(jobs: int = 1) -> list[dict]:
    """One row per timm family, its smallest variant; the 1,300 models counted by ``jobs`` processes (about 3
    minutes in one on 2026-12 Xeons)."""
    import timm
    from timm.models import get_pretrained_cfg

    families = sorted(group_families(timm.list_models()).items())
    names = [name for _, members in families for name in members]
    if jobs > 1:  # forked before any thread or tensor exists; the workers only build models on the meta device
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            counted = dict(zip(names, pool.map(count_timm, names, chunksize=8)))
    else:
        counted = {name: count_timm(name) for name in names}
    rows = []
    for family, names in families:
        counts = {n: counted[n] for n in names}
        pick = smallest(counts)
        if pick is None:
            rows.append(
                {
                    "key": f"timm:{names[0]}",
                    "lib": "timm",
                    "family": family,
                    "model": names[0],
                    "params": None,
                    "variants": len(names),
                }
            )
            continue
        cfg = get_pretrained_cfg(pick)
        cfg_size = int(cfg.input_size[-1]) if cfg is not None else 224
        rows.append(
            {
                "key": f"timm:{pick}",
                "lib": "timm",
                "family": family,
                "model": pick,
                "params": counts[pick],
                "variants": len(names),
                "sizes": _sizes(cfg_size),
            }
        )
    return rows


def torchvision_catalogue() -> list[dict]:
    import torchvision
    from torchvision.models import get_model

    rows = []
    for name in torchvision.models.list_models(module=torchvision.models):
        params = count_parameters(lambda name=name: get_model(name, weights=None, num_classes=CLASSES))
        rows.append(
            {
                "key": f"torchvision:{name}",
                "lib": "torchvision",
                "family": torchvision_family(name),
                "model": name,
                "params": params,
                "variants": 1,
                "sizes": _sizes(224),
            }
        )
    return rows


def _sizes(own: int, first: int | None = None) -> list[int]:
    """The input sizes tried, in order: ``first`` (64 px), :data:`SECOND_SIZE`, then the model's own size; only
    those below its own. A transformer's token grid is built for the size (timm's ``img_size``), so a model with
    a "fixed" input size takes 64 px too: random weights have no position embeddings to keep."""
    return [*sorted({s for s in (first or DEFAULT_SIZE, SECOND_SIZE) if s < own}), own]


def rows_for(keys: list[str]) -> list[dict]:
    """Catalogue rows for the named models only (``timm:NAME`` / ``torchvision:NAME``), without the whole
    catalogue: the sample a test runs."""
    rows = []
    for key in keys:
        lib, name = key.split(":", 1)
        if lib == "timm":
            from timm.models import get_pretrained_cfg

            cfg = get_pretrained_cfg(name)
            cfg_size = int(cfg.input_size[-1]) if cfg is not None else 224
            rows.append(
                {
                    "key": key,
                    "lib": lib,
                    "family": timm_family(name),
                    "model": name,
                    "variants": 1,
                    "params": count_timm(name),
                    "sizes": _sizes(cfg_size),
                }
            )
        elif lib == "torchvision":
            from torchvision.models import get_model

            def build(name=name):
                return get_model(name, weights=None, num_classes=CLASSES)

            rows.append(
                {
                    "key": key,
                    "lib": lib,
                    "family": torchvision_family(name),
                    "model": name,
                    "variants": 1,
                    "params": count_parameters(build),
                    "sizes": _sizes(224),
                }
            )
        else:
            raise SystemExit(f"error: {key!r} is not timm:NAME or torchvision:NAME")
    return rows


def catalogue(out: Path, timm_on: bool = True, torchvision_on: bool = True, jobs: int = 1) -> list[dict]:
    """Every model of the matrix, cached in ``<out>/catalogue.json`` per library version."""
    import timm
    import torchvision

    path = out / "catalogue.json"
    versions = {"timm": timm.__version__, "torchvision": torchvision.__version__}
    cached = json.loads(path.read_text()) if path.exists() else {}
    changed = False
    timm_rows = functools.partial(timm_catalogue, jobs)
    for lib, on, make in (("timm", timm_on, timm_rows), ("torchvision", torchvision_on, torchvision_catalogue)):
        if on and cached.get(lib, {}).get("version") != versions[lib]:
            tic = time.perf_counter()
            cached[lib] = {"version": versions[lib], "rows": make()}
            print(
                f"[matrix] {lib} catalogue: {len(cached[lib]['rows'])} models in {time.perf_counter() - tic:.0f}s",
                flush=True,
            )
            changed = True
    if changed:
        _write_json(path, cached)
    rows = []
    for lib, on in (("timm", timm_on), ("torchvision", torchvision_on)):
        if on:
            rows += cached[lib]["rows"]
    return rows


# --- one model ---


def make_checkpoint(arch: str, size: int, path: str) -> int:
    """Child mode: build ``arch`` as the pipeline does, save random weights; print the parameter count."""
    import torch
    from safetensors.torch import save_file

    from pipeline.errors import PipelineError
    from pipeline.models.external import build_external

    torch.manual_seed(0)
    try:
        model = build_external(arch, CLASSES, size)
    except PipelineError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}  # no shared storage
    save_file(state, path)
    print(json.dumps({"params": sum(p.numel() for p in model.parameters())}))
    return 0


def checkpoint_worker() -> int:
    """Child mode (``--checkpoint-worker``): one :func:`make_checkpoint` per JSON line ``[arch, size, path]`` on
    stdin, each answered by a JSON line ``{"rc", "stdout", "stderr"}``, with torch and timm imported once."""
    import gc
    import io
    import traceback

    for line in sys.stdin:
        arch, size, path = json.loads(line)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = make_checkpoint(arch, int(size), path)
            except Exception:  # the parent records it as a traceback, as it would a fresh process's
                traceback.print_exc()
                rc = 1
        gc.collect()
        print(json.dumps({"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()}), flush=True)
    return 0


class ServingChild:
    """A long-lived child of this script in ``mode`` (``--checkpoint-worker``, ``--export-zygote``), on one job's CPU
    under the memory limit, talking JSON lines on stdin/stdout; started on first use and again after it ends."""

    mode = ""

    def __init__(self, cpu: int | None = None):
        self.cpu = cpu
        self.proc: subprocess.Popen | None = None

    def start(self) -> subprocess.Popen:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), self.mode],
                cwd=ROOT,
                text=True,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                env={"OMP_NUM_THREADS": "1", **os.environ, "PYTHONUNBUFFERED": "1"},
                preexec_fn=_child_setup(self.cpu),
            )
        return self.proc

    def send(self, message) -> bool:
        """Write one JSON line; ``False`` where the child has gone."""
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return False
        return True

    def reply(self, deadline: float) -> dict | None:
        """The child's next JSON line: ``None`` past ``deadline`` (monotonic), ``{}`` where the child died."""
        ready = select.select([self.proc.stdout], [], [], max(deadline - time.monotonic(), 0))[0]
        if not ready:
            return None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else {}

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            for stream in (self.proc.stdin, self.proc.stdout):
                with contextlib.suppress(OSError):
                    stream.close()
            self.proc = None


class CheckpointWorker(ServingChild):
    """A ``--checkpoint-worker`` child for one job (its CPU, the memory limit): importing torch and timm took
    about 4 s of a small model's 16, once per model in a fresh process. A worker that fails a model, dies or
    runs past the model's deadline is ended, and the next model starts a new one."""

    mode = "--checkpoint-worker"

    def __init__(self, cpu: int | None = None):
        super().__init__(cpu)
        self.exports = ExportZygote(cpu)  # the same job's exports, on the same CPU

    def make(self, arch: str, size: int, path: Path, timeout: float, log) -> tuple[int | None, str, str, float]:
        """Like :func:`run_child` on ``--make-checkpoint arch size path``: (rc, stdout, stderr, seconds)."""
        tic = time.perf_counter()
        self.start()
        out = err = ""
        reply = self.reply(time.monotonic() + max(timeout, 1)) if self.send([arch, size, str(path)]) else {}
        if reply is None:  # past the deadline
            rc: int | None = None
        elif not reply:  # the worker died (the OOM killer, a crash in a library)
            rc = self.proc.wait()
        else:
            rc, out, err = reply["rc"], reply["stdout"], reply["stderr"]
        if rc != 0:
            self.close()
        log.write(f"$ checkpoint worker: {arch} {size} {path}\n[rc {rc}]\n--- stdout\n{out}\n--- stderr\n{err}\n")
        return rc, out, err, time.perf_counter() - tic


def export_zygote() -> int:
    """Child mode (``--export-zygote``): the export's libraries imported once, then one forked process per JSON
    line ``[argv, stdout_path, stderr_path]`` on stdin, each running ``python -m pipeline ARGV`` as a fresh
    interpreter would, less the imports (about 5 s a model, 15 minutes of the matrix's subprocess time). Answers
    ``{"pid"}`` when the child starts and ``{"rc"}`` when it ends (minus the signal that killed it, as subprocess
    gives it). Nothing runs in this process but imports, and none that starts a thread (importing ONNX Runtime
    starts one; it costs 0.05 s in the child), so no thread or lock is held across a fork."""
    import atexit
    import runpy
    import traceback

    import onnx  # noqa: F401
    import onnxscript  # noqa: F401
    import timm  # noqa: F401
    import torchvision  # noqa: F401

    import pipeline.cli  # noqa: F401
    import stages.export  # noqa: F401

    for line in sys.stdin:
        argv, out_path, err_path = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the export: its own session (the parent kills the group on a timeout), its own files
            os.setsid()
            files = ((0, os.devnull, os.O_RDONLY), (1, out_path, os.O_WRONLY), (2, err_path, os.O_WRONLY))
            for fd, path, mode in files:
                os.dup2(os.open(path, mode), fd)
            code = 1
            try:
                sys.argv = [sys.executable, *argv]
                runpy.run_module("pipeline", run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
                if not isinstance(exc.code, (int, type(None))):
                    print(exc.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
            finally:
                with contextlib.suppress(BaseException):
                    atexit._run_exitfuncs()
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
    return 0


class ExportZygote(ServingChild):
    """An ``--export-zygote`` child for one job (its CPU, the memory limit, both inherited by every export it
    forks), started on first use and again after it dies."""

    mode = "--export-zygote"

    def run(self, cmd: list[str], timeout: float, log) -> tuple[int | None, str, str, float]:
        """Like :func:`run_child` on ``cmd`` (``python -m pipeline ...``): (rc, stdout, stderr, seconds)."""
        if cmd[1:3] != ["-m", "pipeline"]:
            raise ValueError(f"the zygote runs python -m pipeline only, not {cmd[:3]}")
        import tempfile

        tic = time.perf_counter()
        self.start()
        deadline = time.monotonic() + max(timeout, 1)
        with tempfile.TemporaryDirectory(prefix="matrix-") as tmp:
            out_path, err_path = Path(tmp) / "stdout", Path(tmp) / "stderr"
            out_path.touch()
            err_path.touch()
            rc: int | None = None
            started = self.reply(deadline) if self.send([cmd[3:], str(out_path), str(err_path)]) else {}
            ended = self.reply(deadline) if started else None
            if started and ended is None:  # past the deadline: the export's group; the zygote then reports it
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(started["pid"], signal.SIGKILL)
                self.proc.stdout.readline()
            elif ended:
                rc = ended["rc"]
            elif started == {} or ended == {}:  # the zygote died (the OOM killer): so did what it ran
                if started:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(started["pid"], signal.SIGKILL)
                rc = self.proc.wait() or -signal.SIGKILL
            if not ended:
                self.close()
            out, err = out_path.read_text(errors="replace"), err_path.read_text(errors="replace")
        log.write(f"$ {' '.join(cmd)}\n[rc {rc}]\n--- stdout\n{out}\n--- stderr\n{err}\n")
        return rc, out, err, time.perf_counter() - tic


MEMORY_GB = 20.0  # address-space limit of each child (virtual: ORT and torch reserve far more than they touch)


def _limit_memory() -> None:
    import resource

    limit = int(MEMORY_GB * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _child_setup(cpu: int | None):
    def setup() -> None:
        if MEMORY_GB > 0:
            _limit_memory()
        if cpu is not None:  # every thread of the child (torch's, ONNX Runtime's pool) on this one CPU
            os.sched_setaffinity(0, {cpu})

    return setup


def run_child(cmd: list[str], timeout: float, log, cpu: int | None = None) -> tuple[int | None, str, str, float]:
    """Run ``cmd`` in its own process group under the memory limit (and pinned to ``cpu``); on timeout kill
    that group. Returns rc (None: timed out)."""
    tic = time.perf_counter()
    env = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=env,
        preexec_fn=_child_setup(cpu),
    )
    try:
        out, err = proc.communicate(timeout=max(timeout, 1))
        rc: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        rc = None
    log.write(f"$ {' '.join(cmd)}\n[rc {rc}]\n--- stdout\n{out}\n--- stderr\n{err}\n")
    return rc, out, err, time.perf_counter() - tic


def classify(rc: int | None, stderr: str) -> str:
    """pass | gate (exit 1) | error (exit 2, one line) | timeout | killed (SIGKILL: out of memory) | traceback
    (anything else)."""
    if rc is None:
        return "timeout"
    if rc == -signal.SIGKILL:
        return "killed"
    if "Traceback (most recent call last)" in stderr:
        return "traceback"
    return {0: "pass", 1: "gate", 2: "error"}.get(rc, "traceback")


def traceback_line(rc: int | None, stderr: str) -> str:
    """The exception line of a traceback, or the signal that killed the process."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    if rc is not None and rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        hint = " (the kernel's OOM killer?)" if rc == -signal.SIGKILL else ""
        return f"killed by {name}{hint}" + (f"; last output: {lines[-1]}" if lines else "")
    if "Traceback (most recent call last)" in stderr:
        start = max(i for i, line in enumerate(lines) if line.startswith("Traceback"))
        for line in reversed(lines[start:]):
            if not line.startswith(("File ", "^", "~")) and ":" in line:
                return line
    return lines[-1] if lines else f"exit status {rc}"


def error_line(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    if errors:
        return errors[-1]
    return lines[-1] if lines else ""


def failure_line(status: str, rc: int | None, stderr: str, timeout: float) -> str:
    if status in ("traceback", "killed"):
        return traceback_line(rc, stderr)
    if status == "timeout":
        return f"timed out after {timeout:.0f}s"
    return error_line(stderr)


def precision_of(check: str) -> str:
    return "fp16" if "fp16" in check else "int8" if "int8" in check else "fp32"


def read_export(work: Path) -> dict:
    """Per-precision verdicts from the export manifest's checks and latency from its report, where written."""
    out: dict = {}
    export = work / "run" / "export"
    manifest = export / "manifest.json"
    if manifest.exists():
        data = json.loads(manifest.read_text())
        verdicts: dict[str, dict] = {}
        for check in data.get("checks", []):
            v = verdicts.setdefault(precision_of(check["name"]), {"passed": 0, "failed": [], "skipped": []})
            if check.get("passed") is True:
                v["passed"] += 1
            elif check.get("passed") is False:
                v["failed"].append(
                    f"{check['name']}={_fmt(check.get('value'))} (limit {check.get('op', '')}"
                    f" {_fmt(check.get('threshold'))})"
                )
            else:
                v["skipped"].append(check["name"])
        if data.get("metrics", {}).get("int8_gate") == "skipped" and "int8" in verdicts:
            verdicts["int8"]["not_judged"] = "accuracy drop not judged"  # the reason is the manifest's
            out["int8_not_judged"] = next(
                (n for n in (data.get("reason") or "").split("; ") if n.startswith("int8 accuracy gate skipped")), ""
            )
        out["verdicts"] = verdicts
        out["manifest_status"] = data.get("status")
    report = export / "report.json"
    if report.exists():
        figures = json.loads(report.read_text())
        latency = figures.get("latency", {})
        out["latency_ms"] = {p: round(v["median_ms"], 3) for p, v in latency.items() if "median_ms" in v}
        out["timings_s"] = figures.get("timings_s", {})  # where the export's time went, step by step
    return out


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def run_model(
    row: dict,
    out: Path,
    timeout: float,
    precisions: list[str],
    extra: list[str],
    first_size: int | None = None,
    worker: CheckpointWorker | None = None,
) -> dict:
    key = row["key"]
    safe = key.replace(":", "_").replace("/", "_")
    work = out / "work" / safe
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    result = {**row, "attempts": []}
    with open(logs / f"{safe}.log", "w") as log:
        sizes = _sizes((row.get("sizes") or [DEFAULT_SIZE])[-1], first_size)  # the last is the model's own
        for i, size in enumerate(sizes):
            if 0 < i < len(sizes) - 1 and result["attempts"][-1].get("stage") != "checkpoint":
                continue  # a second small size only where the first could not be built, not for an export error
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            ckpt = work / "model.safetensors"
            attempt: dict = {"size": size}
            result["attempts"].append(attempt)
            worker = worker or CheckpointWorker()
            rc, stdout, stderr, secs = worker.make(key, size, ckpt, deadline - time.monotonic(), log)
            attempt["checkpoint_s"] = round(secs, 1)
            status = classify(rc, stderr)
            if status == "pass":
                attempt["params"] = json.loads(stdout.strip().splitlines()[-1])["params"]
                cmd = [
                    sys.executable,
                    "-m",
                    "pipeline",
                    "run",
                    "export",
                    "--checkpoint",
                    str(ckpt),
                    "--set",
                    f"student.arch={key}",
                    "--set",
                    f"data.image_size={size}",
                    "--set",
                    f"export.precisions=[{','.join(precisions)}]",
                    "--out",
                    str(work / "run"),
                ]
                for item in (*MATRIX_SETS, *extra):
                    cmd += ["--set", item]
                rc, stdout, stderr, secs = worker.exports.run(cmd, deadline - time.monotonic(), log)
                attempt["export_s"] = round(secs, 1)
                attempt["command"] = " ".join(cmd)
                status = classify(rc, stderr)
                attempt |= read_export(work)
            else:
                attempt["stage"] = "checkpoint"
            attempt["rc"], attempt["status"] = rc, status
            if status != "pass":
                attempt["error"] = failure_line(status, rc, stderr, timeout)
            # a second size only for an error, a kill or a traceback (a size the model cannot take), not a gate or
            # a timeout
            if status in ("pass", "gate", "timeout") or time.monotonic() >= deadline:
                break
    final = result["attempts"][-1]
    result["status"] = final["status"]
    result["size"] = final["size"]
    result["params"] = final.get("params", row.get("params"))
    result["error"] = final.get("error", "")
    if result["status"] == "pass":
        shutil.rmtree(work, ignore_errors=True)
    else:  # keep the manifest and report for a look; the ONNX files and the checkpoint are large
        for path in list(work.glob("**/*.onnx")) + list(work.glob("*.safetensors")):
            path.unlink()
    return result


def run_distill(
    row: dict,
    out: Path,
    timeout: float,
    extra: list[str],
    first_size: int | None = None,
    cpu: int | None = None,
    export: dict | None = None,
) -> dict:
    """The distillation path of one model (``--distill``): the stages of :data:`DISTILL_STAGES` with the model as
    the student, at the size its export ran at (``export``: its result), else at 64 px and, where that is an
    error, at the model's own size, like :func:`run_model`."""
    key = row["key"]
    safe = key.replace(":", "_").replace("/", "_")
    work = out / "distill" / safe
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    result = {"key": key, "attempts": []}
    sizes = _sizes((row.get("sizes") or [DEFAULT_SIZE])[-1], first_size)
    if export and export.get("status") in ("pass", "gate"):  # a size the model is known to take
        sizes = [export["size"]]
    plan = [(size, None) for size in sizes]
    with open(logs / f"{safe}.distill.log", "w") as log:
        while plan and time.monotonic() < deadline:
            size, layers = plan.pop(0)
            shutil.rmtree(work, ignore_errors=True)
            cmd = [sys.executable, "-m", "pipeline", "run", *DISTILL_STAGES, "--out", str(work)]
            layer_set = [f"student.method_args.layers={layers}"] if layers else []
            for item in (f"student.arch={key}", f"data.image_size={size}", *DISTILL_SETS, *layer_set, *extra):
                cmd += ["--set", item]
            rc, _, stderr, secs = run_child(cmd, deadline - time.monotonic(), log, cpu)
            status = classify(rc, stderr)
            attempt = {"size": size, "rc": rc, "status": status, "seconds": round(secs, 1), **read_distill(work)}
            attempt["command"] = " ".join(cmd)
            if layers:
                attempt["layers"] = layers
            if status != "pass":
                attempt["error"] = failure_line(status, rc, stderr, timeout)
            result["attempts"].append(attempt)
            if status != "error":
                break
            sites = SITES_REFUSAL.search(attempt["error"])
            if sites:  # the model, not the size: fewer layers where it has a site at all, no other size
                plan = [(size, int(sites[1]))] if int(sites[1]) and not layers else []
    final = result["attempts"][-1]
    result |= {"status": final["status"], "size": final["size"], "error": final.get("error", "")}
    shutil.rmtree(work, ignore_errors=True)  # the log keeps what the stages printed
    return result


def read_distill(work: Path) -> dict:
    """What the fuse and verify manifests say: the branches fused back, the fused model's distance to the
    trained one, and any failed check."""
    out: dict = {"failed": []}
    for stage in ("train", "fuse", "verify"):
        path = work / stage / "manifest.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        metrics = data.get("metrics", {})
        if stage == "fuse":
            out["fused_blocks"] = metrics.get("fused_blocks")
        if stage == "verify":
            out["max_abs"] = metrics.get("max_abs")
        out["failed"] += [
            f"{stage}: {c['name']}={_fmt(c.get('value'))} (limit {c.get('op', '')} {_fmt(c.get('threshold'))})"
            for c in data.get("checks", [])
            if c.get("passed") is False
        ]
    return out


# --- the doc ---


def verdict_cell(result: dict, precision: str, precisions: list[str]) -> str:
    if precision not in precisions:
        return "-"
    final = result["attempts"][-1] if result.get("attempts") else {}
    v = final.get("verdicts", {}).get(precision)
    if v is None:
        return {"pass": "-", "gate": "-"}.get(result["status"], "not run")
    if v["failed"]:
        return "FAIL " + "; ".join(v["failed"])
    notes = [f"{len(v['skipped'])} skipped"] if v["skipped"] else []
    notes += [v["not_judged"]] if "not_judged" in v else []
    return f"pass ({'; '.join(notes)})" if notes else "pass"


def result_cell(r: dict, detail: str = "") -> str:
    """``pass``, or the status and its one line (without the CLI's own ``error:`` prefix), with the first size's
    failure where a second size was tried."""
    reason = (r["error"] or detail).removeprefix("error: ")
    cell = r["status"] if r["status"] == "pass" else f"{r['status']}: {reason}"
    if len(r["attempts"]) > 1:
        first = r["attempts"][-2] if r["attempts"][-1].get("layers") else r["attempts"][0]
        where = "with 3 layers" if r["attempts"][-1].get("layers") else f"at {first['size']} px"
        cell += f" ({where}: {first['status']}: {first.get('error', '').removeprefix('error: ')})"
    return cell


def describe_machine() -> str:
    from pipeline.artifacts.machine import describe_cpu

    return describe_cpu(threads=int(os.environ.get("OMP_NUM_THREADS", "0")) or None)


def write_doc(
    path: Path,
    results: dict,
    rows: list[dict],
    precisions: list[str],
    command: str,
    started: str | None,
    machines: list[str] | None = None,
    distill: dict | None = None,
    distill_run: dict | None = None,
    wall_s: float | None = None,
) -> None:
    measured = [results[r["key"]] for r in rows if r["key"] in results]
    missing = [r for r in rows if r["key"] not in results]
    by_status: dict[str, list[dict]] = {}
    for r in measured:
        by_status.setdefault(r["status"], []).append(r)
    timm_rows = [r for r in rows if r["lib"] == "timm"]
    timm_measured = [r for r in measured if r["lib"] == "timm"]
    tv_rows = [r for r in rows if r["lib"] == "torchvision"]
    tv_measured = [r for r in measured if r["lib"] == "torchvision"]
    total_s = sum(a.get("checkpoint_s", 0) + a.get("export_s", 0) for r in measured for a in r["attempts"])

    def count(lib_rows, status):
        return sum(1 for r in lib_rows if r["status"] == status)

    lines = [
        "# Support matrix: every timm family and torchvision classifier through the export-only path",
        "",
        "Written by `benchmarks/model_matrix.py` (issue 25). Each model: random weights, 20 classes, exported with "
        f"`python -m pipeline run export` to {', '.join(precisions)} with the script's sample counts "
        f"(`{' '.join(MATRIX_SETS)}`); the verdicts are the export manifest's checks, the latency is the export "
        "report's ONNX Runtime CPU figure (batch 1, median, ms). Random weights put fp32 at chance, where the INT8 "
        "top-1 drop is not judged (noise) and INT8 is judged by its agreement with fp32 instead: `pass (accuracy "
        "drop not judged)`. Each model runs at 64 px (a transformer's token grid built for it, as timm's `img_size` "
        f"does), else at {SECOND_SIZE} px, else at its own size: the `px` column; the attempts are in the JSON.",
        "",
        f"- machine{'s' if len(machines or []) > 1 else ''}: {'; '.join(machines or [describe_machine()])}",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}"
        + (f" (run started {started})" if started else ""),
        f"- command{'s' if ' ; ' in command else ''}: `{command}`",
        f"- measured: **{len(measured)} of {len(rows)} models** ({len(timm_measured)} of {len(timm_rows)} timm "
        "families, "
        f"{len(tv_measured)} of {len(tv_rows)} torchvision classifiers), {total_s / 60:.0f} min of subprocess time"
        + _wall(wall_s)
        + (
            f"; the other {len(missing)} remain to be measured (rerun the command: it skips finished models)"
            if missing
            else ""
        ),
        *_step_times(measured),
        "",
        "## Summary",
        "",
        "| | timm families | torchvision classifiers |",
        "|---|---|---|",
        f"| in the matrix | {len(timm_rows)} | {len(tv_rows)} |",
        f"| measured | {len(timm_measured)} | {len(tv_measured)} |",
        f"| every gate passing | {count(timm_measured, 'pass')} | {count(tv_measured, 'pass')} |",
        f"| a gate failing (exit 1) | {count(timm_measured, 'gate')} | {count(tv_measured, 'gate')} |",
        f"| refused in one line (exit 2) | {count(timm_measured, 'error')} | {count(tv_measured, 'error')} |",
        f"| timed out | {count(timm_measured, 'timeout')} | {count(tv_measured, 'timeout')} |",
        f"| killed for memory (SIGKILL) | {count(timm_measured, 'killed')} | {count(tv_measured, 'killed')} |",
        f"| traceback (a bug) | {count(timm_measured, 'traceback')} | {count(tv_measured, 'traceback')} |",
        "",
    ]
    for status, title in (
        ("gate", "A gate failing"),
        ("error", "Refused in one line"),
        ("timeout", "Timed out"),
        ("killed", "Killed by the kernel for memory (the machine's limit, not a bug)"),
        ("traceback", "Tracebacks (bugs)"),
    ):
        items = sorted(by_status.get(status, []), key=lambda r: (r["lib"], r["family"], r["model"]))
        if not items:
            continue
        lines += [f"### {title}", ""]
        for r in items:
            verdicts = r["attempts"][-1].get("verdicts", {})
            failed = [f"{p}: {', '.join(v['failed'])}" for p, v in verdicts.items() if v["failed"]]
            reason = r["error"] or "; ".join(failed)
            lines.append(f"- `{r['key']}` ({r['family']}, {r['size']} px): {reason.replace('|', '/')}")
        lines.append("")
    lines += [
        "## Matrix",
        "",
        "| family | model | parameters | px | fp32 | fp16 | int8 | ORT ms fp32 / fp16 / int8 | result |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(rows, key=lambda r: (r["lib"] != "timm", r["family"], r["model"])):
        r = results.get(row["key"])
        params = f"{row['params'] / 1e6:.2f} M" if row.get("params") else "?"
        if r is None:
            lines.append(f"| {row['family']} | `{row['model']}` | {params} | | | | | | not measured yet |")
            continue
        params = f"{r['params'] / 1e6:.2f} M" if r.get("params") else params
        lat = r["attempts"][-1].get("latency_ms", {})
        lat_cell = " / ".join(f"{lat[p]:.2f}" if p in lat else "-" for p in PRECISIONS)
        result = result_cell(r)
        cells = [verdict_cell(r, p, precisions) for p in PRECISIONS]
        cells = [
            c.replace("|", "\\|").replace("\n", " ")
            for c in (row["family"], f"`{row['model']}`", params, str(r["size"]), *cells, lat_cell, result)
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += distill_section(rows, distill or {}, distill_run or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def _step_times(measured: list[dict]) -> list[str]:
    """Where the export time went: each step of the export report's ``timings_s``, summed over every attempt."""
    steps: dict[str, float] = {}
    for r in measured:
        for attempt in r["attempts"]:
            for step, seconds in attempt.get("timings_s", {}).items():
                steps[step] = steps.get(step, 0.0) + seconds
    if not steps:
        return []
    ranked = sorted(steps.items(), key=lambda kv: -kv[1])
    return ["- export steps, summed over the models: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in ranked)]


def _wall(seconds: float | None) -> str:
    """The wall clock of the command(s), catalogue included: with ``--jobs`` it is less than the subprocess time."""
    return f", {seconds / 60:.0f} min of wall clock (catalogue included)" if seconds else ""


def distill_section(rows: list[dict], distill: dict, run: dict) -> list[str]:
    """The ``--distill`` results: every model of the catalogue, measured or not; ``run``: the state's
    ``distill_started``, ``distill_machines`` and ``distill_commands``."""
    measured = [distill[r["key"]] for r in rows if r["key"] in distill]
    total_s = sum(a["seconds"] for r in measured for a in r["attempts"])
    commands = run.get("distill_commands") or []
    lines = [
        "",
        "## Distillation path",
        "",
        "Written by `benchmarks/model_matrix.py --distill`: each model as the KDiffusion student of a CIFAR ResNet-20 "
        f"teacher, stages `{' '.join(DISTILL_STAGES)}` on a few synthetic images (`{' '.join(DISTILL_SETS)}`): "
        "the branches placed and trained a few steps, fused back into the plain model, and the fused model checked "
        "against the trained one (`verify`). No accuracy is judged. Refused in one line (exit 2) is a student "
        "KDiffusion does not accept (no site to branch, e.g. LayerNorm-only models), with the reason. A student "
        "with fewer than the default 3 sites is distilled again with as many layers as it has "
        "(`student.method_args.layers=N`, what the refusal tells a user to set): `layers` is the count that ran.",
        "",
        f"- machine{'s' if len(run.get('distill_machines') or []) > 1 else ''}: "
        f"{'; '.join(run.get('distill_machines') or ['-'])}",
        f"- run started: {run.get('distill_started', '-')}",
        f"- command{'s' if len(commands) > 1 else ''}: `{' ; '.join(commands) or '-'}`",
        f"- measured: **{len(measured)} of {len(rows)} models**, {total_s / 60:.0f} min of subprocess time"
        + _wall(run.get("distill_wall_s"))
        + (f"; {len(rows) - len(measured)} not measured yet" if len(measured) < len(rows) else ""),
        "- "
        + ", ".join(
            f"{status}: {sum(1 for r in measured if r['status'] == status)}"
            for status in ("pass", "gate", "error", "timeout", "killed", "traceback")
        ),
        "",
        "| family | model | px | layers | fused blocks | verify max abs | seconds | result |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(rows, key=lambda r: (r["lib"] != "timm", r["family"], r["model"])):
        r = distill.get(row["key"])
        if r is None:
            lines.append(f"| {row['family']} | `{row['model']}` | | | | | | not measured yet |")
            continue
        final = r["attempts"][-1]
        layers = str(final.get("layers", 3)) if r["status"] == "pass" else "-"
        result = result_cell(r, "; ".join(final["failed"]))
        cells = (
            row["family"],
            f"`{row['model']}`",
            str(r["size"]),
            layers,
            _fmt(final.get("fused_blocks", "-")),
            _fmt(final.get("max_abs", "-")),
            _fmt(sum(a["seconds"] for a in r["attempts"])),
            result,
        )
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return lines


# --- driver ---


def write_state_doc(doc: Path, state: dict, rows: list[dict], precisions: list[str], command: str) -> None:
    """The doc covers every model with a result, not only this run's: a ``--models`` run adds to the matrix."""
    results, distill = state.get("results", {}), state.get("distill", {})
    known = {r["key"] for r in rows}
    rows = rows + [row_of(key, results.get(key)) for key in sorted({*results, *distill} - known)]
    write_doc(
        doc,
        results,
        rows,
        precisions,
        command,
        state.get("started"),
        state.get("machines"),
        distill,
        state,
        state.get("wall_s"),
    )


def row_of(key: str, result: dict | None) -> dict:
    """A catalogue row for a model outside this run's catalogue: from its export result, else from its key."""
    lib, name = key.split(":", 1)
    if result and "family" in result:
        return {"variants": 1, "params": None, **{k: v for k, v in result.items() if k not in ("attempts", "status")}}
    family = timm_family(name) if lib == "timm" else torchvision_family(name)
    return {"key": key, "lib": lib, "family": family, "model": name, "variants": 1, "params": None}


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    global MEMORY_GB
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--make-checkpoint"]:
        return make_checkpoint(argv[1], int(argv[2]), argv[3])
    if argv[:1] == ["--checkpoint-worker"]:
        return checkpoint_worker()
    if argv[:1] == ["--export-zygote"]:
        return export_zygote()
    tic = time.perf_counter()  # the wall clock counts the catalogue too
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "model-matrix")
    parser.add_argument("--doc", type=Path, default=None, help="the Markdown matrix (default: <out>/model-matrix.md)")
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help="the results so far, read to resume and rewritten as each model finishes (default: <out>/results.json); "
        "docs/model-matrix.json is the committed one, so a run on another machine or day carries on from it",
    )
    parser.add_argument("--limit", type=int, default=None, help="run at most N models (not counting finished ones)")
    parser.add_argument(
        "--only", default=None, help="comma-separated families (timm module names, torchvision.<module>) or model names"
    )
    parser.add_argument(
        "--models",
        default=None,
        help="comma-separated timm:NAME / torchvision:NAME to run instead of the catalogue (no catalogue is built)",
    )
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="first input size tried (px)")
    parser.add_argument("--memory-gb", type=float, default=MEMORY_GB, help="address-space limit per child (0: none)")
    parser.add_argument("--jobs", type=int, default=1, help="models exported at once")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per model, all attempts together")
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--set", dest="sets", action="append", default=[], help="extra --set for every export")
    parser.add_argument("--no-timm", action="store_true")
    parser.add_argument("--no-torchvision", action="store_true")
    parser.add_argument("--doc-only", action="store_true", help="write the doc from the results so far; run nothing")
    parser.add_argument(
        "--distill",
        action="store_true",
        help="the distillation path instead of the export (teacher, KDiffusion student, fuse, verify); its own results",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    MEMORY_GB = args.memory_gb
    precisions = [p for p in args.precisions.split(",") if p]
    if args.models:
        rows = rows_for([k.strip() for k in args.models.split(",") if k.strip()])
    else:
        rows = catalogue(args.out, not args.no_timm, not args.no_torchvision, args.jobs)
    if args.only:
        wanted = {w.strip() for w in args.only.split(",") if w.strip()}
        rows = [r for r in rows if r["family"] in wanted or r["model"] in wanted or r["key"] in wanted]
    results_path = args.results or args.out / "results.json"
    state = json.loads(results_path.read_text()) if results_path.exists() else {}
    section = "distill" if args.distill else "results"
    results: dict = state.get(section, {})
    prefix = "distill_" if args.distill else ""  # each path keeps its own start, machines and commands
    wall_before = state.get(prefix + "wall_s", 0.0)  # earlier invocations' wall clock

    def account_wall() -> None:
        state[prefix + "wall_s"] = round(wall_before + time.perf_counter() - tic, 1)

    if not args.doc_only:
        state.setdefault(prefix + "started", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
        line = "OMP_NUM_THREADS=1 python benchmarks/model_matrix.py " + " ".join(argv)
        state.setdefault(prefix + "commands", []).append(line)
        machine = describe_machine()
        if machine not in state.setdefault(prefix + "machines", []):
            state[prefix + "machines"].append(machine)
    command = " ; ".join(state.get("commands", [])) or "(none)"
    doc = args.doc or args.out / "model-matrix.md"
    todo = [r for r in rows if r["key"] not in results]
    todo.sort(key=lambda r: (r["params"] is None, r["params"] or 0, r["key"]))
    if args.limit is not None:
        todo = todo[: args.limit]
    if not args.doc_only:
        print(f"[matrix] {len(rows)} models, {len(rows) - len(todo)} done or left out, {len(todo)} to run", flush=True)
        lock = threading.Lock()
        done = iter(range(1, len(todo) + 1))
        workers = queue.Queue()  # one per job, on a CPU of its own: the children of a job run on it alone
        usable = sorted(os.sched_getaffinity(0))
        slots = [CheckpointWorker(usable[i % len(usable)] if args.jobs > 1 else None) for i in range(max(1, args.jobs))]
        for worker in slots:
            workers.put(worker)

        def one(row: dict) -> None:
            tic = time.perf_counter()
            worker = workers.get()
            try:
                if args.distill:
                    exported = state.get("results", {}).get(row["key"])
                    result = run_distill(row, args.out, args.timeout, args.sets, args.size, worker.cpu, exported)
                else:
                    result = run_model(row, args.out, args.timeout, precisions, args.sets, args.size, worker)
            finally:
                workers.put(worker)
            with lock:  # results go to disk as each model finishes
                results[row["key"]] = result
                state[section] = results
                account_wall()
                _write_json(results_path, state)
                print(
                    f"[matrix] {next(done)}/{len(todo)} {row['key']} ({row.get('family')}): {result['status']} "
                    f"{result['error']} [{time.perf_counter() - tic:.0f}s]",
                    flush=True,
                )
                write_state_doc(doc, state, rows, precisions, command)

        try:
            with ThreadPoolExecutor(max(1, args.jobs)) as pool:
                list(pool.map(one, todo))
        finally:
            for worker in slots:
                worker.close()
                worker.exports.close()
    write_state_doc(doc, state, rows, precisions, command)
    print(f"[matrix] wrote {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
