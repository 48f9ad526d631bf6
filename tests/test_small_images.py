"""``data.recipe=cifar`` for a folder of small images: the CIFAR recipe at 32 px, decoded once into memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import DataConfig, load_config
from pipeline.data import load_data
from pipeline.data.synthetic import TensorImages
from pipeline.data.transforms import CifarTransform
from pipeline.errors import ConfigError, DatasetError
from tests.fake_data import write_image_tree


@pytest.fixture
def folder(tmp_path):
    write_image_tree(tmp_path / "train", ["a", "b", "c"], per_class=4, size=32)
    write_image_tree(tmp_path / "val", ["a", "b", "c"], per_class=2, size=32)
    return tmp_path


def _cfg(root, **kw) -> DataConfig:
    return DataConfig(**{"dataset": "imagefolder", "root": str(root), "workers": 0, "recipe": "cifar", **kw})


def test_cifar_recipe_serves_uint8_32px_tensors_cached_in_memory(folder):
    bundle = load_data(_cfg(folder))
    assert (bundle.info.recipe, bundle.info.input_size) == ("cifar", 32)
    assert isinstance(bundle.raw.train, TensorImages) and bundle.raw.train.images.shape == (12, 3, 32, 32)
    assert isinstance(bundle.dataset("train", augment=True).transform, CifarTransform)
    image, label = bundle.raw.train[5]
    # write_image_tree: 32 x 40 solid colours; the 40 px side is resized away, the colour stays
    assert label == 1 and image[0].unique().tolist() == [10] and image[2].unique().tolist() == [128]


def test_cache_off_decodes_the_same_images_on_every_read(folder):
    cached, lazy = load_data(_cfg(folder, cache="always")), load_data(_cfg(folder, cache="never"))
    assert not isinstance(lazy.raw.train, TensorImages)
    for i in range(len(cached.raw.train)):
        assert torch.equal(cached.raw.train[i][0], lazy.raw.train[i][0])
        assert cached.raw.train[i][1] == lazy.raw.train[i][1]


def test_every_unreadable_image_is_named_in_one_error(folder):
    """Decoding the cache reads every file: all the bad ones are listed at once, not one per attempt."""
    bad = [folder / "train" / "a" / "broken.png", folder / "train" / "c" / "empty.jpg", folder / "val" / "b" / "x.png"]
    bad[0].write_text("not an image")
    bad[1].write_bytes(b"")
    bad[2].write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 16)
    with pytest.raises(DatasetError, match="2 images are not readable; remove or replace them: ") as err:
        load_data(_cfg(folder))
    assert str(bad[0]) in str(err.value) and str(bad[1]) in str(err.value)  # the train split is decoded first
    for path in bad[:2]:
        path.unlink()
    with pytest.raises(DatasetError, match=f"^{bad[2]} is not a readable image"):
        load_data(_cfg(folder))


def test_images_of_other_sizes_are_fitted_as_the_deployed_model_sees_them(tmp_path):
    from exports.metadata import DeployMeta
    from stages.export import deploy_transform

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (tmp_path / split / "x").mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(tmp_path / split / "x" / "0.png")
    bundle = load_data(_cfg(tmp_path, image_size=24))
    assert bundle.raw.test.images.shape == (1, 3, 24, 24)
    info = bundle.info
    meta = DeployMeta("m", 1, 24, list(info.mean), list(info.std), 24, 24)
    from_photo = deploy_transform(meta)(Image.open(tmp_path / "val" / "x" / "0.png").convert("RGB"))
    from_cache = bundle.dataset("test")[0][0]
    torch.testing.assert_close(from_cache, from_photo, rtol=0, atol=1e-5)


def test_recipe_and_cache_values_are_checked(folder):
    from pipeline.data import check_data_config

    with pytest.raises(ConfigError, match="data.recipe"):
        check_data_config(_cfg(folder, recipe="tiny"))
    with pytest.raises(ConfigError, match="data.cache"):
        check_data_config(_cfg(folder, cache="disk"))
    with pytest.raises(ConfigError, match="applies to folder datasets"):
        load_data(DataConfig(recipe="imagenet"))  # the synthetic set keeps its own recipe


def test_a_changed_image_folder_makes_its_runs_stale(folder):
    """Images added, removed, resized or moved to another class change the data settings' fingerprint; a
    touched file or a stray non-image does not."""
    import os
    import shutil

    from pipeline.data.folders import listing_digest
    from stages.support.kit import data_params

    def fingerprint() -> str:
        listing_digest.cache_clear()  # one CLI run lists the folder once; here the folder changes in between
        return data_params(load_config("default", None, [f"data.root={folder}", "data.dataset=imagefolder"]))["files"]

    base = fingerprint()
    os.utime(folder / "train" / "a" / "0.png", (1, 1))
    (folder / "train" / "a" / "notes.txt").write_text("not an image")
    assert fingerprint() == base
    changes = [
        lambda: shutil.copy(folder / "train" / "a" / "0.png", folder / "train" / "a" / "new.png"),  # added
        lambda: (folder / "train" / "a" / "new.png").unlink(),  # removed again: back to base
        lambda: shutil.move(folder / "train" / "a" / "1.png", folder / "train" / "b" / "1.png"),  # relabelled
        lambda: (folder / "val" / "c" / "0.png").write_bytes(b"x"),  # replaced
    ]
    seen = [base]
    for change in changes:
        change()
        seen.append(fingerprint())
    assert seen[2] == base and len({seen[0], seen[1], seen[3], seen[4]}) == 4
    synthetic = data_params(load_config("default"))
    assert "files" not in synthetic  # other datasets keep the fingerprints they had


def test_the_cache_setting_stays_out_of_fingerprints():
    from stages.support.kit import data_params

    sets = ["data.dataset=imagefolder", "data.recipe=cifar"]
    base = data_params(load_config("default", None, sets))
    other = data_params(load_config("default", None, [*sets, "data.cache=never"]))
    assert base == other and base["recipe"] == "cifar"
