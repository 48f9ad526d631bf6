"""Orders stages, verifies their inputs, skips what is up to date, and commits manifests.

This is the only code that hashes artifacts and writes ``manifest.json``; stages only compute. Under
torchrun it is also where the ranks meet: rank 0 decides what runs and commits, the other ranks
compute the distributed stages with it and write nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pipeline import interrupts
from pipeline.artifacts.code_version import changed_files, source_hashes, stage_code_version
from pipeline.artifacts.manifest import Manifest, environment, fingerprint
from pipeline.artifacts.store import (
    RunStore,
    check_external,
    describe_file,
    disk_errors,
    external_input,
    low_space,
)
from pipeline.config import Config
from pipeline.errors import ArtifactError, CheckFailedError, PipelineError, no_space
from pipeline.training.distributed import barrier, broadcast_object, check_shared_folder, launch, solo, world
from stages import Stage, StageContext, get_stage, stage_order


@dataclass
class Outcome:
    stage: str
    action: str  # "ran" | "up to date" | "kept" (code changed, kept on purpose with --keep)
    reason: str  # why it ran: missing, params_changed, inputs_changed, code_changed, outputs_modified, forced, ...
    manifest: Manifest
    seconds: float = 0.0


def stale_reason(existing: Manifest | None, params: dict, inputs_fp: str, code: str, intact: str, fp: str) -> str:
    """Why a stage must run again, cheapest test first (as DVC does); empty when up to date."""
    if existing is None:
        return "missing"
    if existing.status != "ok":
        return f"previous run {existing.status}"
    if existing.fingerprint == fp and not intact:
        return ""
    if existing.params != params:
        return "params_changed"
    if existing.code_version != code:
        return "code_changed"
    if existing.inputs_hash != inputs_fp:
        return "inputs_changed"
    return f"outputs_modified ({intact})" if intact else "fingerprint_changed"


def stage_code(stage: Stage) -> tuple[str, dict[str, str]]:
    """The stage's code version and the per-file hashes behind it: its module's import closure plus its version."""
    files = source_hashes(type(stage).__module__)
    return stage_code_version(files, stage.version), files


def code_status(manifest: Manifest) -> str:
    """Whether the code that can change this stage's result differs from the code it was built (or kept) with."""
    try:
        code, files = stage_code(get_stage(manifest.stage))
    except PipelineError:
        return "unknown (no such stage here)"
    kept = f"; kept across {len(manifest.kept)} code change(s) with --keep" if manifest.kept else ""
    if code == manifest.code_version:
        return f"unchanged since built{kept}"
    if not manifest.code_files:
        return "changed since built (the manifest predates per-file hashes)"
    changed = changed_files(manifest.code_files, files)
    return "changed since built: " + (_some(changed) if changed else "the stage's version was bumped") + kept


