"""KDiffusion compile-and-export pipeline: distill, fuse, verify, export, engine.

Importing this package is cheap: it needs only the standard library. Heavy modules (torch, onnx,
tensorrt) are imported by the subpackages that need them.
"""

__version__ = "0.1.0"
