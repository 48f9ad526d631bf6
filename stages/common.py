"""Helpers several stages share: the dataset (built once per process) and result files."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

from pipeline.config import Config, DataConfig, from_dict
from pipeline.data import DataBundle, load_data
from pipeline.hashing import canonical_json


def data_params(cfg: Config) -> dict:
    """The data settings that change what a model sees (loader workers and the like excluded)."""
    data = dataclasses.asdict(cfg.data)
    for key in ("workers", "prefetch_factor", "eval_batch_size", "cache"):
        data.pop(key)
    if cfg.data.dataset != "synthetic":
        data.pop("synthetic")
    return data


def training_params(cfg: Config) -> dict:
    """The training settings that change the weights beyond float noise (speed and logging options excluded)."""
    return {"amp": cfg.training.amp, "sync_bn": cfg.training.sync_bn}


def bundle(cfg: Config) -> DataBundle:
    return _bundle(canonical_json(dataclasses.asdict(cfg.data)), cfg.seed)


@functools.lru_cache(maxsize=2)
def _bundle(data_json: str, seed: int) -> DataBundle:
    # Keyed by the settings' JSON: consecutive stages of one run share one dataset (and its decoding cost).
    return load_data(from_dict(DataConfig, json.loads(data_json)), seed)


def write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
