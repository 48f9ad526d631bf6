"""The edge runtime: load an exported ``.onnx`` or a built ``.engine``, classify images.

An app needs only the model file (and, for an engine, the ``.engine.json`` sidecar written beside
it): the input size, normalization and class names travel with the model. This module imports
numpy, Pillow and ONNX Runtime only; torch and TensorRT are needed only to run an ``.engine``.

    from exports.runtime import Classifier

    model = Classifier.load("model.onnx")
    for prediction in model.predict(["cat.jpg"], top_k=3)[0]:
        print(prediction.label, prediction.probability)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exports.deps import require
from exports.metadata import DeployMeta, MetadataError
from pipeline.errors import PipelineError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_ORT_LOAD_ERRORS = ("Fail", "InvalidProtobuf", "InvalidGraph", "NoSuchFile", "InvalidArgument", "NotImplemented")


class ModelFileError(PipelineError):
    """A model file that is missing, unreadable, or not exported by this pipeline."""


class ImageError(PipelineError):
    """An image file that is missing or cannot be decoded."""


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str
    probability: float


def load_image(path: str | Path):
    """An RGB PIL image; a bad file is an :class:`ImageError`, not a PIL traceback."""
    image_module = require("PIL.Image")
    path = Path(path)
    try:
        with image_module.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise ImageError(f"image {path} does not exist") from None
    except (OSError, ValueError, image_module.DecompressionBombError) as exc:
        raise ImageError(f"{path} is not a readable image ({exc})") from None


def as_gray(image):
    """A PIL image as grayscale in three equal channels (ITU-R 601-2 luma, as PIL computes it); other
    inputs (tensors already in the model's form) pass unchanged."""
    image_module = require("PIL.Image")
    return image.convert("L").convert("RGB") if isinstance(image, image_module.Image) else image


def preprocess(image, meta: DeployMeta) -> np.ndarray:
    """``3 x crop x crop`` float32, as the evaluation transform makes it: grayscale if the model was
    trained on it, shorter side resized to ``resize`` (bilinear, antialiased), center crop, scale to
    [0, 1], normalize."""
    image_module = require("PIL.Image")
    if meta.color == "gray":
        image = as_gray(image)
    width, height = image.size
    if min(width, height) != meta.resize:
        # the long side truncates, as torchvision's Resize does
        size = (
            (meta.resize, int(meta.resize * height / width))
            if width <= height
            else (int(meta.resize * width / height), meta.resize)
        )
        image = image.resize(size, image_module.Resampling.BILINEAR)
    width, height = image.size
    crop = meta.crop
    if width < crop or height < crop:
        raise ImageError(f"image of {width}x{height} is smaller than the {crop}x{crop} crop")
    top, left = round((height - crop) / 2.0), round((width - crop) / 2.0)
    image = image.crop((left, top, left + crop, top + crop))
    array = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
    mean = np.asarray(meta.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(meta.std, dtype=np.float32).reshape(3, 1, 1)
    return ((array - mean) / std).astype(np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def top_classes(logits: np.ndarray, k: int, meta: DeployMeta) -> list[list[Prediction]]:
    """The ``k`` most probable classes of each row, most probable first (ties: lower index first)."""
    probs = softmax(logits)
    k = min(k, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[Prediction(int(i), meta.class_name(int(i)), float(row[i])) for i in idx] for row, idx in zip(probs, order)]


class Classifier:
    """An image classifier behind ONNX Runtime (``.onnx``) or TensorRT (``.engine``)."""

    def __init__(self, meta: DeployMeta, run, path: Path):
        self.meta = meta
        self._run = run
        self.path = path

    @classmethod
    def load(cls, path: str | Path, provider: str = "cpu", threads: int | None = None) -> Classifier:
        path = Path(path)
        if not path.is_file():
            raise ModelFileError(f"model file {path} does not exist")
        if path.suffix == ".onnx":
            return cls._load_onnx(path, provider, threads)
        if path.suffix in (".engine", ".plan"):
            return cls._load_engine(path)
        raise ModelFileError(f"{path} is neither an .onnx model nor a TensorRT .engine")

    @classmethod
    def _load_onnx(cls, path: Path, provider: str, threads: int | None) -> Classifier:
        from exports.ort import ort_session

        if provider not in PROVIDERS:
            raise ModelFileError(f"unknown provider {provider!r}; choose one of: {', '.join(PROVIDERS)}")
        state = require("onnxruntime.capi.onnxruntime_pybind11_state")
        errors = tuple(getattr(state, name) for name in _ORT_LOAD_ERRORS if hasattr(state, name))
        try:
            session = ort_session(path, PROVIDERS[provider], threads)
        except errors as exc:
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise ModelFileError(f"{path} is not a loadable ONNX model ({first})") from None
        try:
            meta = DeployMeta.from_props(dict(session.get_modelmeta().custom_metadata_map), str(path))
        except MetadataError as exc:
            raise ModelFileError(str(exc)) from None

        def run(batch: np.ndarray) -> np.ndarray:
            return session.run([meta.output_name], {meta.input_name: batch})[0].astype(np.float32)

        return cls(meta, run, path)

    @classmethod
    def _load_engine(cls, path: Path) -> Classifier:
        from exports.trt_engine import TrtRunner, unavailable_reason

        reason = unavailable_reason()
        if reason:
            raise ModelFileError(f"cannot run TensorRT engine {path}: {reason}")
        runner = TrtRunner(path)
        try:
            meta = runner.sidecar.deploy_meta
        except MetadataError as exc:
            raise ModelFileError(str(exc)) from None
        runner.activate()
        return cls(meta, runner.infer, path)

    def preprocess(self, images: Sequence) -> np.ndarray:
        """A batch from image paths or PIL images."""
        loaded = [load_image(i) if isinstance(i, str | Path) else i for i in images]
        return np.stack([preprocess(image, self.meta) for image in loaded])

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self._run(np.ascontiguousarray(batch, dtype=np.float32))

    def predict(self, images: Sequence, top_k: int = 5) -> list[list[Prediction]]:
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        return top_classes(self.logits(self.preprocess(images)), top_k, self.meta)
