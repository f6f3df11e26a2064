"""Frozen backbones: shapes, frozenness, and the errors a missing checkpoint gets."""

from __future__ import annotations

import pytest
import torch
import torchvision.models as tvm

from pipeline.core.errors import PipelineError
from pipeline.features.backbone import build_backbone
from pipeline.tinyclip.model import build_tiny


@pytest.mark.parametrize(("name", "net", "channels"),
                         [("resnet50", tvm.resnet50, 1536), ("vgg16", tvm.vgg16, 1024)])
def test_imagenet_backbones_from_a_local_checkpoint(name, net, channels, tmp_path):
    torch.save(net().state_dict(), tmp_path / "w.pth")
    backbone = build_backbone(name, weights=str(tmp_path / "w.pth"))
    backbone.train()  # a frozen backbone stays in eval mode
    assert not backbone.training and not any(p.requires_grad for p in backbone.parameters())
    feats = backbone(torch.randn(2, 3, 64, 96))
    assert feats.shape == (2, channels, 8, 12) and backbone.channels == channels
    assert not feats.requires_grad


def test_clip_trunk_features_on_the_token_grid():
    backbone = build_backbone("clip", build_tiny("tiny-vit", 0))
    feats = backbone(torch.randn(3, 3, 128, 128))
    assert feats.shape == (3, 2 * 96, 8, 8) == (3, backbone.channels, 8, 8)
    assert not any(p.requires_grad for p in backbone.parameters())


def test_clip_trunk_builds_on_the_device_its_clip_was_loaded_on():
    bundle = build_tiny("tiny-vit", 0)
    bundle.model.to("meta")  # stands in for a GPU: any tensor left on the CPU fails
    backbone = build_backbone("clip", bundle)
    assert backbone.channels == 2 * 96
    assert backbone(torch.zeros(1, 3, 128, 128, device="meta")).shape == (1, 2 * 96, 8, 8)


def test_missing_weights_are_one_clear_line(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = r"backbone 'vgg16': ImageNet weights are not cached .*vgg16-397923af\.pth.*backbone.weights"
    with pytest.raises(PipelineError, match=expected) as err:
        build_backbone("vgg16")
    assert "\n" not in str(err.value)
    with pytest.raises(PipelineError, match="backbone.weights = '/nowhere.pth': no such checkpoint"):
        build_backbone("resnet50", weights="/nowhere.pth")
    with pytest.raises(PipelineError, match="needs the CLIP model"):
        build_backbone("clip")
