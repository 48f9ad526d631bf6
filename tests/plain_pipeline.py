"""``python -m tests.plain_pipeline OUT KEY=VALUE...``: teacher, train, fuse and verify with a BatchNorm-free model.

Without SyncBatchNorm (CUDA only), BatchNorm normalizes each rank's half of a global batch with that half's
statistics, so DDP on 2 CPU processes is not the same function as one process on the whole batch. With no
batch-dependent layer, DDP's averaged gradient is the full-batch gradient and the two runs must agree to
float rounding; the test in ``test_distributed.py`` runs this entry point both ways.
"""

from __future__ import annotations

import sys

import torch.nn.functional as F
from torch import nn

from pipeline.models import ModelInfo, register_model


class PlainNet(nn.Module):
    def __init__(self, num_classes: int, width: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward_features(self, x):
        return self.conv2(F.relu(self.conv1(x)))

    def forward_head(self, x):
        return self.fc(F.adaptive_avg_pool2d(F.relu(x), 1).flatten(1))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


@register_model(ModelInfo("plainnet", "cifar", 32, description="BatchNorm-free test model"))
def plainnet(num_classes: int) -> PlainNet:
    return PlainNet(num_classes)


def main(argv: list[str]) -> None:
    from pipeline.cli.runner import run_stages
    from pipeline.config import load_config

    out, overrides = argv[0], argv[1:]
    cfg = load_config("default", None, overrides)
    stages = ("teacher", "train", "fuse", "verify")
    run_stages(cfg, out, stages, log=lambda message: print(message, file=sys.stderr))


if __name__ == "__main__":
    main(sys.argv[1:])
