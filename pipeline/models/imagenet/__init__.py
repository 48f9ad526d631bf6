"""The ImageNet-100 zoo at 224 px: Swin teachers (timm) and the students (torchvision, and ShuffleNet V1).

Importing this package registers every model; the modules are imported for that side effect.
"""

from pipeline.models.imagenet import mobilenet, resnet, shufflenetv1, shufflenetv2, swin

__all__ = ["mobilenet", "resnet", "shufflenetv1", "shufflenetv2", "swin"]
