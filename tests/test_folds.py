import pandas as pd
import pytest

from pipeline.core.errors import PipelineError
from pipeline.datasets import folds
from pipeline.datasets.registry import dataset_spec


def test_pascal_5i_contiguous_folds():
    assert folds.fold_classes(20, 4, "contiguous") == [
        [1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12, 13, 14, 15], [16, 17, 18, 19, 20]]


def test_coco_20i_interleaved_and_contiguous_folds():
    interleaved = folds.fold_classes(80, 4, "interleaved")
    assert interleaved[1] == [4 * k + 2 for k in range(20)]
    assert sorted(c for f in interleaved for c in f) == list(range(1, 81))
    assert folds.fold_classes(80, 4, "contiguous")[2] == list(range(41, 61))
    assert dataset_spec("coco").fold_convention == "interleaved"
    assert dataset_spec("pascal").fold_convention == dataset_spec("synthetic").fold_convention == "contiguous"


def test_uneven_folds_and_custom_fold_names():
    with pytest.raises(PipelineError, match="split.num_folds = 3: 20 classes"):
        folds.fold_classes(20, 3, "contiguous")
    assert folds.custom_fold_classes([["b", "a"], ["c"]], ["a", "b", "c"], "x") == [[1, 2], [3]]
    with pytest.raises(PipelineError, match="unknown class name 'dog' for dataset 'synthetic'"):
        folds.custom_fold_classes([["dog"]], ["circle"], "synthetic")
    with pytest.raises(PipelineError, match="more than one fold"):
        folds.custom_fold_classes([["a"], ["a"]], ["a"], "x")


def test_min_pixels_auto():
    relative = {name: dataset_spec(name).relative_min_pixels for name in ("pascal", "coco", "synthetic")}
    assert folds.resolve_min_pixels("auto", relative["pascal"], 128 * 128) == 2048
    assert folds.resolve_min_pixels("auto", relative["coco"], 640 * 480) == 2048
    assert folds.resolve_min_pixels("auto", relative["synthetic"], 128 * 128) == 179  # 2048 * 16384 / 187500
    assert folds.resolve_min_pixels(100, relative["synthetic"], 1) == 100


INDEX = pd.DataFrame({
    "image_id": ["t1", "t2", "t3", "v1", "v2"],
    "split": ["train", "train", "train", "val", "val"],
    "class_ids": [[1, 3], [2], [3], [1, 2], [3]],
    "class_pixels": [[500, 5], [500], [10], [500, 500], [500]],
})


def pairs_of(pairs, role):
    return list(pairs[pairs.role == role][["image_id", "class_id"]].itertuples(index=False, name=None))


def test_roles_min_pixels_and_drop_vs_mask():
    # fold with novel class 3: t1 holds 5 px of class 3, t3 only class 3 below min_pixels.
    drop = folds.fold_pairs(INDEX, 0, [3], 3, min_pixels=100, novel_in_train="drop")
    assert pairs_of(drop, "train") == [("t2", 2)]  # t1 dropped: it has novel pixels
    assert pairs_of(drop, "val") == [("v1", 1), ("v1", 2)]
    assert pairs_of(drop, "test") == [("v2", 3)]
    mask = folds.fold_pairs(INDEX, 0, [3], 3, min_pixels=100, novel_in_train="mask")
    assert pairs_of(mask, "train") == [("t1", 1), ("t2", 2)]
    assert set(drop.fold) == {0} and list(drop.columns) == folds.PAIR_COLUMNS
    small = folds.fold_pairs(INDEX, 0, [1], 3, min_pixels=8, novel_in_train="mask")
    assert ("t3", 3) in pairs_of(small, "train")
