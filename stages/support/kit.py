"""What several stages share: the dataset (built once per process), the result-affecting settings, and
small result-file and evaluation helpers.

It lives in the library, not in ``stages/``, so that no stage imports another; the names of the files
stages hand on are in :mod:`pipeline.stage_files`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import torch

from pipeline.artifacts.hashing import canonical_json
from pipeline.config import Config, DataConfig, from_dict
from pipeline.data import DataBundle, load_data
from pipeline.training.distributed import device_type
from pipeline.training.speed import resolve


def data_params(cfg: Config) -> dict:
    """The data settings that change what a model sees (loader workers and the like excluded)."""
    data = dataclasses.asdict(cfg.data)
    for key in ("workers", "prefetch_factor", "eval_batch_size", "cache"):
        data.pop(key)
    if data["split_seed"] is None:  # the default: absent, so fingerprints made before the setting still hold
        data.pop("split_seed")
    if cfg.data.dataset != "synthetic":
        data.pop("synthetic")
    if cfg.data.dataset == "imagefolder" and cfg.data.root:  # a folder of the user's, which may change between runs
        from pipeline.data.folders import listing_digest

        if files := listing_digest(str(cfg.data.root)):
            data["files"] = files
    return data


def training_params(cfg: Config) -> dict:
    """The training settings that change the weights beyond float noise (speed and logging options excluded).

    ``amp=auto`` is recorded as what it becomes on this run's device and processor, so a run where it means
    bf16 and one where it means none have different fingerprints, and auto-none shares explicit none's.
    """
    amp = resolve(cfg.training, device_type(cfg.device)).amp
    params = {"amp": amp, "sync_bn": cfg.training.sync_bn}
    if cfg.training.device_data:  # other augmentation draws (same distribution); absent when off: old hashes hold
        params["device_data"] = True
    return params


def bundle(cfg: Config) -> DataBundle:
    return _bundle(canonical_json(dataclasses.asdict(cfg.data)), cfg.seed)


@functools.lru_cache(maxsize=2)
def _bundle(data_json: str, seed: int) -> DataBundle:
    # Keyed by the settings' JSON: consecutive stages of one run share one dataset (and its decoding cost).
    return load_data(from_dict(DataConfig, json.loads(data_json)), seed)


def write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@torch.no_grad()
def batched_logits(
    model: torch.nn.Module,
    images: torch.Tensor,
    device: torch.device,
    batch: int = 256,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Logits of ``model`` in eval mode on ``images``, ``batch`` at a time, returned on the CPU in ``dtype`` (fp32;
    float64 for a model cast to it, whose inputs are then cast too)."""
    model.to(device).eval()
    inputs = images.double() if dtype == torch.float64 else images
    return torch.cat([model(inputs[i : i + batch].to(device)).to(dtype).cpu() for i in range(0, len(images), batch)])