def _some(items: list[str], limit: int = 6) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def validate(cfg: Config, names: list[str] | tuple[str, ...] = ()) -> None:
    """Fail on unknown names before any stage spends time (a typo should not cost a teacher run)."""
    import torch

    from pipeline.training.distributed import check_available, check_device
    from pipeline.training.speed import check_training

    check_settings(cfg, names)
    device = check_device(cfg.device)
    check_available(device, cfg.device)
    check_training(cfg.training, device or torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def check_settings(cfg: Config, names: list[str] | tuple[str, ...] = ()) -> None:
    """The checks of :func:`validate` that do not depend on this machine's devices (a sweep submitted to a
    cluster checks its cells with these), with the settings and given files of the stages ``names``."""
    from pipeline.data import check_data_config, dataset_names
    from pipeline.distill.catalog import check_method_args, method_names
    from pipeline.errors import ConfigError
    from pipeline.models import check_model_name

    check_model_name(cfg.teacher.arch)
    check_model_name(cfg.student.arch)
    for what, value, valid in (
        ("method", cfg.student.method, method_names()),
        ("dataset", cfg.data.dataset, dataset_names()),
    ):
        if value not in valid:
            raise ConfigError(f"unknown {what} {value!r}; choose one of: {', '.join(valid)}")
    check_method_args(cfg.student.method, cfg.student.method_args)
    check_data_config(cfg.data)
    if not 0 <= cfg.seed < 2**32:
        raise ConfigError(f"seed must be in [0, 2**32), got {cfg.seed}")
    for name in names:
        stage = get_stage(name)
        stage.validate(cfg)
        for role, path in stage.externals(cfg).items():  # read when the stage is planned; a sweep's cells later
            check_external(path, f"{name}.{role}")


def run_stages(
    cfg: Config,
    out: str | Path,
    names: list[str] | tuple[str, ...] | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
    on_outcome: Callable[[Outcome], None] | None = None,
    keep: tuple[str, ...] = (),
) -> list[Outcome]:
    """Run ``names`` (default: every stage) in order; a failed gate stops the run after its manifest is written.

    ``keep`` names stages to keep when their code alone changed (an upgrade that should not retrain a
    teacher, say): their artifacts stay, and the manifest records the code they were built with and what
    changed. Under torchrun, stages marked ``distributed`` run on every rank and the others on rank 0 alone;
    rank 0 alone logs, writes and commits (docs/training.md).
    """
    names = stage_order() if names is None else names
    validate(cfg, names)
    for name in keep:
        get_stage(name)  # an unknown name fails here, with the registered ones
    store = RunStore(out)
    with launch(cfg.device) as current, contextlib.ExitStack() as held:
        if current.is_main:
            store.check_owned(stage_order())
            preflight(store, cfg, names)  # before the run folder is made or touched
            store.ensure_writable()
            held.enter_context(store.lock())
            store.check_owned(stage_order())
            for leftover in store.clean_leftovers():
                log(f"removed {store.root / '.staging' / leftover}, left by a run that was killed")
        else:
            log = _quiet
        check_shared_folder(store.root)
        outcomes = []
        for name in names:
            outcome = run_stage(store, cfg, name, force, log, frozenset(keep))
            if outcome is None:  # a stage rank 0 runs alone
                continue
            outcomes.append(outcome)
            if on_outcome and current.is_main:
                on_outcome(outcome)
            if outcome.manifest.status == "failed":
                failed = [c.describe() for c in outcome.manifest.checks if not c]
                raise CheckFailedError(
                    f"stage {name!r} failed its checks: " + "; ".join(failed or [outcome.manifest.reason])
                )
    return outcomes


def preflight(store: RunStore, cfg: Config, names: list[str] | tuple[str, ...]) -> None:
    """Before any stage starts: every stage this run reads but does not make is present, intact and made with
    these settings, so a missing or stale upstream is reported before an hour of training, not after it."""
    for name in names:
        for req in get_stage(name).requires(cfg):
            if req in names:
                continue
            artifacts = store.load(req)  # refuses missing, failed, edited or broken-chain stages
            check_current(req, artifacts.manifest, cfg, store)


def check_current(stage: str, manifest: Manifest, cfg: Config, store: RunStore) -> None:
    """Refuse an upstream stage made from other data than this run's (a teacher trained on another dataset,
    data seed or split seed): reusing it would silently mix two experiments.

    Only the data settings are compared, and only where both sides have them. Other upstream settings stay
    the upstream stage's own business, as before: ``run engine`` need not repeat every export option.
    """
    old = _data_identity(manifest.params)
    new = _data_identity(json.loads(json.dumps(get_stage(stage).params(cfg), default=str)))
    changed = _differences(old, new)  # keys both sides have
    if not changed:
        return
    shown = "; ".join(changed[:3]) + ("; ..." if len(changed) > 3 else "")
    raise ArtifactError(
        f"stage {stage!r} in {store.root} was made from other data ({shown}); run it again with these settings "
        f"(`python -m pipeline run {stage} ... --out {store.root}`) or choose another --out"
    )


def _data_identity(params: dict) -> dict:
    """What decides the images a stage's result was made from: the data settings and the seed of the split
    (``data.split_seed``, or the run's seed when unset). The run's seed alone also seeds initialization and
    augmentation, which an upstream stage may differ in."""
    identity: dict = {}
    data = params.get("data")
    split_seed = None
    if isinstance(data, dict):
        identity["data"] = {k: v for k, v in data.items() if k != "split_seed"}
        split_seed = data.get("split_seed")
    if split_seed is None:
        split_seed = params.get("seed")
    if split_seed is not None:
        identity["split seed"] = split_seed
    return identity


def _differences(old: object, new: object, key: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) & set(new)) for d in _differences(old[k], new[k], f"{key}.{k}")]
    return [] if old == new else [f"{key.lstrip('.')}: {json.dumps(old)[:40]} -> {json.dumps(new)[:40]}"]


_ABSENT = object()


