"""COCO2014 adapter (the COCO-20i data), through pycocotools.

Expected under ``dataset.root``::

    train2014/*.jpg  val2014/*.jpg
    annotations/instances_train2014.json  annotations/instances_val2014.json

Label maps are rendered once, at prepare time, as PNGs: categories are mapped to 1..C in
sorted category-id order; non-crowd instances are painted in annotation order (a later one
wins where two overlap). Crowd regions (``iscrowd=1``), as ``dataset.coco_crowd`` says:
``background`` — not painted (HSNet's COCO loader has no ignore label: crowd pixels score as
background), or ``ignore`` — painted last as 255, scored nowhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.core.errors import PipelineError
from pipeline.datasets.index import IGNORE, IndexJob, IndexRow, checked_rows, index_row, shard_ranges
from pipeline.datasets.spec import DatasetSpec

SPLITS = ("train", "val")
Crowd = Literal["background", "ignore"]


@dataclass(frozen=True)
class ImageRecord:
    """One image's info and annotations: everything needed to render its label map."""

    info: dict[str, Any]
    annotations: list[dict[str, Any]]


@dataclass(frozen=True)
class CocoSplit:
    """One split's annotations, grouped per image, with the mapping to contiguous ids."""

    root: Path
    split: str
    records: list[ImageRecord]  # sorted by image id
    class_of_category: dict[int, int]  # COCO category id -> 1..C
    class_names: tuple[str, ...]

    @property
    def annotation_path(self) -> Path:
        return self.root / "annotations" / f"instances_{self.split}2014.json"

    @property
    def image_dir(self) -> Path:
        return self.root / f"{self.split}2014"

    def shard(self, start: int, stop: int) -> CocoSplit:
        """The same split restricted to records ``start:stop`` (cheap to send to a worker)."""
        return replace(self, records=self.records[start:stop])


def annotation_mask(ann: dict[str, Any], height: int, width: int) -> np.ndarray:
    """``(H, W)`` bool mask of one annotation (polygons, RLE or compressed RLE)."""
    segm = ann["segmentation"]
    if isinstance(segm, list):  # polygons
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    elif isinstance(segm.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segm, height, width)
    else:
        counts = segm["counts"]
        rle = {"size": segm["size"], "counts": counts.encode() if isinstance(counts, str) else counts}
    return mask_utils.decode(rle).astype(bool)


def render_label(record: ImageRecord, class_of_category: dict[int, int], source: Path,
                 crowd_as: Crowd = "background") -> np.ndarray:
    """``(H, W)`` uint8 label map: instances in annotation order; crowd regions left as they are
    (``crowd_as="background"``) or painted last as 255 (``"ignore"``)."""
    info = record.info
    label = np.zeros((info["height"], info["width"]), np.uint8)
    for crowd in (0, 1) if crowd_as == "ignore" else (0,):
        for ann in record.annotations:
            if int(ann.get("iscrowd", 0)) != crowd:
                continue
            try:
                mask = annotation_mask(ann, info["height"], info["width"])
            except Exception as exc:  # pycocotools raises bare errors on bad geometry
                raise PipelineError(
                    f"{source}: annotation {ann.get('id')} of image {info['id']} has an invalid "
                    f"segmentation ({exc})"
                ) from None
            if mask.shape != label.shape:
                raise PipelineError(
                    f"{source}: annotation {ann.get('id')} is {mask.shape[1]}x{mask.shape[0]} "
                    f"but image {info['id']} is {label.shape[1]}x{label.shape[0]}"
                )
            label[mask] = IGNORE if crowd else class_of_category[ann["category_id"]]
    return label


def _check_split(root: Path, split: str) -> Path:
    """One split's annotation file and image folder exist under ``root``; its annotation path."""
    if not root.is_dir():
        raise PipelineError(f"dataset.root = '{root}': no such directory")
    path = root / "annotations" / f"instances_{split}2014.json"
    for required in (path, root / f"{split}2014"):
        if not required.exists():
            raise PipelineError(
                f"dataset.root = '{root}': not a COCO2014 folder (missing "
                f"{required.relative_to(root)})"
            )
    return path


