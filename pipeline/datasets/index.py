"""The one index format every dataset adapter produces (``data/index/index.parquet``).

One row per image:

=============  ==============  ==========================================================
column         type            meaning
=============  ==============  ==========================================================
image_id       string          unique id (file stem)
split          string          ``train`` or ``val`` (the dataset's own split)
image_path     string          path of the RGB image (relative paths: from the repo root)
mask_path      string          path of the label PNG (0 bg, 1..C classes, 255 ignore)
mask_source    string          ``voc`` (SegmentationClassAug) or ``coco`` (rendered from JSON)
height, width  int32           image size; the mask has the same size
class_ids      list<int16>     classes present (any pixel), ascending
class_pixels   list<int32>     pixel count of each class in ``class_ids``
ignore_pixels  int32           pixels labelled 255
=============  ==============  ==========================================================

``meta.json`` beside it names the dataset and its root, holds what the dataset declares
(:mod:`pipeline.datasets.registry`: ``class_names``, id = position + 1; ``prompt_names``;
``fold_convention``; ``relative_min_pixels``), so that no later stage needs the registry, and
lists the images ``prepare.on_bad_image: skip`` left out (``skipped``: one reason each).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from pipeline.core.errors import PipelineError

IGNORE = 255
T = TypeVar("T")

INDEX_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("split", pa.string()),
    ("image_path", pa.string()),
    ("mask_path", pa.string()),
    ("mask_source", pa.string()),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("class_ids", pa.list_(pa.int16())),
    ("class_pixels", pa.list_(pa.int32())),
    ("ignore_pixels", pa.int32()),
])


@dataclass(frozen=True)
class IndexRow:
    image_id: str
    split: str
    image_path: str
    mask_path: str
    mask_source: str
    height: int
    width: int
    class_ids: list[int]
    class_pixels: list[int]
    ignore_pixels: int


def read_label(path: Path) -> np.ndarray:
    """``(H, W)`` uint8 label map from a PNG (palette or grey); one-line error if unreadable."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise PipelineError(f"{path}: a label map must be a palette or grey PNG, got {im.mode}")
            return np.asarray(im)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise PipelineError(f"{path}: unreadable mask ({_reason(exc)})") from None


def image_size(path: Path) -> tuple[int, int]:
    """``(H, W)`` of an image, decoded in full once (a truncated or damaged file fails here, in
    ``prepare``, not hours later in a stage that reads it); one-line error if unreadable."""
    try:
        with Image.open(path) as im:
            im.load()
            width, height = im.size
            return height, width
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise PipelineError(f"{path}: unreadable image ({_reason(exc)})") from None


def _reason(exc: Exception) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]


def index_row(
    image_id: str, split: str, image_path: Path, mask_path: Path, source: str,
    label: np.ndarray, num_classes: int,
) -> IndexRow:
    """Check an (image, label) pair and count its pixels per class."""
    height, width = image_size(image_path)
    if label.shape != (height, width):
        raise PipelineError(
            f"{mask_path}: mask is {label.shape[1]}x{label.shape[0]} but its image "
            f"{image_path} is {width}x{height}"
        )
    counts = np.bincount(label.ravel(), minlength=256)
    bad = np.flatnonzero(counts[num_classes + 1 : IGNORE]) + num_classes + 1
    if bad.size:
        raise PipelineError(
            f"{mask_path}: label {int(bad[0])} outside 0..{num_classes} and {IGNORE}"
        )
    present = np.flatnonzero(counts[1 : num_classes + 1]) + 1
    return IndexRow(
        image_id, split, str(image_path), str(mask_path), source, height, width,
        present.tolist(), counts[present].tolist(), int(counts[IGNORE]),
    )


def checked_rows(make_row: Callable[[T], IndexRow], items: Iterable[T],
                 skipped: list[str] | None) -> list[IndexRow]:
    """``make_row(item)`` for every item; with a ``skipped`` list, an item whose files are broken
    (any :class:`PipelineError`) is left out and its one-line reason appended instead."""
    rows = []
    for item in items:
        try:
            rows.append(make_row(item))
        except PipelineError as exc:
            if skipped is None:
                raise
            skipped.append(str(exc))
    return rows


#: one shard of ``prepare``'s index: ``job(skipped=None | list)`` -> its rows (see :func:`checked_rows`)
IndexJob = Callable[..., list[IndexRow]]


def shard_ranges(n: int, size: int) -> list[range]:
    """``range(0, n)`` cut into consecutive ranges of at most ``size``."""
    return [range(start, min(start + size, n)) for start in range(0, n, size)]


def write_index(rows: list[IndexRow], path: Path) -> None:
    columns = {name: [getattr(r, name) for r in rows] for name in INDEX_SCHEMA.names}
    pq.write_table(pa.Table.from_pydict(columns, schema=INDEX_SCHEMA), path)


def read_index(path: Path) -> pd.DataFrame:
    return pq.read_table(path).to_pandas()


DECLARATION = ("class_names", "prompt_names", "fold_convention", "relative_min_pixels")


def dataset_declaration(meta: dict, index_dir: Path) -> dict:
    """What the dataset declares, as ``prepare`` wrote it into ``meta.json`` (:data:`DECLARATION`);
    one line for an index made before it was written there."""
    missing = [key for key in DECLARATION if key not in meta]
    if missing:
        raise PipelineError(f"{index_dir / 'meta.json'}: no {missing[0]} (an index of an earlier version: "
                            "re-run the prepare stage)")
    return {key: meta[key] for key in DECLARATION}


def read_index_dir(index_dir: Path) -> tuple[pd.DataFrame, dict]:
    """``data/index``: the index table and ``meta.json`` (dataset, root, class names)."""
    try:
        meta = json.loads((index_dir / "meta.json").read_text())
        return read_index(index_dir / "index.parquet"), meta
    except FileNotFoundError as exc:
        raise PipelineError(f"{exc.filename}: missing (run the prepare stage first)") from None

