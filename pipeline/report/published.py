"""Published results set beside this run's in the report's main table (PASCAL-5i and COCO-20i only).

The rows live in a small data file (``references/published_results.yaml``), each with its method,
backbone, supervision, per-fold and mean mIoU, the protocol it was scored under and a citation;
:func:`load_published` checks it (one line naming the file and the bad row), :func:`published_for`
picks a dataset's rows of a shot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.core.errors import PipelineError

#: the datasets published FSS numbers exist for (dataset.name -> the benchmark's name)
BENCHMARKS = {"pascal": "PASCAL-5i", "coco": "COCO-20i"}


class PublishedRow(BaseModel):
    """One published result: mIoU (%) per fold (0-3) and their mean, as printed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dataset: Literal["pascal", "coco"]
    shot: int = Field(gt=0)
    method: str
    backbone: str
    supervision: Literal["text", "mask"]  # text: image-level labels / class names; mask: support masks
    folds: list[float] = Field(min_length=4, max_length=4)
    mean: float
    protocol: Literal["hsnet", "pfenet"]
    cite: str  # a key of the file's citations
    where: str  # the table (and note) the numbers are printed in

    @property
    def name(self) -> str:
        return f"{self.method} ({self.backbone}, {self.supervision} supervision)"


class Published(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    citations: dict[str, str]
    rows: list[PublishedRow]

    @model_validator(mode="after")
    def _cited(self) -> Published:
        for i, row in enumerate(self.rows):
            if row.cite not in self.citations:
                raise ValueError(f"rows[{i}].cite = {row.cite!r}: not a key of citations")
        return self

    def citation(self, row: PublishedRow) -> str:
        return f"{self.citations[row.cite]}, {row.where}"


def load_published(path: Path) -> Published:
    """The published rows of ``path``; a missing or malformed file is one line naming it."""
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found (the published results beside the main table)") from None
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    try:
        return Published.model_validate(raw or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise PipelineError(f"{path}: {where + ': ' if where else ''}"
                            f"{first['msg'].removeprefix('Value error, ')}") from None


def published_for(published: Published, dataset: str, shot: int) -> list[PublishedRow]:
    """``dataset``'s published rows of ``shot`` (none for a dataset without published numbers)."""
    return [row for row in published.rows if row.dataset == dataset and row.shot == shot]
