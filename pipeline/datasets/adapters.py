"""File-format adapters: how ``prepare`` reads a dataset's files into index rows.

An adapter is ``open(root, spec, dataset) -> Indexer``: it checks the layout under ``root`` (one
line naming what is missing) and returns the dataset's index shards, made as the ``dataset`` params
say (COCO: ``dataset.coco_crowd``). Only ``prepare`` imports this module, so
an edit to a reader re-runs ``prepare`` and what its output changes, nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from pipeline.core.params import DatasetParams
from pipeline.datasets import coco, voc
from pipeline.datasets.index import IndexJob
from pipeline.datasets.spec import DatasetSpec


class Indexer(Protocol):
    """A dataset opened, and so validated, by its adapter."""

    def jobs(self, staging: Path, out: Path, shard_size: int) -> dict[str, IndexJob]:
        """Index shards by name (``{split}-{first:07d}``), each called as ``job(skipped=...)``.
        Files an adapter renders (COCO's label maps) go under ``staging`` and are recorded at
        ``out``, where they will be once the stage commits."""
        ...


ADAPTERS: dict[str, Callable[[Path, DatasetSpec, DatasetParams], Indexer]] = {
    "voc": lambda root, spec, dataset: voc.open_indexer(root, spec),  # VOC: no option of its own
    "coco": lambda root, spec, dataset: coco.open_indexer(root, spec, dataset.coco_crowd),
}


def open_dataset(spec: DatasetSpec, root: Path, dataset: DatasetParams | None = None) -> Indexer:
    """``spec``'s dataset at ``root`` (its layout at ``root / spec.layout_dir``), opened by its adapter
    with the ``dataset`` params (default: the schema's)."""
    path = root / spec.layout_dir if spec.layout_dir else root
    return ADAPTERS[spec.adapter](path, spec, dataset or DatasetParams())
