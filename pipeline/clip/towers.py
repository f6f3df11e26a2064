"""Project-specific changes to open_clip towers, recorded by name in a model's local-dir config.

A CLIP folder's ``open_clip_config.json`` may carry ``"lfss": {change: options}``;
:func:`pipeline.clip.loader.build_model` applies each change from :data:`TOWER_CHANGES` after
building the plain open_clip model, so custom towers round-trip through save and load.

* ``conv_stem``: the ViT's patchify ``conv1`` replaced by 3x3 stride-2 convolutions with
  BatchNorm and GELU — the same ``(B, width, H/p, W/p)`` output as a patch-p patchify, so
  attention maps and the MaskCLIP value path work unchanged (the tiny CLIP's stem,
  :mod:`pipeline.tinyclip.model`).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def conv_stem(width: int, channels: tuple[int, ...]) -> nn.Sequential:
    """``(B, 3, H, W) -> (B, width, H/2^k, W/2^k)`` with ``k = len(channels) + 1`` convolutions."""
    layers: list[nn.Module] = []
    for c_in, c_out in zip((3, *channels), (*channels, width), strict=True):
        conv = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False)
        layers += [conv, nn.BatchNorm2d(c_out), nn.GELU()]
    return nn.Sequential(*layers)


def use_conv_stem(model: nn.Module, channels: list[int]) -> None:
    model.visual.conv1 = conv_stem(model.visual.transformer.width, tuple(channels))


#: name -> function(model, **options), applied in place
TOWER_CHANGES: dict[str, Callable[..., None]] = {"conv_stem": use_conv_stem}
