"""CIFAR-100, ImageFolder and ImageNet-100 from folders the tests write in the real formats."""

import hashlib
import io
import pickle
import tarfile

import numpy as np
import pytest
import torch

from pipeline.config import DataConfig
from pipeline.data import cifar, folders, load_data
from pipeline.errors import ConfigError, DatasetError
from tests.fake_data import cifar_pickle, tar_cifar100, write_cifar100, write_image_tree


@pytest.fixture
def cifar_root(tmp_path):
    md5 = write_cifar100(tmp_path, n_train=200, n_test=100)
    return tmp_path, md5


def _cifar_cfg(root, **kw) -> DataConfig:
    return DataConfig(dataset="cifar100", root=str(root), workers=0, **kw)


def test_cifar100_reads_the_pickles_when_the_md5_table_matches(cifar_root):
    root, md5 = cifar_root
    raw = cifar.cifar100(_cifar_cfg(root), md5={**cifar.MD5, **md5})
    assert (len(raw.train), len(raw.test)) == (200, 100)
    assert raw.info.num_classes == 100 and raw.info.class_names[7] == "fine_07"
    assert raw.info.mean == cifar.MEAN and raw.info.recipe == "cifar"
    # rows are stored R plane, G plane, B plane: image[c, y, x] == row[c * 1024 + y * 32 + x]
    with open(root / "cifar-100-python" / "train", "rb") as f:
        rows = pickle.loads(f.read().replace(b"numpy.core.multiarray", b"numpy._core.multiarray"), encoding="bytes")
    image, label = raw.train[13]
    assert label == 13 and image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    assert image[2, 5, 9] == rows[b"data"][13][2 * 1024 + 5 * 32 + 9]


def test_cifar100_md5_mismatch_names_file_found_and_expected_values(cifar_root):
    root, md5 = cifar_root
    with pytest.raises(DatasetError) as err:
        cifar.cifar100(_cifar_cfg(root))  # the official table: the test's files cannot match it
    message = str(err.value)
    assert str(root / "cifar-100-python" / "train") in message
    assert md5["train"] in message and cifar.MD5["train"] in message
    assert "data.verify_checksums=false" in message


def test_cifar100_detects_a_modified_file(cifar_root):
    root, md5 = cifar_root
    path = root / "cifar-100-python" / "test"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one pixel of one image changed; the pickle still loads
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="'test' file has md5"):
        cifar.cifar100(_cifar_cfg(root), md5={**cifar.MD5, **md5})


def test_cifar100_checksums_can_be_turned_off_but_the_unpickler_stays_restricted(cifar_root):
    root, _ = cifar_root
    raw = cifar.cifar100(_cifar_cfg(root, verify_checksums=False))
    assert len(raw.train) == 200
    evil = pickle.dumps({b"data": __import__("os").getcwd})  # any callable global must be refused
    (root / "cifar-100-python" / "meta").write_bytes(evil)
    with pytest.raises(DatasetError, match=r"refusing to load posix\.getcwd"):
        cifar.cifar100(_cifar_cfg(root, verify_checksums=False))


def test_cifar100_from_the_archive_checks_its_md5(cifar_root, tmp_path_factory):
    root, _ = cifar_root
    archive = tmp_path_factory.mktemp("archive") / cifar.ARCHIVE
    archive_md5 = tar_cifar100(root, archive)
    raw = cifar.cifar100(_cifar_cfg(archive.parent), md5={**cifar.MD5, cifar.ARCHIVE: archive_md5})
    assert len(raw.test) == 100
    with pytest.raises(DatasetError) as err:
        cifar.cifar100(_cifar_cfg(archive))
    assert archive_md5 in str(err.value) and cifar.MD5[cifar.ARCHIVE] in str(err.value)


def test_cifar100_archive_members_larger_than_any_release_file_are_refused(cifar_root, tmp_path_factory, monkeypatch):
    """Unchecked (verify off), an archive's member may claim gigabytes; it is refused before it is read."""
    root, _ = cifar_root
    archive = tmp_path_factory.mktemp("archive") / cifar.ARCHIVE
    tar_cifar100(root, archive)
    monkeypatch.setattr(cifar, "MAX_MEMBER_BYTES", 1000)  # the real cap is 1 GiB
    with pytest.raises(DatasetError, match=r"cifar-100-python/train is \d+ bytes; CIFAR-100's largest file is 155 MB"):
        cifar.cifar100(_cifar_cfg(archive.parent, verify_checksums=False))
    monkeypatch.setattr(cifar, "MAX_MEMBER_BYTES", 1 << 30)
    with tarfile.open(archive, "w:gz") as tar:  # an archive without the files
        tar.add(root / "cifar-100-python" / "meta", arcname="cifar-100-python/meta")
    with pytest.raises(DatasetError, match="does not hold cifar-100-python/train"):
        cifar.cifar100(_cifar_cfg(archive.parent, verify_checksums=False))


