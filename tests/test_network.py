"""ResNetHash: shapes, argument errors and backbone weights loading (models/network.py)."""

from __future__ import annotations

import pytest
import torch
import torchvision

from models.errors import HashrayError
from models.network import HashNetConfig, ResNetHash, imagenet_weights_file


def test_outputs_are_relaxed_codes_and_encode_is_their_sign() -> None:
    torch.manual_seed(0)
    model = ResNetHash("resnet18", 16).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        outputs = model(images)
    assert outputs.shape == (3, 16) and outputs.abs().max() < 1
    assert torch.equal(model.encode(images), outputs > 0)


@pytest.mark.parametrize("bits", [0, 12, -8, 33])
def test_bits_must_be_a_positive_multiple_of_8(bits: int) -> None:
    with pytest.raises(HashrayError, match="multiple of 8"):
        ResNetHash("resnet18", bits)


def test_unknown_arch_lists_the_allowed_ones() -> None:
    with pytest.raises(HashrayError, match="resnet18, resnet34, resnet50, resnet101, resnet152"):
        ResNetHash("vgg16", 32)


def test_backbone_weights_load_from_a_plain_resnet_state_dict(tmp_path) -> None:
    torch.manual_seed(1)
    source = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pt"
    torch.save(source.state_dict(), path)  # with fc.*: the classifier is dropped
    model = ResNetHash("resnet18", 32, weights=str(path))
    assert torch.equal(model.backbone.conv1.weight, source.conv1.weight)
    assert torch.equal(model.backbone.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)


def test_backbone_weights_load_from_a_saved_resnethash(tmp_path) -> None:
    source = ResNetHash("resnet18", 16)
    path = tmp_path / "model.pt"
    torch.save(source.state_dict(), path)
    model = ResNetHash("resnet18", 64, weights=str(path))  # other bits: only the backbone is reused
    assert torch.equal(model.backbone.layer1[0].conv1.weight, source.backbone.layer1[0].conv1.weight)


def test_weights_of_another_arch_are_rejected(tmp_path) -> None:
    # resnet34 has every resnet18 key with the same shape, plus extra blocks: still not a match.
    deeper = tmp_path / "resnet34.pt"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), deeper)
    with pytest.raises(HashrayError, match=r"is not a resnet18 state_dict: unexpected \['layer1.2"):
        ResNetHash("resnet18", 32, weights=str(deeper))
    shallower = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), shallower)
    with pytest.raises(HashrayError, match=r"is not a resnet34 state_dict: missing"):
        ResNetHash("resnet34", 32, weights=str(shallower))


def test_weights_with_wrong_shapes_are_rejected(tmp_path) -> None:
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["conv1.weight"] = torch.zeros(8, 3, 7, 7)
    path = tmp_path / "narrow.pt"
    torch.save(state, path)
    with pytest.raises(HashrayError, match=r"wrong shape for \['conv1.weight'\]"):
        ResNetHash("resnet18", 32, weights=str(path))


@pytest.mark.parametrize(
    "payload, message",
    [
        ([1, 2, 3], "found a list"),
        ({"conv1.weight": "not a tensor"}, "parameter names -> tensors"),
        ({0: torch.zeros(1)}, "parameter names"),
    ],
)
def test_files_that_are_not_state_dicts_are_rejected(tmp_path, payload, message: str) -> None:
    path = tmp_path / "odd.pt"
    torch.save(payload, path)
    with pytest.raises(HashrayError, match=message):
        ResNetHash("resnet18", 32, weights=str(path))


def test_garbage_and_missing_weights_files_are_rejected(tmp_path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a torch file")
    with pytest.raises(HashrayError, match="cannot be loaded as a torch state_dict"):
        ResNetHash("resnet18", 32, weights=str(garbage))
    with pytest.raises(HashrayError, match="does not exist"):
        ResNetHash("resnet18", 32, weights=str(tmp_path / "absent.pt"))


def test_missing_imagenet_weights_name_the_file_and_download_nothing(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    expected = imagenet_weights_file("resnet18")
    assert str(expected).startswith(str(tmp_path))
    with pytest.raises(HashrayError, match="--allow-download") as error:
        ResNetHash("resnet18", 32, weights="imagenet")
    assert str(expected) in str(error.value)
    assert not expected.exists()


def test_config_round_trips_through_a_dict() -> None:
    config = HashNetConfig(arch="resnet50", bits=64, image_size=224, classes=("a", "b"), loss="cosine")
    assert HashNetConfig.from_dict({**config.to_dict(), "unknown": 1}) == config
