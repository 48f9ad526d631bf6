"""Deployment backends: ONNX export, ONNX Runtime, TensorRT, golden I/O, and the edge runtime.

Optional packages (onnx, onnxruntime, tensorrt) are imported lazily through :func:`require`, so
importing this package costs nothing and a missing backend is a clear error naming the pip extra.
The edge runtime (``runtime.py`` and the files it imports, ``runtime.EDGE_FILES``) stands alone: it imports
nothing of the pipeline, so an app can embed it without torch.
"""
