"""Image loading: the host decodes and resizes (in threads), normalising runs where the model
does; the values and memory layout are those of a plain one-image-at-a-time float loader."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from pipeline.core.images import load_normalized, load_resized, normalize

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def plain(paths: list[str], size: int) -> torch.Tensor:
    arrays = [np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BICUBIC)) for p in paths]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def test_loading_equals_a_plain_loader_bit_for_bit_in_threads_too(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(37, 53), (64, 48), (50, 50), (29, 71)]):
        path = tmp_path / f"{i}.jpg" if i % 2 else tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(tmp_path / "gray.png")
    paths.append(str(tmp_path / "gray.png"))  # grayscale: converted to RGB
    expected = plain(paths, 61)
    for threads in (1, 3):
        pixels = load_resized(paths, 61, threads=threads)
        assert pixels.dtype == torch.uint8 and pixels.shape == (5, 3, 61, 61)
        got = normalize(pixels, MEAN, STD)
        assert torch.equal(got, expected) and got.stride() == expected.stride()  # channels-last, as before
    assert torch.equal(load_normalized(paths, 61, MEAN, STD), expected)


def test_normalising_runs_on_the_models_device():
    pixels = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    out = normalize(pixels, MEAN, STD, "meta")
    assert out.device.type == "meta" and out.dtype == torch.float32 and out.shape == pixels.shape


def test_read_ahead_gives_every_batch_in_order_and_loads_the_next_while_one_is_used():
    import threading

    from pipeline.core.images import read_ahead

    for ahead in (False, True):
        loaded = {s: threading.Event() for s in (0, 4, 8)}

        def load(part: slice, loaded=loaded) -> list[int]:
            loaded[part.start].set()
            return list(range(10))[part]

        got, overlapped = [], []
        for part, items in read_ahead(load, 10, 4, ahead=ahead):
            got.append(items)
            if part.start == 0:  # while batch 0 is in use, batch 4 is loading (ahead) or not yet asked
                overlapped.append(loaded[4].wait(timeout=2 if ahead else 0.2))
                assert not loaded[8].is_set()  # never more than one batch ahead
        assert got == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
        assert overlapped == [ahead]