def check_layout(root: Path) -> None:
    """Check that ``root`` is laid out as a COCO2014 folder (every split), reading no file (what a
    preset or the params check can afford before DVC starts); one line naming what is missing."""
    for split in SPLITS:
        _check_split(root, split)


def open_coco(root: Path, split: str, expected_names: tuple[str, ...] | None) -> CocoSplit:
    """Load one split's instances JSON; check layout and category names.

    Args:
        expected_names: the class names the categories must carry in sorted-id order
            (the catalog's for real COCO), or None to take the JSON's own.
    """
    path = _check_split(root, split)
    try:
        data = json.loads(path.read_text())
        categories = sorted(data["categories"], key=lambda c: c["id"])
        images, annotations = data["images"], data["annotations"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise PipelineError(f"{path}: not a COCO instances file ({exc!r})") from None
    names = tuple(c["name"] for c in categories)
    if expected_names is not None:
        for name in names:
            if name not in expected_names:
                raise PipelineError(f"{path}: unknown class name {name!r} (not a COCO-2014 class)")
        if names != expected_names:
            missing = sorted(set(expected_names) - set(names))
            raise PipelineError(f"{path}: categories differ from COCO-2014 (missing {missing[:3]})")
    by_image: dict[int, list[dict[str, Any]]] = {img["id"]: [] for img in images}
    for ann in annotations:
        if ann["image_id"] not in by_image:
            raise PipelineError(f"{path}: annotation {ann.get('id')} refers to unknown image "
                                f"{ann['image_id']}")
        by_image[ann["image_id"]].append(ann)
    records = [ImageRecord(img, by_image[img["id"]]) for img in sorted(images, key=lambda i: i["id"])]
    mapping = {c["id"]: k + 1 for k, c in enumerate(categories)}
    return CocoSplit(root, split, records, mapping, names)


def coco_rows(split: CocoSplit, mask_dir: Path, final_mask_dir: Path, num_classes: int,
              skipped: list[str] | None = None, crowd_as: Crowd = "background") -> list[IndexRow]:
    """Render and index the label maps of ``split.records`` (narrow it with :meth:`shard`);
    each image is decoded once (``skipped``: broken ones are left out and listed there; ``crowd_as``:
    :func:`render_label`'s).

    The PNGs are written under ``mask_dir`` (a staging directory) and recorded in the rows
    under ``final_mask_dir``, where they will be once the stage commits.
    """
    mask_dir.mkdir(parents=True, exist_ok=True)

    def row(record: Any) -> IndexRow:
        label = render_label(record, split.class_of_category, split.annotation_path, crowd_as)
        stem = Path(record.info["file_name"]).stem
        Image.fromarray(label).save(mask_dir / f"{stem}.png")
        return index_row(stem, split.split, split.image_dir / record.info["file_name"],
                         final_mask_dir / f"{stem}.png", "coco", label, num_classes)

    return checked_rows(row, split.records, skipped)


@dataclass(frozen=True)
class CocoIndexer:
    """A COCO folder opened for ``prepare``: both splits' annotations, read and checked once."""

    splits: list[CocoSplit]
    num_classes: int
    crowd_as: Crowd = "background"

    def jobs(self, staging: Path, out: Path, shard_size: int) -> dict[str, IndexJob]:
        """Index shards ``{split}-{first:07d}`` of at most ``shard_size`` images, each rendering its
        label maps into ``staging/masks/{split}`` and recording them under ``out``."""
        return {f"{split.split}-{r.start:07d}": partial(
                    coco_rows, split.shard(r.start, r.stop), staging / "masks" / split.split,
                    out / "masks" / split.split, self.num_classes, crowd_as=self.crowd_as)
                for split in self.splits for r in shard_ranges(len(split.records), shard_size)}


def open_indexer(root: Path, spec: DatasetSpec, crowd_as: Crowd = "background") -> CocoIndexer:
    """The adapter of COCO-layout datasets (``pipeline.datasets.adapters``): the categories must be
    ``spec.class_names`` in sorted-id order; crowd regions as ``crowd_as`` says."""
    return CocoIndexer([open_coco(root, s, expected_names=spec.class_names) for s in SPLITS],
                       len(spec.class_names), crowd_as)
