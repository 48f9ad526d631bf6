"""A deterministic synthetic image-classification task for the default run and the tests.

Nothing can be downloaded at run time, so the default run needs data it can make. Each class is a
composition of a few oriented, coloured gratings under Gaussian envelopes at class-specific places;
samples jitter every part's position, phase, amplitude and colour, add a distractor part borrowed
from another class, and add pixel noise. Classes share parts, so telling them apart needs the
arrangement of parts, not a single colour or texture: a deeper, wider network learns it faster
and better than a small one, which is what a distillation demo needs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from pipeline.config import DataConfig
from pipeline.data import DATASETS, DataInfo, RawData

DEFAULT_CLASSES = 20
_SIZE = 32
_PARTS = 3
_POOL = 12  # shared part pool: classes reuse parts in different places


class TensorImages(Dataset):
    """``(image, label)`` pairs from a uint8 ``N x 3 x H x W`` tensor."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


def _class_recipes(num_classes: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    pool = {
        "theta": torch.rand(_POOL, generator=gen) * math.pi,
        "freq": 0.25 + torch.rand(_POOL, generator=gen) * 0.6,
        "color": torch.nn.functional.normalize(torch.randn(_POOL, 3, generator=gen), dim=1),
    }
    part = torch.stack([torch.randperm(_POOL, generator=gen)[:_PARTS] for _ in range(num_classes)])
    centers = 6 + torch.rand(num_classes, _PARTS, 2, generator=gen) * (_SIZE - 12)
    width = 3.5 + torch.rand(num_classes, _PARTS, generator=gen) * 3.0
    return {
        "theta": pool["theta"][part],
        "freq": pool["freq"][part],
        "color": pool["color"][part],
        "center": centers,
        "width": width,
    }


def _render(recipes: dict[str, torch.Tensor], labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n = len(labels)
    num_classes = recipes["theta"].shape[0]
    # one distractor part from a random other class, at lower amplitude
    other = (labels + torch.randint(1, num_classes, (n,), generator=gen)) % num_classes
    pick = torch.randint(0, _PARTS, (n, 1), generator=gen)

    def parts(key: str) -> torch.Tensor:
        own = recipes[key][labels]
        extra = recipes[key][other].gather(1, pick.view(n, 1, *([1] * (own.dim() - 2))).expand(-1, 1, *own.shape[2:]))
        return torch.cat([own, extra], 1)

    theta, freq, color, center, width = (parts(k) for k in ("theta", "freq", "color", "center", "width"))
    k = theta.shape[1]
    amp = torch.cat([0.8 + 0.4 * torch.rand(n, _PARTS, generator=gen), 0.5 * torch.rand(n, 1, generator=gen)], 1)
    center = center + torch.randn(n, k, 2, generator=gen) * 2.0
    theta = theta + torch.randn(n, k, generator=gen) * 0.15
    phase = torch.rand(n, k, generator=gen) * 2 * math.pi
    color = torch.nn.functional.normalize(color + 0.25 * torch.randn(n, k, 3, generator=gen), dim=2)

    ys, xs = torch.meshgrid(
        torch.arange(_SIZE, dtype=torch.float32), torch.arange(_SIZE, dtype=torch.float32), indexing="ij"
    )
    dy = ys.view(1, 1, _SIZE, _SIZE) - center[..., 0, None, None]
    dx = xs.view(1, 1, _SIZE, _SIZE) - center[..., 1, None, None]
    envelope = torch.exp(-(dx**2 + dy**2) / (2 * width[..., None, None] ** 2))
    along = dx * torch.cos(theta)[..., None, None] + dy * torch.sin(theta)[..., None, None]
    wave = torch.cos(freq[..., None, None] * along + phase[..., None, None])
    field = (amp[..., None, None] * envelope * wave).unsqueeze(2) * color[..., None, None]  # n,k,3,H,W
    image = field.sum(1) + 0.35 * torch.randn(n, 3, _SIZE, _SIZE, generator=gen)
    image = image + 0.15 * torch.randn(n, 3, 1, 1, generator=gen)  # per-image colour cast
    return ((image * 0.35 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


def make_synthetic(num_classes: int, train_size: int, test_size: int, seed: int) -> tuple[TensorImages, TensorImages]:
    """Balanced train and test sets; the same arguments always give the same bytes."""
    gen = torch.Generator().manual_seed(seed)
    recipes = _class_recipes(num_classes, gen)
    out = []
    for size in (train_size, test_size):
        labels = torch.arange(size) % num_classes
        labels = labels[torch.randperm(size, generator=gen)]
        out.append(TensorImages(_render(recipes, labels, gen), labels))
    return out[0], out[1]


def resized(images: TensorImages, size: int) -> TensorImages:
    """The same images at ``size`` px (bilinear, antialiased when shrinking), uint8 as rendered."""
    pixels = images.images.float()
    pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=size < _SIZE, align_corners=False)
    return TensorImages(pixels.round().clamp(0, 255).to(torch.uint8), images.labels)


@DATASETS.register(name="synthetic")
def synthetic(cfg: DataConfig) -> RawData:
    num_classes = cfg.num_classes or DEFAULT_CLASSES
    train, test = make_synthetic(num_classes, cfg.synthetic.train_size, cfg.synthetic.test_size, cfg.synthetic.seed)
    size = cfg.image_size or _SIZE
    if size != _SIZE:  # the same task at another resolution, e.g. for a model that needs larger inputs
        train, test = resized(train, size), resized(test, size)
    # Mean/std of the generator's pixel distribution, fixed so they do not depend on sample counts.
    info = DataInfo(
        name="synthetic",
        num_classes=num_classes,
        class_names=tuple(f"class_{i:02d}" for i in range(num_classes)),
        input_size=size,
        mean=(0.5, 0.5, 0.5),
        std=(0.15, 0.15, 0.15),
        recipe="cifar",
    )
    return RawData(train, test, info)
