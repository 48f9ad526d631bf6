"""The ``build_engine.sh`` shipped with an export: build and check the engine on the target device.

Engines are specific to the GPU and TensorRT release, so they are usually built where they run
(a Jetson, a server). The script holds the exact ``trtexec`` command for TensorRT 10.x (which needs
``--stronglyTyped``) and 11.x (strongly typed always; the precision flags are gone), picks one from
the installed ``trtexec``, then checks the engine against the golden outputs with Polygraphy.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from exports.metadata import INPUT_NAME
from exports.precisions import GOLDEN_OUTPUTS, PRECISIONS  # noqa: F401  (GOLDEN_OUTPUTS: the script's name too)
from exports.trt_engine import BatchProfile

GOLDEN_INPUTS = "golden_inputs.json"


# trtexec prints its version in its banner, e.g. [TensorRT v101300] for 10.13.0.
_TRT_MAJOR = r"""if ! command -v "$TRTEXEC" >/dev/null 2>&1; then
  echo "trtexec not found; install TensorRT or set TRTEXEC=/path/to/trtexec" >&2; exit 2
fi
if [ -z "${TRT_MAJOR:-}" ]; then
  TRT_MAJOR="$("$TRTEXEC" 2>&1 | sed -n 's/.*TensorRT v\([0-9]*\)[0-9]\{4\}\].*/\1/p' | head -n1 || true)"
fi
case "$TRT_MAJOR" in
  ''|*[!0-9]*) echo "cannot tell the TensorRT version of $TRTEXEC; set TRT_MAJOR=10 or 11" >&2; exit 2 ;;
esac"""


def golden_outputs_name(precision: str) -> str:
    """The golden outputs an engine of ``precision`` is held to (see :mod:`exports.precisions`)."""
    return PRECISIONS.get(precision, "precision").golden_outputs


def engine_name(precision: str) -> str:
    return f"model.{precision}.engine"


@dataclass(frozen=True)
class EngineTarget:
    precision: str
    onnx: str  # file name beside the script


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def trtexec_command(target: EngineTarget, profile: BatchProfile, workspace_mib: int, major: int) -> list[str]:
    """``trtexec`` arguments for TensorRT ``major`` (10 or 11)."""
    low, opt, high = profile.shapes
    args = ["trtexec", f"--onnx={target.onnx}", f"--saveEngine={engine_name(target.precision)}"]
    if major < 11:
        args.append("--stronglyTyped")
    args += [
        f"--minShapes={INPUT_NAME}:{_dims(low)}",
        f"--optShapes={INPUT_NAME}:{_dims(opt)}",
        f"--maxShapes={INPUT_NAME}:{_dims(high)}",
        f"--memPoolSize=workspace:{workspace_mib}M",
        "--timingCacheFile=timing.cache",
        "--skipInference",
    ]
    return args


def polygraphy_checks(precision: str) -> list[list[str]]:
    """Polygraphy commands that compare the engine with the golden outputs, per sample.

    The comparisons are the precision's (:mod:`exports.precisions`). fp32: max |diff| within
    ``trt.fp32_max_abs`` (``--rtol 0`` makes Polygraphy's either-tolerance rule a pure absolute bound) and
    the same top-1 class. fp16: cosine similarity per sample and the same top-1 (with a handful of samples
    the >= 99 % agreement gate means all of them). int8: the same top-1 class as ONNX Runtime on the same
    Q/DQ model; its accuracy gate needs labelled data and runs in the pipeline's engine stage.
    """
    spec = PRECISIONS.get(precision, "precision")
    base = [
        "polygraphy",
        "run",
        engine_name(precision),
        "--model-type",
        "engine",
        "--trt",
        "--load-inputs",
        GOLDEN_INPUTS,
        "--load-outputs",
        spec.golden_outputs,
    ]
    return [[*base, *compare] for compare in spec.polygraphy_compare]


def build_script(targets: list[EngineTarget], profile: BatchProfile, workspace_mib: int) -> str:
    """The bash script: ``./build_engine.sh [PRECISION...]`` builds and checks the named precisions."""
    lines = [
        "#!/usr/bin/env bash",
        "# Build the TensorRT engine(s) for this export on the device that will run them, then check",
        "# each engine against the golden outputs exported with it.",
        "#",
        f"#   ./build_engine.sh          all precisions exported here: {' '.join(t.precision for t in targets)}",
        "#   ./build_engine.sh fp16     one of them",
        "#",
        "# Needs trtexec (TensorRT 10.x or 11.x; set TRTEXEC to its path if it is not on PATH) and, for the",
        "# checks, Polygraphy with TensorRT's Python package (pip install polygraphy tensorrt). The Polygraphy",
        "# commands use --compare indices/cosine_similarity (written against Polygraphy 0.53).",
        f"# Profile: batch {profile.min_batch}..{profile.max_batch}, tuned for {profile.opt_batch}; "
        f"workspace {workspace_mib} MiB.",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        'TRTEXEC="${TRTEXEC:-trtexec}"',
        "",
        *_TRT_MAJOR.splitlines(),
        "",
    ]
    for target in targets:
        p = target.precision
        t10 = shlex.join(trtexec_command(target, profile, workspace_mib, 10)).replace("trtexec", '"$TRTEXEC"', 1)
        t11 = shlex.join(trtexec_command(target, profile, workspace_mib, 11)).replace("trtexec", '"$TRTEXEC"', 1)
        lines += [
            f"build_{p}() {{",
            '  if [ "$TRT_MAJOR" -ge 11 ]; then',
            f"    {t11}",
            "  else",
            f"    {t10}",
            "  fi",
            "}",
            "",
            f"check_{p}() {{",
            *(f"  {shlex.join(cmd)}" for cmd in polygraphy_checks(p)),
            "}",
            "",
        ]
    names = " ".join(t.precision for t in targets)
    lines += [
        f'if [ "$#" -eq 0 ]; then set -- {names}; fi',
        'for p in "$@"; do',
        '  case "$p" in',
        *(f"    {t.precision}) build_{t.precision}; check_{t.precision} ;;" for t in targets),
        f'    *) echo "unknown precision $p; this export has: {names}" >&2; exit 2 ;;',
        "  esac",
        "done",
        "",
    ]
    return "\n".join(lines)
