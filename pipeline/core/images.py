"""Images as models take them: RGB, resized to a square side, normalised.

The host decodes and resizes (:func:`load_resized`, several images at once in threads: Pillow
releases the GIL in both); normalising is float work and happens where the model runs
(:func:`normalize`: on a GPU the host sends a quarter of the bytes and does none of it). The
values are the same wherever it runs: every step is one IEEE float32 operation per element.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import torch
from PIL import Image

T = TypeVar("T")


def _resized(path: str, size: int) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC))


def load_resized(paths: Sequence[str], size: int, threads: int | None = None) -> torch.Tensor:
    """``(B, 3, size, size)`` uint8 images (bicubic resize), in channels-last memory (a view of the
    ``(B, size, size, 3)`` pixels), decoded by ``threads`` threads (default: torch's intra-op
    thread count, the cores this process may use)."""
    threads = min(len(paths), threads or torch.get_num_threads())
    if threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            arrays = list(pool.map(_resized, paths, [size] * len(paths)))
    else:
        arrays = [_resized(p, size) for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
              device: str | torch.device = "cpu") -> torch.Tensor:
    """``(B, 3, H, W)`` uint8 -> float32 ``(x / 255 - mean) / std`` on ``device``, in the memory
    format of ``images``."""
    pixels = images.to(device)
    out = torch.empty_like(pixels, dtype=torch.float32).copy_(pixels)
    mean = torch.tensor(mean, dtype=torch.float32, device=out.device).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32, device=out.device).view(1, 3, 1, 1)
    return out.div_(255).sub_(mean).div_(std)


def load_normalized(
    paths: Sequence[str], size: int, mean: Sequence[float], std: Sequence[float],
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """``(B, 3, size, size)`` float images (bicubic resize), normalised with ``mean``/``std`` on
    ``device`` (:func:`load_resized`, then :func:`normalize`)."""
    return normalize(load_resized(paths, size), mean, std, device)


def read_ahead(load: Callable[[slice], T], n: int, batch_size: int, ahead: bool) -> Iterator[tuple[slice, T]]:
    """``(part, load(part))`` for the consecutive batches ``part`` of ``n`` items; with ``ahead``,
    the next batch is loaded in a thread while the caller works on this one (for a model on a GPU:
    on a CPU the model's threads want every core, so there it loads in turn)."""
    parts = [slice(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    if not ahead or len(parts) < 2:
        for part in parts:
            yield part, load(part)
        return
    with ThreadPoolExecutor(1) as pool:
        coming = pool.submit(load, parts[0])
        for i, part in enumerate(parts):
            loaded = coming.result()
            if i + 1 < len(parts):
                coming = pool.submit(load, parts[i + 1])
            yield part, loaded