def _changes(old: object, new: object, key: str = "") -> list[str]:
    """``key: old -> new`` for every parameter that differs, one that is added or dropped included."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(old.keys() | new.keys())
        return [d for k in keys for d in _changes(old.get(k, _ABSENT), new.get(k, _ABSENT), f"{key}.{k}")]
    if old == new:
        return []
    shown = ["(absent)" if v is _ABSENT else json.dumps(v)[:40] for v in (old, new)]
    return [f"{key.lstrip('.')}: {shown[0]} -> {shown[1]}"]


def _quiet(message: str) -> None:
    """The log of ranks other than 0: one copy of every line is enough."""


def run_stage(
    store: RunStore,
    cfg: Config,
    name: str,
    force: bool,
    log: Callable[[str], None],
    keep: frozenset[str] = frozenset(),
) -> Outcome | None:
    """Run one stage if it is stale. Under torchrun rank 0 decides and commits; ``None`` on ranks that sit it out."""
    interrupts.check()  # a Ctrl-C that a library swallowed (during ``import torch``) stops the run here
    stage = get_stage(name)
    current = world()
    if current.is_distributed and not stage.distributed:
        if not current.is_main:
            return None
        with solo():
            return run_stage(store, cfg, name, force, log, keep)
    barrier()  # rank 0 has committed every upstream stage before any rank reads it
    plan = plan_stage(store, cfg, name, force, log, keep, decide=current.is_main)
    upstream, external, existing, reason = plan.upstream, plan.external, plan.existing, plan.reason
    params, inputs, links, fp = plan.params, plan.inputs, plan.links, plan.fp
    code, code_files = plan.code, plan.code_files
    if reason == "kept":
        existing = _keep(store, existing, code, code_files, plan.changed)
        log(f"[{name}] kept on request although its code changed ({_some(plan.changed)}); recorded in its manifest")
    reason = broadcast_object(reason)
    if reason in ("", "kept"):
        if current.is_main:
            store.drop_scratch(name)  # resume state a finished stage no longer needs
        if reason == "":
            log(f"[{name}] up to date ({store.folder(name)})")
        return Outcome(name, "kept" if reason else "up to date", reason, existing or store.manifest(name))

    log(f"[{name}] running ({reason})")
    # Ranks other than 0 compute in a private folder that is thrown away: only rank 0 writes the run.
    staged = store.staging(name) if current.is_main else Path(tempfile.mkdtemp(prefix=f"{name}-rank{current.rank}-"))
    logdir = store.logs(name) if current.is_main else None
    ctx = StageContext(cfg, store, staged, store.scratch(name, fp), upstream, external, log, logdir)
    started = datetime.now(timezone.utc)
    tic = time.perf_counter()
    try:
        with disk_errors(f"stage {name!r}", store.root):
            result = stage.run(ctx)
    except BaseException as exc:
        said = isinstance(exc, ArtifactError) and exc.__context__ is not None and no_space(exc.__context__)
        if isinstance(exc, Exception) and not said and (note := low_space(store.root)):
            log(f"note: {note}")
        store.discard(staged)
        raise
    seconds = time.perf_counter() - tic
    if not current.is_main:
        store.discard(staged)
        broadcast_object(None)  # wait until rank 0 has committed
        return Outcome(name, "ran", reason, store.manifest(name), seconds)
    outputs = [describe_file(staged, str(p.relative_to(staged))) for p in sorted(staged.rglob("*")) if p.is_file()]
    status = "failed" if not all(result.checks) else result.status
    missing = [f for f in stage.outputs if f not in {o.path for o in outputs}]
    if status == "ok" and missing:
        store.discard(staged)
        raise RuntimeError(f"stage {name!r} did not write its declared outputs {missing}")
    manifest = Manifest(
        stage=name,
        status=status,
        params=params,
        inputs=inputs,
        outputs=outputs,
        checks=result.checks,
        code_version=code,
        code_files=code_files,
        reason=result.reason,
        metrics=result.metrics,
        environment=environment(),
        meta={
            "started": started.isoformat(timespec="seconds"),
            "duration_s": round(seconds, 3),
            "host": socket.gethostname(),
            "run_reason": reason,
            "world_size": current.size,
        },
        upstream=links,
    )
    try:
        with disk_errors(f"committing stage {name!r}", store.root):
            store.commit(staged, manifest)
    except BaseException:
        store.discard(staged)
        raise
    if status != "failed":  # a skipped stage (engine without TensorRT) has nothing to resume either
        store.drop_scratch(name)
    broadcast_object(status)
    log(f"[{name}] {status} in {seconds:.1f}s")
    return Outcome(name, "ran", reason, manifest, seconds)


@dataclass
class Plan:
    """A stage's inputs as they are now, and whether it must run: ``reason`` as in :class:`Outcome` ("" when up
    to date, "kept" when ``--keep`` would keep it; ``changed`` then names the code files that changed)."""

    upstream: dict
    external: dict
    params: dict
    inputs: list
    code: str
    code_files: dict
    fp: str
    links: dict
    existing: Manifest | None
    reason: str = ""
    changed: list[str] = dataclasses.field(default_factory=list)


def plan_stage(
    store: RunStore,
    cfg: Config,
    name: str,
    force: bool,
    log: Callable[[str], None],
    keep: frozenset[str] = frozenset(),
    decide: bool = True,
) -> Plan:
    """Read a stage's upstream and external inputs, and (with ``decide``) why it must run; writes nothing, so
    ``run --dry-run`` answers with the same reasons a run logs."""
    stage = get_stage(name)
    external = {role: external_input(path, f"{name}.{role}") for role, path in stage.externals(cfg).items()}
    upstream = {req: store.load(req) for req in stage.requires(cfg)}
    for req, art in upstream.items():
        check_current(req, art.manifest, cfg, store)
    links = {req: art.manifest.digest for req, art in upstream.items()}
    inputs = [art.as_input(o.path, store.root) for art in upstream.values() for o in art.manifest.outputs]
    inputs += list(external.values())
    params = stage.params(cfg)
    code, code_files = stage_code(stage)
    fp = fingerprint(name, params, inputs, code)
    try:
        existing = store.manifest(name)
    except ArtifactError as exc:
        if decide:
            log(f"[{name}] {exc}")
        existing = None
    plan = Plan(upstream, external, params, inputs, code, code_files, fp, links, existing)
    if not decide:
        return plan
    intact = store.outputs_intact(name, existing) if existing else ""
    probe = Manifest(name, "ok", params, inputs, [], [], code)
    reason = "forced" if force else stale_reason(existing, params, probe.inputs_hash, code, intact, fp)
    remade = [r for r in links if existing and existing.upstream.get(r) not in upstream[r].manifest.accepted_digests]
    if not reason and remade:
        reason = f"upstream_changed: {', '.join(remade)} was made again since"
    if reason == "code_changed":
        plan.changed = changed_files(existing.code_files, code_files) or ["the stage's version"]
        if name in keep and existing.inputs_hash == probe.inputs_hash and not intact:
            reason = "kept"
        else:
            reason = f"code_changed: {_some(plan.changed)}"
    elif name in keep and reason:
        log(f"[{name}] --keep applies to code changes only; this stage is stale for another reason")
    if reason == "params_changed":
        reason += ": " + _some(_changes(existing.params, json.loads(json.dumps(params, default=str))), 3)
    elif reason == "inputs_changed":
        before = {a.path: a.sha256 for a in existing.inputs}
        now = {a.path: a.sha256 for a in inputs}
        reason += ": " + _some(sorted(path for path in before.keys() | now.keys() if before.get(path) != now.get(path)))
    plan.reason = reason
    return plan


def dry_run(
    cfg: Config,
    out: str | Path,
    names: list[str] | tuple[str, ...],
    force: bool = False,
    log: Callable[[str], None] = print,
    keep: tuple[str, ...] = (),
) -> list[tuple[str, str]]:
    """What :func:`run_stages` would do, stage by stage, as (stage, what and why), running and writing nothing.

    The same checks come first (settings, the run folder, every upstream stage the run reads but does not
    make), so a dry run fails where the run would. A stage after one that reruns cannot be judged against
    outputs that do not exist yet; it runs when it is stale now, and else because its upstream changes.
    """
    validate(cfg, names)
    for name in keep:
        get_stage(name)
    store = RunStore(out)
    store.check_owned(stage_order())
    preflight(store, cfg, names)
    rows: list[tuple[str, str]] = []
    runs: list[str] = []
    for name in names:
        first = [req for req in get_stage(name).requires(cfg) if req in runs]
        try:
            reason = plan_stage(store, cfg, name, force, log, frozenset(keep)).reason
        except ArtifactError:
            if not first:
                raise
            reason = "missing" if store.manifest(name) is None else ""
        if not reason and first:
            reason = f"upstream_changed: {', '.join(first)} runs first"
        if reason in ("", "kept"):
            rows.append((name, "kept (--keep: only its code changed)" if reason else UP_TO_DATE))
        else:
            rows.append((name, f"runs ({WHY.get(reason, reason)})"))
            runs.append(name)
    return rows


UP_TO_DATE = "up to date (same fingerprint: settings, inputs and code; outputs intact)"
WHY = {"missing": "missing: no previous run in this folder", "forced": "forced: --force"}  # the rest say why


def _keep(store: RunStore, existing: Manifest, code: str, code_files: dict, changed: list[str]) -> Manifest:
    """Accept a stage's artifacts under new code on purpose; the manifest says what it was built with."""
    record = {
        "built_with": existing.code_version,
        "digest": existing.digest,  # what downstream stages recorded when they consumed it
        "kept_for": code,
        "changed": changed,
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    kept = dataclasses.replace(existing, code_version=code, code_files=code_files, kept=[*existing.kept, record])
    store.amend(kept)
    return kept
