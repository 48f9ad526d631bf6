"""Deployment backends: ONNX export, ONNX Runtime, TensorRT, golden I/O, and the edge runtime.

Optional packages (onnx, onnxruntime, tensorrt) are imported lazily through :func:`require`, so
importing this package costs nothing and a missing backend is a clear error naming the pip extra.
"""
