"""The light-weight decoder (LFSS §4.1): ASPP followed by three plain convolution blocks."""

from __future__ import annotations

import torch
from torch import nn


def conv_relu(cin: int, cout: int, kernel: int = 3, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel - 1) // 2
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=padding, dilation=dilation), nn.ReLU(inplace=True)
    )


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: parallel 1×1, dilated 3×3 and image-pooling branches,
    concatenated and fused by a 1×1 convolution. ``(B, C, h, w)`` -> ``(B, C, h, w)``."""

    def __init__(self, channels: int, rates: tuple[int, ...] = (2, 4, 6)) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [conv_relu(channels, channels, 1)] + [conv_relu(channels, channels, 3, r) for r in rates]
        )
        self.pool = conv_relu(channels, channels, 1)
        self.fuse = conv_relu(channels * (len(rates) + 2), channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(x.mean((2, 3), keepdim=True)).expand_as(x)
        return self.fuse(torch.cat([b(x) for b in self.branches] + [pooled], 1))


class Decoder(nn.Module):
    """Query features ⊕ guidance maps -> one foreground logit per cell.

    The query features are reduced by a 1×1 convolution (with dropout, as PFENet does, so the
    decoder leans on the class-agnostic guidance rather than memorising base classes), joined
    with the guidance maps, passed through ASPP and three residual 3×3 blocks.

    ``(B, feat_channels, h, w)``, ``(B, guide_channels, h, w)`` -> ``(B, h, w)`` logits.
    """

    def __init__(
        self, feat_channels: int, guide_channels: int, *, hidden: int, dropout: float
    ) -> None:
        super().__init__()
        self.reduce = nn.Sequential(conv_relu(feat_channels, hidden, 1), nn.Dropout2d(dropout))
        self.merge = conv_relu(hidden + guide_channels, hidden, 1)
        self.aspp = ASPP(hidden)
        self.blocks = nn.ModuleList(
            [nn.Sequential(conv_relu(hidden, hidden), conv_relu(hidden, hidden)) for _ in range(3)]
        )
        self.head = nn.Conv2d(hidden, 1, 1)

    def forward(self, feats: torch.Tensor, guides: torch.Tensor) -> torch.Tensor:
        x = self.aspp(self.merge(torch.cat([self.reduce(feats), guides], 1)))
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)[:, 0]
