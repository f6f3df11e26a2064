"""Frozen feature extractors with one interface (docs/method.md#backbone).

* ``resnet50``: torchvision ResNet-50 with ImageNet weights, layer3 dilated (PFENet), features
  of layer2 ⊕ layer3 at stride 8 (1536 channels);
* ``vgg16``: torchvision VGG-16 with ImageNet weights, conv4_3 ⊕ conv5_3 (upsampled) at
  stride 8 (1024 channels);
* ``clip``: the CLIP image trunk (the default on the synthetic benchmark, where no ImageNet
  weights exist): ViT tokens entering the last block ⊕ leaving it, or ResNet layer3 (pooled)
  ⊕ layer4, on the CLIP's token grid.

Every backbone is frozen (no parameter requires grad, always in eval mode) and says which
normalisation its input needs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.clip.loader import ClipBundle, load_local_dir
from pipeline.core.errors import PipelineError
from pipeline.core.params import BackboneParams
from pipeline.priors.forward import image_features

BackboneName = Literal["resnet50", "vgg16", "clip"]
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Backbone(nn.Module):
    """``(B, 3, H, W)`` images normalised with ``mean``/``std`` -> ``(B, C, h, w)`` features."""

    channels: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def freeze(self) -> Backbone:
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> Backbone:  # frozen: BatchNorm statistics never move
        return super().train(False)


class ResNet50Features(Backbone):
    channels = 512 + 1024
    mean, std = IMAGENET_MEAN, IMAGENET_STD

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1)
        self.layer2, self.layer3 = net.layer2, net.layer3

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        l2 = self.layer2(self.stem(images))
        return torch.cat([l2, self.layer3(l2)], dim=1)


class VGG16Features(Backbone):
    channels = 512 + 512
    mean, std = IMAGENET_MEAN, IMAGENET_STD

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.to_conv4, self.to_conv5 = net.features[:23], net.features[23:30]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        c4 = self.to_conv4(images)
        c5 = F.interpolate(self.to_conv5(c4), size=c4.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([c4, c5], dim=1)


class ClipTrunk(Backbone):
    def __init__(self, bundle: ClipBundle) -> None:
        super().__init__()
        self.visual = bundle.model.visual
        self.mean, self.std = bundle.mean, bundle.std
        device = next(self.visual.parameters()).device  # the CLIP may already be on a GPU
        with torch.no_grad():
            probe = image_features(self.visual, torch.zeros(1, 3, bundle.image_size, bundle.image_size,
                                                            device=device), attention_blocks=1)
        self.channels = sum(t.shape[-1] for t in probe.tokens)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = image_features(self.visual, images, attention_blocks=1)
        tokens = torch.cat([t.float() for t in feats.tokens], dim=-1)  # (B, N, C)
        return tokens.transpose(1, 2).reshape(len(images), -1, *feats.grid)


def build_backbone(
    name: BackboneName, clip: ClipBundle | None = None, weights: str | None = None
) -> Backbone:
    """A frozen backbone. ``weights``: a local torchvision checkpoint (default: the ImageNet
    weights from torchvision's cache, downloaded when there is network)."""
    if name == "clip":
        if clip is None:
            raise PipelineError("backbone 'clip' needs the CLIP model (data/models/clip)")
        return ClipTrunk(clip).freeze()
    import torchvision.models as tvm

    if name == "resnet50":
        net = tvm.resnet50(replace_stride_with_dilation=[False, True, True])
        tag = tvm.ResNet50_Weights.IMAGENET1K_V1
    elif name == "vgg16":
        net, tag = tvm.vgg16(), tvm.VGG16_Weights.IMAGENET1K_V1
    else:
        raise PipelineError(f"backbone {name!r}: unknown (resnet50, vgg16 or clip)")
    net.load_state_dict(_imagenet_state(name, tag, weights))
    return (ResNet50Features(net) if name == "resnet50" else VGG16Features(net)).freeze()


def load_backbone(cfg: BackboneParams, clip_dir: Path, device: torch.device | str) -> Backbone:
    """The frozen backbone ``cfg`` names on ``device`` (the CLIP trunk from the run's
    ``data/models/clip``)."""
    clip = load_local_dir(Path(clip_dir), device) if cfg.name == "clip" else None
    return build_backbone(cfg.name, clip, cfg.weights).to(device)


def _imagenet_state(name: str, tag, weights: str | None) -> dict:
    if weights is not None:
        if not Path(weights).is_file():
            raise PipelineError(f"backbone.weights = {weights!r}: no such checkpoint for {name}")
        return torch.load(weights, map_location="cpu", weights_only=True)
    cache = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(tag.url)
    try:
        return tag.get_state_dict(progress=False)
    except Exception as exc:  # noqa: BLE001 - urllib, ssl, http: all mean "not reachable"
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise PipelineError(f"backbone {name!r}: ImageNet weights are not cached ({cache}) and cannot be "
                            f"downloaded ({reason}); copy {os.path.basename(tag.url)} there, or set "
                            "backbone.weights to a local checkpoint") from None
