"""The CIFAR-100 KD benchmark zoo (HobbitLong/RepDistiller architectures and state_dict keys), at 32 px.

Importing this package registers every model; the modules are imported for that side effect.
"""

from pipeline.models.cifar import mobilenetv2, resnet, resnet50, shufflenetv1, shufflenetv2, vgg, wrn

__all__ = ["mobilenetv2", "resnet", "resnet50", "shufflenetv1", "shufflenetv2", "vgg", "wrn"]
