"""PASCAL VOC2012 + SBD adapter (the PASCAL-5i data).

Expected under ``dataset.root`` (the ``VOC2012`` folder)::

    JPEGImages/{id}.jpg
    SegmentationClassAug/{id}.png         SBD-augmented masks (0 bg, 1..20, 255 void)
    ImageSets/Segmentation/val.txt        the 1449 test images
    ImageSets/SegmentationAug/train_aug.txt   optional; without it the training list is every
                                          id with both an image and an Aug mask, minus val
                                          (= the usual 10582-image train_aug list)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.datasets.index import IndexJob, IndexRow, checked_rows, index_row, read_label, shard_ranges
from pipeline.datasets.spec import DatasetSpec

VAL_LIST = Path("ImageSets/Segmentation/val.txt")
TRAIN_AUG_LIST = Path("ImageSets/SegmentationAug/train_aug.txt")


@dataclass(frozen=True)
class VocLayout:
    root: Path

    def image_path(self, image_id: str) -> Path:
        return self.root / "JPEGImages" / f"{image_id}.jpg"

    def mask_path(self, image_id: str) -> Path:
        return self.root / "SegmentationClassAug" / f"{image_id}.png"

    def image_lists(self) -> dict[str, list[str]]:
        """``{"train": ids, "val": ids}`` in list-file order."""
        val = _read_list(self.root / VAL_LIST)
        if (self.root / TRAIN_AUG_LIST).exists():
            train = _read_list(self.root / TRAIN_AUG_LIST)
        else:
            held_out = set(val)
            train = sorted(
                p.stem for p in (self.root / "SegmentationClassAug").glob("*.png")
                if p.stem not in held_out and self.image_path(p.stem).exists()
            )
        overlap = set(train) & set(val)
        if overlap:
            raise PipelineError(
                f"{self.root / TRAIN_AUG_LIST}: {len(overlap)} ids also in {VAL_LIST}, "
                f"e.g. {sorted(overlap)[0]!r}"
            )
        return {"train": train, "val": val}


def _read_list(path: Path) -> list[str]:
    try:
        ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise PipelineError(f"{path}: unreadable image list ({exc.strerror})") from None
    if not ids:
        raise PipelineError(f"{path}: empty image list")
    return ids


def check_layout(root: Path) -> None:
    """Check that ``root`` is laid out as a VOC2012 folder, reading no file (what a preset or the
    params check can afford before DVC starts); one-line error naming what is missing."""
    if not root.is_dir():
        raise PipelineError(f"dataset.root = '{root}': no such directory")
    for required in ("JPEGImages", "SegmentationClassAug", VAL_LIST):
        if not (root / required).exists():
            raise PipelineError(
                f"dataset.root = '{root}': not a VOC2012 folder with SBD masks (missing {required})"
            )


def open_voc(root: Path) -> VocLayout:
    """Check the layout of a VOC2012 folder; one-line error naming what is missing."""
    check_layout(root)
    return VocLayout(root)


def voc_rows(layout: VocLayout, split: str, ids: list[str], num_classes: int,
             skipped: list[str] | None = None) -> list[IndexRow]:
    """Index rows of ``ids``: decodes each image and mask, checks their sizes and labels
    (``skipped``: broken pairs are left out and listed there instead of failing)."""
    def row(image_id: str) -> IndexRow:
        mask = layout.mask_path(image_id)
        return index_row(image_id, split, layout.image_path(image_id), mask, "voc", read_label(mask),
                         num_classes)

    return checked_rows(row, ids, skipped)


@dataclass(frozen=True)
class VocIndexer:
    """A VOC folder opened for ``prepare``: its image lists, read once."""

    layout: VocLayout
    lists: dict[str, list[str]]
    num_classes: int

    def jobs(self, staging: Path, out: Path, shard_size: int) -> dict[str, IndexJob]:
        """Index shards ``{split}-{first:07d}`` of at most ``shard_size`` ids (nothing is rendered:
        the rows point at the dataset's own masks)."""
        return {f"{split}-{r.start:07d}": partial(voc_rows, self.layout, split, ids[r.start:r.stop],
                                                  self.num_classes)
                for split, ids in self.lists.items() for r in shard_ranges(len(ids), shard_size)}


def open_indexer(root: Path, spec: DatasetSpec) -> VocIndexer:
    """The adapter of VOC-layout datasets (``pipeline.datasets.adapters``)."""
    layout = open_voc(root)
    return VocIndexer(layout, layout.image_lists(), len(spec.class_names))
