"""Images as models take them: RGB, resized to a square side, normalised."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image


def load_normalized(
    paths: Sequence[str], size: int, mean: Sequence[float], std: Sequence[float],
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """``(B, 3, size, size)`` float images (bicubic resize), normalised with ``mean``/``std``."""
    arrays = [np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BICUBIC)) for p in paths]
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    images = (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return images.to(device)
