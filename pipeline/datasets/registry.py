"""The datasets the pipeline knows, by ``dataset.name``: one line per dataset module of
:mod:`pipeline.datasets.catalog` (docs/design.md#adding-a-dataset).

Only ``prepare`` (and the params check before ``dvc repro``) reads the registry: it writes what a
dataset declares into ``data/index/meta.json``, where every later stage finds it, so that adding
or editing a dataset module re-runs ``prepare`` alone (whose outputs then stay the same)."""

from __future__ import annotations

from pipeline.core.errors import PipelineError
from pipeline.core.params import GENERATED_ROOT, DatasetParams
from pipeline.datasets.catalog import coco, pascal, synthetic
from pipeline.datasets.spec import DatasetSpec

DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (
    synthetic.SPEC,
    pascal.SPEC,
    coco.SPEC,
)}


def dataset_spec(name: str) -> DatasetSpec:
    """The dataset called ``name``; one line naming the known ones otherwise."""
    try:
        return DATASETS[name]
    except KeyError:
        raise PipelineError(f"dataset.name = {name!r}: unknown dataset (known: "
                            f"{', '.join(DATASETS)})") from None


def check_dataset(dataset: DatasetParams, source: str = "params.yaml") -> DatasetSpec:
    """The spec of ``dataset.name``, once the name is known and ``dataset.root`` fits it (unset for
    a generated dataset, given for any other); one line naming the key otherwise."""
    if dataset.name not in DATASETS:
        *others, last = map(repr, DATASETS)
        raise PipelineError(f"{source}: dataset.name = {dataset.name!r}: should be {', '.join(others)} "
                            f"or {last}")
    spec = DATASETS[dataset.name]
    if spec.generated and dataset.root not in (None, GENERATED_ROOT):
        raise PipelineError(f"{source}: dataset.root = {dataset.root!r}: the {spec.name} benchmark is "
                            f"generated at {GENERATED_ROOT}; leave dataset.root unset")
    if not spec.generated and dataset.root is None:
        raise PipelineError(f"{source}: dataset.root: required for dataset.name = {spec.name!r}")
    return spec