def test_cifar100_root_may_be_the_folder_itself(cifar_root):
    root, md5 = cifar_root
    raw = cifar.cifar100(_cifar_cfg(root / "cifar-100-python"), md5=md5 | {cifar.ARCHIVE: ""})
    assert len(raw.train) == 200


def test_cifar100_bundle_gives_normalized_crops(cifar_root, monkeypatch):
    root, md5 = cifar_root
    monkeypatch.setattr(cifar, "MD5", {**cifar.MD5, **md5})
    bundle = load_data(_cifar_cfg(root), seed=0)
    assert len(bundle.source("val")) == 20 and len(bundle.source("train")) == 180
    image, label = bundle.dataset("train", augment=True)[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and 0 <= label < 100


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda root: None, "CIFAR-100 not found"),
        (
            lambda root: (root / "cifar-100-python").mkdir() or (root / "cifar-100-python" / "train").write_bytes(b""),
            "incomplete (test, meta missing)",
        ),
    ],
)
def test_cifar100_missing_files_say_what_is_expected_where(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(DatasetError) as err:
        cifar.cifar100(_cifar_cfg(tmp_path))
    text = str(err.value)
    assert message in text
    assert str(tmp_path / "cifar-100-python") in text and "train, test and meta" in text
    assert "--data-root" in text


def test_cifar100_rejects_a_pickle_of_the_wrong_shape(cifar_root):
    root, _ = cifar_root
    bad = {b"data": np.zeros((4, 100), np.uint8), b"fine_labels": [0, 1, 2, 3]}
    (root / "cifar-100-python" / "train").write_bytes(cifar_pickle(bad))
    with pytest.raises(DatasetError, match=r"expected uint8 \(N, 3072\)"):
        cifar.cifar100(_cifar_cfg(root, verify_checksums=False))


def test_cifar100_class_count_and_size_are_fixed(cifar_root):
    root, _ = cifar_root
    with pytest.raises(ConfigError, match="cifar100 has 100 classes"):
        cifar.cifar100(_cifar_cfg(root, num_classes=10, verify_checksums=False))
    with pytest.raises(ConfigError, match="32 px"):
        cifar.cifar100(_cifar_cfg(root, image_size=64, verify_checksums=False))


def test_restricted_unpickler_reads_plain_numpy_pickles():
    payload = {b"data": np.arange(6, dtype=np.uint8).reshape(2, 3), b"fine_labels": [1, 2]}
    for protocol in (2, 4, 5):
        data = cifar.load_pickle(io.BytesIO(pickle.dumps(payload, protocol=protocol)), "x")
        assert data["fine_labels"] == [1, 2] and data["data"].tolist() == [[0, 1, 2], [3, 4, 5]]


# --- ImageFolder -------------------------------------------------------------------------------------


def test_imagefolder_labels_follow_train_classes(tmp_path):
    write_image_tree(tmp_path / "train", ["ant", "bee", "cat"], per_class=4)
    write_image_tree(tmp_path / "val", ["ant", "cat"], per_class=2, suffix=".jpg")  # 'bee' has no val images
    bundle = load_data(DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=32, val_fraction=0.25))
    info = bundle.info
    assert info.class_names == ("ant", "bee", "cat") and info.num_classes == 3 and info.recipe == "imagenet"
    test = bundle.source("test")
    assert sorted(label for _, label in test) == [0, 0, 2, 2]  # 'cat' keeps label 2 although 'bee' is absent
    image, _ = test[0]
    assert image.mode == "RGB" and image.size == (40, 48)
    train_image, _ = bundle.dataset("train", augment=True)[0]
    eval_image, _ = bundle.dataset("test")[0]
    assert train_image.shape == eval_image.shape == (3, 32, 32) and train_image.dtype == torch.float32
    assert len(bundle.source("train")) == 9 and len(bundle.source("val")) == 3


def test_imagefolder_prefers_test_over_val(tmp_path):
    write_image_tree(tmp_path / "train", ["a", "b"], per_class=2)
    write_image_tree(tmp_path / "val", ["a", "b"], per_class=1)
    write_image_tree(tmp_path / "test", ["a", "b"], per_class=3)
    assert len(load_data(DataConfig(dataset="imagefolder", root=str(tmp_path))).source("test")) == 6


@pytest.mark.parametrize(
    "layout, message",
    [
        ({}, "has no train/ folder; expected train/<class>/<image> and val/<class>/<image>"),
        ({"train": ["a"]}, "has no val/ (or test/) folder; expected train/<class>/<image>"),
        ({"train": ["a"], "val": ["a", "zebra"]}, "val has classes that train/ lacks (zebra)"),
    ],
)
def test_imagefolder_layout_errors(tmp_path, layout, message):
    for split, classes in layout.items():
        write_image_tree(tmp_path / split, classes, per_class=1)
    with pytest.raises(DatasetError) as err:
        load_data(DataConfig(dataset="imagefolder", root=str(tmp_path)))
    assert message in str(err.value)


