"""The dataset registry: one module per dataset, read by every stage that needs a dataset's names,
while only ``prepare`` reads its files (so an edit to a file reader re-runs nothing else)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.core.errors import PipelineError
from pipeline.datasets import registry
from pipeline.datasets.registry import DATASETS, dataset_spec
from pipeline.datasets.shapes import SHAPE_NAMES
from pipeline.datasets.spec import DatasetSpec
from stages._deps import source_deps

REPO = Path(__file__).resolve().parents[1]
READERS = {"pipeline/datasets/coco.py", "pipeline/datasets/voc.py", "pipeline/datasets/adapters.py"}


def test_each_dataset_declares_its_names_folds_and_adapter():
    assert list(DATASETS) == ["synthetic", "pascal", "coco"]
    assert dataset_spec("synthetic").class_names == SHAPE_NAMES and dataset_spec("synthetic").generated
    pascal, coco = dataset_spec("pascal"), dataset_spec("coco")
    assert len(pascal.class_names) == 20 and pascal.prompt_names[10] == "dining table"
    assert pascal.class_names[10] == "diningtable" and pascal.fold_convention == "contiguous"
    assert len(coco.class_names) == 80 and coco.fold_convention == "interleaved" and coco.adapter == "coco"
    with pytest.raises(PipelineError, match="dataset.name = 'voc': unknown dataset"):
        dataset_spec("voc")
    with pytest.raises(ValueError, match="20 class names but 19 prompt names"):
        DatasetSpec("x", pascal.class_names, pascal.prompt_names[:19], "contiguous", "voc")


@pytest.mark.parametrize("stage", ["clip_model", "split", "priors", "features", "pseudo_masks", "train",
                                   "evaluate", "report"])
def test_only_prepare_depends_on_the_registry_and_the_file_readers(stage):
    """An edit to a reader (the COCO adapter) or a new dataset module re-runs prepare alone: every
    later stage reads what a dataset declares from prepare's data/index/meta.json."""
    registry_files = READERS | {"pipeline/datasets/registry.py", "pipeline/datasets/catalog/coco.py"}
    assert registry_files <= set(source_deps("stages.prepare"))
    assert not set(source_deps(f"stages.{stage}")) & registry_files


def docs_example() -> str:
    """The toy dataset module of docs/design.md (the first Python block after its marker)."""
    text = (REPO / "docs" / "design.md").read_text()
    after = text.split("<!-- toy-dataset-example -->", 1)[1]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)


def write_voc(root: Path, names: tuple[str, ...], per_class: int = 3) -> None:
    """A VOC2012-layout folder: per class ``per_class`` train and ``per_class`` val images, each a
    64 px square image with one object of that class (and a 255 band around it)."""
    for sub in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    val = []
    for c in range(1, len(names) + 1):
        for k in range(2 * per_class):
            image_id = f"{c}_{k}"
            label = np.zeros((64, 64), np.uint8)
            label[8:56, 8:56] = 255
            label[10:54, 10:54] = c
            image = Image.fromarray(np.full((64, 64, 3), 40 * c, np.uint8))
            image.save(root / "JPEGImages" / f"{image_id}.jpg")
            Image.fromarray(label).save(root / "SegmentationClassAug" / f"{image_id}.png")
            if k >= per_class:
                val.append(image_id)
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(val) + "\n")


def test_a_new_dataset_is_one_module_and_one_registry_line(tmp_path, monkeypatch, prefect_server):
    """The example of docs/design.md, run: its module registered, a VOC folder of its classes is
    indexed by prepare and split into its folds, and the priors stage's prompt names are its own."""
    from stages import prepare, split

    module: dict = {}
    exec(compile(docs_example(), "docs/design.md", "exec"), module)
    spec: DatasetSpec = module["SPEC"]
    monkeypatch.setitem(registry.DATASETS, spec.name, spec)  # the one registry line
    write_voc(tmp_path / "toy", spec.class_names)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"dataset": {"name": spec.name, "root": str(tmp_path / "toy")},
                                      "split": {"num_folds": 2, "min_pixels": 100}}))
    assert prepare.main(["--params", str(params), "--synthetic", str(tmp_path / "synthetic"),
                         "--index", str(tmp_path / "index")]) == 0
    meta = json.loads((tmp_path / "index" / "meta.json").read_text())
    assert meta["dataset"] == spec.name and meta["class_names"] == list(spec.class_names)
    assert meta["images"] == {"train": 3 * len(spec.class_names), "val": 3 * len(spec.class_names)}
    assert split.main(["--params", str(params), "--index", str(tmp_path / "index"),
                       "--out", str(tmp_path / "splits")]) == 0
    folds = json.loads((tmp_path / "splits" / "meta.json").read_text())["folds"]
    half = len(spec.class_names) // 2
    assert [f["novel"] for f in folds] == [list(range(1, half + 1)), list(range(half + 1, 2 * half + 1))]
    assert all(f["pairs"]["test"] == 3 * half for f in folds)
    assert meta["prompt_names"] == list(spec.prompt_names)  # what priors and lfss-segment prompt
