"""The datasets the pipeline knows, by ``dataset.name``: one line per dataset module of
:mod:`pipeline.datasets.catalog` (docs/design.md#adding-a-dataset)."""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.core.errors import PipelineError
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


def prompt_names(name: str, class_names: Sequence[str]) -> tuple[str, ...]:
    """The classes of an index (``data/index/meta.json``'s ``class_names``) as prompts say them,
    checked against the dataset's own list."""
    spec = dataset_spec(name)
    if tuple(class_names) != spec.class_names:
        raise PipelineError(f"data/index/meta.json: its {len(class_names)} class names are not the "
                            f"{name!r} dataset's {len(spec.class_names)} (re-run the prepare stage)")
    return spec.prompt_names