def test_imagefolder_needs_a_root_and_images(tmp_path):
    with pytest.raises(DatasetError, match="needs --data-root"):
        load_data(DataConfig(dataset="imagefolder"))
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "val").mkdir()
    with pytest.raises(DatasetError, match="no valid file"):
        load_data(DataConfig(dataset="imagefolder", root=str(tmp_path)))


# --- ImageNet-100 ------------------------------------------------------------------------------------


def test_imagenet100_list_is_the_pinned_cmc_list():
    data = (folders.resources.files("pipeline.data") / folders.IMAGENET100_FILE).read_bytes()
    assert hashlib.sha256(data).hexdigest() == folders.IMAGENET100_SHA256
    classes = folders.imagenet100_classes()
    assert len(classes) == len(set(classes)) == 100
    assert all(len(c) == 9 and c.startswith("n") and c[1:].isdigit() for c in classes)


def test_imagenet100_list_tampering_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(folders, "IMAGENET100_SHA256", "0" * 64)
    with pytest.raises(DatasetError, match="restore the file"):
        folders.imagenet100_classes()


def test_imagenet100_keeps_only_the_cmc_classes(tmp_path):
    cmc = folders.imagenet100_classes()
    others = ["n00000001", "n99999999"]
    write_image_tree(tmp_path / "train", cmc + others, per_class=1, size=8, suffix=".JPEG")
    write_image_tree(tmp_path / "val", cmc + others, per_class=1, size=8, suffix=".JPEG")
    bundle = load_data(DataConfig(dataset="imagenet100", root=str(tmp_path), val_fraction=0.0))
    assert bundle.info.class_names == tuple(sorted(cmc)) and bundle.info.num_classes == 100
    assert bundle.info.input_size == 224 and bundle.info.mean == folders.IMAGENET_MEAN
    assert len(bundle.source("train")) == len(bundle.source("test")) == 100
    paths = [path for path, _ in bundle.raw.test.samples]
    assert not any(other in path for path in paths for other in others)
    # the label of each image is its synset's index in the sorted CMC list
    assert all(sorted(cmc)[label] in path for path, label in bundle.raw.train.samples)


def test_imagenet100_missing_synsets_are_named(tmp_path):
    cmc = sorted(folders.imagenet100_classes())
    write_image_tree(tmp_path / "train", cmc[:-2], per_class=1, size=8)
    with pytest.raises(DatasetError) as err:
        load_data(DataConfig(dataset="imagenet100", root=str(tmp_path)))
    text = str(err.value)
    assert "lacks 2 of the 100 CMC synset folders" in text and cmc[-2] in text
    assert str(tmp_path / "train") in text and "val/<synset>/*.JPEG" in text


def test_loader_workers_default_by_dataset():
    assert DataConfig().workers == 0  # the in-memory synthetic set
    assert DataConfig(dataset="cifar100").workers >= 1
    assert DataConfig(dataset="cifar100", workers=3).workers == 3


# --- the CIFAR recipe's fast path --------------------------------------------------------------------


def _cifar_info():
    from pipeline.data import DataInfo

    return DataInfo("x", 100, (), 32, cifar.MEAN, cifar.STD, "cifar")


def test_cifar_eval_transform_matches_torchvision_v2():
    from pipeline.data.transforms import CifarTransform

    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    fast = CifarTransform(_cifar_info(), train=False)
    for image in images:
        torch.testing.assert_close(fast(image), fast.fallback(image), rtol=0, atol=1e-6)


def test_cifar_train_transform_is_a_padded_crop_with_flip():
    """Every output is one of the 9 x 9 x 2 crops/flips of the zero-padded, normalized image, and over
    many draws both flips and the extreme offsets occur."""
    from pipeline.data.transforms import CifarTransform

    info = _cifar_info()
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    fast = CifarTransform(info, train=True)
    padded = torch.nn.functional.pad(image, (4, 4, 4, 4))
    candidates = {}
    for top in range(9):
        for left in range(9):
            crop = padded[:, top : top + 32, left : left + 32]
            for flip in (False, True):
                candidates[(top, left, flip)] = CifarTransform(info, train=False)(crop.flip(-1) if flip else crop)
    torch.manual_seed(0)
    seen = set()
    for _ in range(400):
        out = fast(image)
        matches = [key for key, value in candidates.items() if torch.equal(out, value)]
        assert matches, "output is not a padded crop of the input"
        seen.update(matches)
    assert {flip for _, _, flip in seen} == {False, True}
    assert {top for top, _, _ in seen} >= {0, 8} and {left for _, left, _ in seen} >= {0, 8}


def test_loader_settings_stay_out_of_fingerprints():
    from pipeline.config import load_config
    from stages.support.kit import data_params

    base = data_params(load_config("default"))
    tuned = data_params(load_config("default", None, ["data.workers=3", "data.prefetch_factor=8"]))
    assert base == tuned and "prefetch_factor" not in base
