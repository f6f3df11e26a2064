"""File-format adapters: how ``prepare`` reads a dataset's files into index rows.

An adapter is ``open(root, spec, dataset) -> Indexer``: it checks the layout under ``root`` (one
line naming what is missing) and returns the dataset's index shards, made as the ``dataset`` params
say (COCO: ``dataset.coco_crowd``). Of the stages only ``prepare`` imports this module, so an edit
to a reader re-runs ``prepare`` and what its output changes, nothing else (the params check and the
presets, outside DVC, use the adapters' layout checks, which read no file).
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


#: each adapter's cheap layout check: the folders and files it needs exist (no file is read)
LAYOUTS: dict[str, Callable[[Path], None]] = {
    "voc": voc.check_layout,
    "coco": coco.check_layout,
}


def _layout_root(spec: DatasetSpec, root: Path) -> Path:
    return root / spec.layout_dir if spec.layout_dir else root


def check_layout(spec: DatasetSpec, root: Path) -> None:
    """``root`` exists and is laid out as ``spec``'s dataset, in milliseconds: what a preset and the
    params check verify before ``params.yaml`` is written or DVC removes an output. One
    :class:`~pipeline.core.errors.PipelineError` line naming what is missing."""
    LAYOUTS[spec.adapter](_layout_root(spec, root))


def open_dataset(spec: DatasetSpec, root: Path, dataset: DatasetParams | None = None) -> Indexer:
    """``spec``'s dataset at ``root`` (its layout at ``root / spec.layout_dir``), opened by its adapter
    with the ``dataset`` params (default: the schema's)."""
    return ADAPTERS[spec.adapter](_layout_root(spec, root), spec, dataset or DatasetParams())
