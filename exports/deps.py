"""Import optional backends on first use, with an install hint instead of an ImportError.

Part of the edge runtime (standard library only), so the runtime imports its backends the same way.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from .errors import MissingDependencyError

# module -> (pip package, extra that provides it)
_SOURCES = {
    "onnx": ("onnx", None),
    "onnxruntime": ("onnxruntime", None),
    "onnxscript": ("onnxscript", None),
    "tensorrt": ("tensorrt", "tensorrt"),
    "polygraphy": ("polygraphy", None),
    "onnxconverter_common": ("onnxconverter-common", None),
    "PIL": ("pillow", None),
    "torch": ("torch", None),
}


def require(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        package, extra = _SOURCES.get(module.split(".")[0], (module, None))
        raise MissingDependencyError(package, extra, exc) from None


def is_installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None
