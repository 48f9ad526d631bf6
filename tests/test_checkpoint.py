import pytest
import torch
from torch import nn

from pipeline.artifacts.checkpoint import (
    ModelMeta,
    load_checkpoint,
    load_state_dict_file,
    load_strict,
    read_meta,
    save_checkpoint,
)
from pipeline.errors import CheckpointError


def _meta() -> ModelMeta:
    return ModelMeta(
        arch="resnet20", num_classes=4, input_size=32, mean=[0.5] * 3, std=[0.2] * 3, class_names=list("abcd")
    )


def test_round_trip(tmp_path):
    state = {"w": torch.arange(6.0).view(2, 3)}
    save_checkpoint(tmp_path / "m.safetensors", state, _meta())
    loaded, meta = load_checkpoint(tmp_path / "m.safetensors")
    assert torch.equal(loaded["w"], state["w"])
    assert meta == _meta()


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_meta(tmp_path / "nope.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(tmp_path / "bad.safetensors")


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, {"w": torch.randn(64, 64)}, _meta())
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_foreign_state_dict_wrappers(tmp_path, prefix):
    sd = {f"{prefix}fc.weight": torch.ones(2, 2), f"{prefix}fc.bias": torch.ones(2)}
    torch.save({"model": sd, "epoch": 240}, tmp_path / "ckpt.pth")
    assert sorted(load_state_dict_file(tmp_path / "ckpt.pth")) == ["fc.bias", "fc.weight"]


def test_a_prefix_on_some_keys_only_is_kept(tmp_path):
    sd = {"module.fc.weight": torch.ones(2, 2), "head.bias": torch.ones(2)}
    torch.save(sd, tmp_path / "ckpt.pth")
    assert sorted(load_state_dict_file(tmp_path / "ckpt.pth")) == ["head.bias", "module.fc.weight"]


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)


@pytest.mark.parametrize("legacy", [False, True])
def test_pickled_objects_are_never_loaded_and_are_named(tmp_path, legacy):
    torch.save({"model": _Net()}, tmp_path / "evil.pth", _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError, match="weights_only=True") as err:
        load_state_dict_file(tmp_path / "evil.pth")
    message = str(err.value)
    assert "test_checkpoint._Net" in message  # the file's own class first, before torch's building blocks
    assert "state_dict()" in message and "weights_only=False" not in message  # no advice to unpickle it
    if not legacy:
        assert "a pickled model, not its weights" in message and "torch.nn.modules.linear.Linear" in message


def test_a_corrupt_torch_file_gets_one_line(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"PK\x03\x04" + b"x" * 64)
    with pytest.raises(CheckpointError, match="cannot be loaded as weights") as err:
        load_state_dict_file(tmp_path / "junk.pth")
    assert "\n" not in str(err.value)


def test_the_one_state_dict_under_a_key_of_its_own(tmp_path):
    sd = {"fc.weight": torch.ones(2, 2), "fc.bias": torch.ones(2)}
    torch.save({"net": sd, "acc": 93.2, "epoch": 200}, tmp_path / "ckpt.pth")  # many CIFAR repositories
    assert sorted(load_state_dict_file(tmp_path / "ckpt.pth")) == ["fc.bias", "fc.weight"]
    torch.save({"student": sd, "teacher": sd, "epoch": 3}, tmp_path / "two.pth")
    with pytest.raises(CheckpointError, match=r"several state dicts \(student, teacher\)"):
        load_state_dict_file(tmp_path / "two.pth")
    torch.save({"epoch": 3, "acc": 1.0}, tmp_path / "none.pth")
    with pytest.raises(CheckpointError, match=r"not hold a state dict of tensors \(its keys: epoch, acc\)"):
        load_state_dict_file(tmp_path / "none.pth")


def test_strict_load_explains_mismatch():
    model = nn.Linear(3, 2)
    with pytest.raises(CheckpointError, match=r"1 missing keys.*1 unexpected keys"):
        load_strict(model, {"weight": torch.zeros(2, 3), "other": torch.zeros(1)}, "x.pth")
    with pytest.raises(CheckpointError, match=r"shape mismatches \(e.g. weight: \(2, 4\) vs \(2, 3\)\)"):
        load_strict(model, {"weight": torch.zeros(2, 4), "bias": torch.zeros(2)}, "x.pth")


@pytest.mark.parametrize(
    "weight, message",
    [
        (torch.full((2, 3), float("nan")), "weight holds 6 NaN or infinite values"),
        (torch.ones(2, 3).to(torch.int64), "weight holds int64 numbers where the model has floating-point weights"),
        (torch.ones(2, 3).to(torch.complex64), "weight holds complex64 numbers"),
        (torch.ones(2, 3).to_sparse(), "weight is a sparse_coo tensor"),
    ],
)
def test_values_the_model_cannot_use_are_refused(weight, message):
    """load_state_dict casts integers and complex numbers into float weights without a word and loads NaN;
    a teacher imported so would teach noise."""
    with pytest.raises(CheckpointError, match=f"x.pth: {message}"):
        load_strict(nn.Linear(3, 2), {"weight": weight, "bias": torch.zeros(2)}, "x.pth")
    load_strict(nn.Linear(3, 2), {"weight": torch.ones(2, 3).half(), "bias": torch.zeros(2)}, "x.pth")  # casts


def test_a_checkpoint_dict_of_tensors_and_other_values_is_one_error(tmp_path):
    """Asking a tensor whether it is empty raised torch's 'Boolean value of Tensor ... is ambiguous'."""
    torch.save({"fc.weight": torch.ones(2, 2), "fc.bias": [1.0, 2.0]}, tmp_path / "ckpt.pth")
    with pytest.raises(CheckpointError, match="does not hold a state dict of tensors"):
        load_state_dict_file(tmp_path / "ckpt.pth")
