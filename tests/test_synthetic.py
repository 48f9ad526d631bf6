import torch

from pipeline.config import DataConfig, SyntheticConfig
from pipeline.data import load_data
from pipeline.data.synthetic import make_synthetic


def test_deterministic_and_balanced():
    a, _ = make_synthetic(5, 100, 20, seed=3)
    b, _ = make_synthetic(5, 100, 20, seed=3)
    c, _ = make_synthetic(5, 100, 20, seed=4)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    assert a.images.dtype == torch.uint8 and a.images.shape == (100, 3, 32, 32)
    assert torch.bincount(a.labels).tolist() == [20] * 5


def test_bundle_splits_are_disjoint_and_seeded():
    cfg = DataConfig(num_classes=4, synthetic=SyntheticConfig(train_size=100, test_size=20))
    bundle = load_data(cfg, seed=0)
    train, val = bundle.source("train").indices, bundle.source("val").indices
    assert len(val) == 10 and len(train) == 90 and not set(train) & set(val)
    assert load_data(cfg, seed=0).source("val").indices == val
    assert load_data(cfg, seed=1).source("val").indices != val
    image, label = bundle.dataset("train", augment=True)[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and 0 <= label < 4


def test_image_size_serves_the_same_task_at_that_size():
    base = load_data(DataConfig(num_classes=4, synthetic=SyntheticConfig(train_size=40, test_size=8)), seed=0)
    for size in (64, 16):
        cfg = DataConfig(num_classes=4, image_size=size, synthetic=SyntheticConfig(train_size=40, test_size=8))
        bundle = load_data(cfg, seed=0)
        assert bundle.info.input_size == size
        for split, augment in (("train", True), ("test", False)):
            image, label = bundle.dataset(split, augment=augment)[0]
            assert image.shape == (3, size, size) and label == base.dataset(split)[0][1]
        # the same pictures: brought back to 32 px, the test images are those of the native set, up to resampling
        pixels = bundle.raw.test.images
        assert pixels.dtype == torch.uint8 and pixels.shape == (8, 3, size, size)
        back = torch.nn.functional.interpolate(pixels.float(), size=(32, 32), mode="bilinear", antialias=True)
        error = (back - base.raw.test.images.float()).abs().mean()  # resampling blurs the pixel noise
        assert error < (back - base.raw.test.images.float().flip(0)).abs().mean() * 0.8  # not any other image
    native = DataConfig(num_classes=4, image_size=32, synthetic=SyntheticConfig(train_size=40, test_size=8))
    assert torch.equal(load_data(native, seed=0).dataset("test")[0][0], base.dataset("test")[0][0])
