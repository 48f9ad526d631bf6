"""ONNX Runtime sessions that refuse silent provider fallback."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from exports.deps import require
from pipeline.errors import PipelineError


class ProviderError(PipelineError):
    pass


def ort_session(path: str | Path, provider: str = "CPUExecutionProvider", threads: int | None = None):
    """A session on exactly ``provider``; ONNX Runtime would otherwise fall back to CPU quietly."""
    ort = require("onnxruntime")
    available = ort.get_available_providers()
    if provider not in available:
        raise ProviderError(f"ONNX Runtime provider {provider} is not available; available: {', '.join(available)}")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), sess_options=options, providers=[provider])
    used = session.get_providers()
    if not used or used[0] != provider:
        raise ProviderError(f"ONNX Runtime asked for {provider} but the session uses {used}")
    return session


def ort_run(session, images: np.ndarray, batch: int = 256) -> np.ndarray:
    name = session.get_inputs()[0].name
    outs = [session.run(None, {name: images[i : i + batch]})[0] for i in range(0, len(images), batch)]
    return np.concatenate(outs) if outs else np.zeros((0,))
