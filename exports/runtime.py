"""The edge runtime: load an exported ``.onnx`` or a built ``.engine``, classify images.

An app needs only the model file (and, for an engine, the ``.engine.json`` sidecar written beside
it): the input size, normalization and class names travel with the model. The runtime is the files
named in :data:`EDGE_FILES`: they import numpy, Pillow and ONNX Runtime only (``requirements-edge.txt``)
and each other by relative imports, so an app installs those three and copies the files into a package
of its own name, without torch or the pipeline (docs/export.md, "Edge runtime"). Running an ``.engine`` needs
the full install with TensorRT.

    from exports.runtime import Classifier

    with Classifier.load("model.onnx") as model:
        for prediction in model.predict(["cat.jpg"], top_k=3)[0]:
            print(prediction.label, prediction.probability)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .deps import require
from .errors import EdgeError, ImageError, ModelFileError  # noqa: F401  (the runtime's errors, in one import)
from .metadata import DeployMeta, MetadataError
from .runners import BaseRunner, OnnxrtRunner, cpu_optimization

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# The runtime on its own: what an app copies into a package of its own, and the packages it needs.
EDGE_FILES = ("__init__.py", "deps.py", "errors.py", "metadata.py", "runners.py", "runtime.py")
EDGE_REQUIREMENTS = "requirements-edge.txt"


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
        limit = image_module.MAX_IMAGE_PIXELS
        if limit and size[0] * size[1] > limit:  # a strip of 1 x 5,000,000 (a damaged header) would take gigabytes
            raise ImageError(
                f"image of {width}x{height} would be resized to {size[0]}x{size[1]}, more pixels than one image "
                f"may have ({limit}, PIL's limit); crop it to a usual aspect ratio first"
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
    """An image classifier behind a runner: ONNX Runtime (``.onnx``) or TensorRT (``.engine``).

    :meth:`load` activates the runner; :meth:`close` (or leaving a ``with`` block) releases it.
    """

    def __init__(self, meta: DeployMeta, runner: BaseRunner, path: Path):
        self.meta = meta
        self.runner = runner
        self.path = path

    @classmethod
    def load(cls, path: str | Path, provider: str = "cpu", threads: int | None = None) -> Classifier:
        path = Path(path)
        if not path.is_file():
            raise ModelFileError.not_a_file(path)
        if path.suffix == ".onnx":
            return cls._load_onnx(path, provider, threads)
        if path.suffix in (".engine", ".plan"):
            return cls._load_engine(path)
        raise ModelFileError(f"{path} is neither an .onnx model nor a TensorRT .engine")

    @classmethod
    def _load_onnx(cls, path: Path, provider: str, threads: int | None) -> Classifier:
        if provider not in PROVIDERS:
            raise ModelFileError(f"unknown provider {provider!r}; choose one of: {', '.join(PROVIDERS)}")
        meta = cls._read_meta(path, provider, threads)
        # The session is built at the level where its numbers are its graph's (see cpu_optimization),
        # known only once the metadata has been read from an unoptimized session.
        level = cpu_optimization(meta.precision, meta.int8_target) if provider == "cpu" else "all"
        runner = OnnxrtRunner(path, PROVIDERS[provider], threads, optimization=level)
        runner.activate()
        return cls(meta, runner, path)

    @staticmethod
    def _read_meta(path: Path, provider: str, threads: int | None) -> DeployMeta:
        runner = OnnxrtRunner(path, PROVIDERS[provider], threads, optimization="disabled")
        runner.activate()
        try:
            meta = DeployMeta.from_props(runner.metadata(), str(path))
            if (meta.input_name,) != runner.input_names or meta.output_name not in runner.output_names:
                raise MetadataError(
                    f"{path}'s metadata names input {meta.input_name!r} and output {meta.output_name!r}, but the "
                    f"graph has inputs {list(runner.input_names)} and outputs {list(runner.output_names)}"
                )
            session = runner.session
            shape = [d if isinstance(d, int) else None for d in session.get_inputs()[0].shape]
            if len(shape) != 4 or shape[1] not in (3, None) or any(d not in (meta.crop, None) for d in shape[2:]):
                raise MetadataError(
                    f"{path}'s metadata says {meta.crop} x {meta.crop} images, but its graph takes {shape} "
                    "(batch, channels, height, width)"
                )
            output = next(o for o in session.get_outputs() if o.name == meta.output_name).shape
            if not output or (isinstance(output[-1], int) and output[-1] != meta.num_classes):
                raise MetadataError(f"{path}'s metadata says {meta.num_classes} classes, but its graph gives {output}")
            return meta
        except MetadataError as exc:
            raise ModelFileError(str(exc)) from None
        finally:
            runner.deactivate()

    @classmethod
    def _load_engine(cls, path: Path) -> Classifier:
        try:
            from .trt_engine import TrtRunner, unavailable_reason
        except ImportError as exc:  # the runtime copied alone: engines need the pipeline's TensorRT support
            raise ModelFileError(
                f"cannot run TensorRT engine {path}: install kdiffusion-pipeline[tensorrt] ({exc})"
            ) from None

        reason = unavailable_reason()
        if reason:
            raise ModelFileError(f"cannot run TensorRT engine {path}: {reason}")
        runner = TrtRunner(path)
        try:
            meta = runner.sidecar.deploy_meta
        except MetadataError as exc:
            raise ModelFileError(str(exc)) from None
        runner.activate()
        return cls(meta, runner, path)

    def __enter__(self) -> Classifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the session (also done when the classifier is garbage collected)."""
        self.runner.deactivate()

    def __del__(self) -> None:
        runner = getattr(self, "runner", None)
        if runner is not None:
            runner.deactivate()

    def preprocess(self, images: Sequence) -> np.ndarray:
        """A batch from image paths or PIL images."""
        loaded = [load_image(i) if isinstance(i, str | Path) else i for i in images]
        return np.stack([preprocess(image, self.meta) for image in loaded])

    def logits(self, batch: np.ndarray) -> np.ndarray:
        feed = np.ascontiguousarray(batch, dtype=np.float32)
        return self.runner.infer({self.meta.input_name: feed})[self.meta.output_name].astype(np.float32)

    def predict(self, images: Sequence, top_k: int = 5) -> list[list[Prediction]]:
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        return top_classes(self.logits(self.preprocess(images)), top_k, self.meta)
