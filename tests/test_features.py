"""Backbone truncation and the three ways of getting weights (imagenet, none, a state_dict file)."""

from __future__ import annotations

import pickle
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

from protoad_edge.builder.features import PatchFeatures, build_backbone
from protoad_edge.constants import FEATURE_CHANNELS, FEATURE_INFO
from protoad_edge.errors import ProtoADError


def test_backbone_has_no_layer4_or_fc() -> None:
    backbone, desc = build_backbone("none", seed=0)
    names = {n.split(".")[0] for n, _ in backbone.named_parameters()}
    assert names == {"conv1", "bn1", "layer1", "layer2", "layer3"}
    assert "seed 0" in desc
    assert [f.channels for f in FEATURE_INFO] == [256, 512, 1024] and FEATURE_CHANNELS == 1792


def test_feature_maps_channels_and_strides(torch_threads: None) -> None:
    backbone, _ = build_backbone("none", seed=0)
    with torch.no_grad():
        maps = backbone(torch.zeros(1, 3, 96, 96))
    for fmap, info in zip(maps, FEATURE_INFO):
        assert fmap.shape == (1, info.channels, 96 // info.stride, 96 // info.stride)
    assert PatchFeatures(backbone, 96).size == 24


def test_none_is_seeded_and_deterministic() -> None:
    a = build_backbone("none", seed=1)[0].state_dict()
    b = build_backbone("none", seed=1)[0].state_dict()
    c = build_backbone("none", seed=2)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv1.weight"], c["conv1.weight"])


@pytest.mark.slow  # 1.5-4 s: out of the fast tier (2 minutes)
def test_weights_from_state_dict_file(tmp_path: Path) -> None:
    full = torchvision.models.wide_resnet50_2(weights=None)
    path = tmp_path / "wrn.pth"
    torch.save(full.state_dict(), path)  # a complete model: layer4/fc are ignored
    backbone, desc = build_backbone(str(path))
    assert torch.equal(backbone.state_dict()["layer3.0.conv1.weight"], full.state_dict()["layer3.0.conv1.weight"])
    assert "wrn.pth" in desc and "sha256" in desc


class _Evil:
    def __reduce__(self):  # would run code on a plain torch.load(weights_only=False)
        return (print, ("pwned",))


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        (b"not a checkpoint", "not a loadable state_dict"),
        ("evil", "not a loadable state_dict"),
        ({"conv1.weight": torch.zeros(1)}, "not a wide_resnet50_2 state_dict"),
        ([1, 2, 3], "expected a dict of tensors"),
    ],
)
def test_bad_weights_files(tmp_path: Path, content: object, message: str) -> None:
    path = tmp_path / "w.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "evil":
        path.write_bytes(pickle.dumps({"x": _Evil()}))
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(ProtoADError, match=message) as err:
        build_backbone(str(path))
    assert str(path) in str(err.value)


def test_imagenet_offline_names_alternatives(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(ProtoADError, match="--weights none.*--weights PATH"):
        build_backbone("imagenet")


def test_bad_upsample_mode() -> None:
    with pytest.raises(ProtoADError, match="--feature-upsample"):
        PatchFeatures(build_backbone("none")[0], 64, "bicubic")
