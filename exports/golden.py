"""Golden inputs and reference outputs in Polygraphy's JSON format.

Inputs are a list of feed dicts (one iteration per sample, batch 1) and outputs a ``RunResults``,
written and read with Polygraphy's own JSON utilities, so that on the target device
``polygraphy run model.engine --model-type engine --trt --load-inputs golden_inputs.json
--load-outputs golden_outputs.json`` compares TensorRT against exactly these numbers. One sample
per iteration makes Polygraphy's comparators per-sample, as the gates of design §2 are.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from exports.deps import require
from exports.metadata import INPUT_NAME, OUTPUT_NAME


@contextlib.contextmanager
def _quiet():
    logger = require("polygraphy.logger").G_LOGGER
    with logger.verbosity(logger.WARNING):
        yield


def save_inputs(images: np.ndarray, path: str | Path, input_name: str = INPUT_NAME) -> None:
    serde = require("polygraphy.json")
    feeds = [{input_name: np.ascontiguousarray(images[i : i + 1], dtype=np.float32)} for i in range(len(images))]
    with _quiet():
        serde.save_json(feeds, str(path), description="golden inputs")


def save_outputs(logits: np.ndarray, path: str | Path, runner: str, output_name: str = OUTPUT_NAME) -> None:
    comparator = require("polygraphy.comparator")
    iterations = [
        comparator.IterationResult({output_name: np.ascontiguousarray(logits[i : i + 1])}, runner_name=runner)
        for i in range(len(logits))
    ]
    results = comparator.RunResults()
    results.append((runner, iterations))
    with _quiet():
        results.save(str(path))


def load_inputs(path: str | Path, input_name: str = INPUT_NAME) -> np.ndarray:
    """The golden inputs stacked into one batch."""
    serde = require("polygraphy.json")
    with _quiet():
        feeds = serde.load_json(str(path), description="golden inputs")
    return np.concatenate([np.asarray(feed[input_name]) for feed in feeds])


def load_outputs(path: str | Path, output_name: str = OUTPUT_NAME) -> tuple[str, np.ndarray]:
    """The runner name and its outputs stacked into one batch."""
    comparator = require("polygraphy.comparator")
    with _quiet():
        results = comparator.RunResults.load(str(path))
    ((runner, iterations),) = list(results.items())
    return runner, np.concatenate([np.asarray(it[output_name]) for it in iterations])
