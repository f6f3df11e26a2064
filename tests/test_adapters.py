import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.core.errors import PipelineError
from pipeline.datasets import coco, voc
from pipeline.datasets.index import read_index, read_label, write_index
from pipeline.datasets.shapes import SHAPE_NAMES
from tests.conftest import SMOKE, make_voc


def test_voc_index_rows_count_pixels_per_class(benchmark_root, tmp_path):
    layout = voc.open_voc(benchmark_root / "VOC2012")
    lists = layout.image_lists()
    assert [len(lists["train"]), len(lists["val"])] == [SMOKE.train_images, SMOKE.val_images]
    rows = voc.voc_rows(layout, "val", lists["val"][:10], 20)
    write_index(rows, tmp_path / "index.parquet")
    table = read_index(tmp_path / "index.parquet")
    for row in table.itertuples():
        label = read_label(Path(row.mask_path))
        counts = np.bincount(label.ravel(), minlength=256)
        assert list(row.class_ids) == [c for c in range(1, 21) if counts[c]]
        assert list(row.class_pixels) == [int(counts[c]) for c in row.class_ids]
        assert row.ignore_pixels == counts[255] and (row.height, row.width) == label.shape


def test_voc_train_list_is_derived_when_train_aug_is_absent(tmp_path):
    root = make_voc(tmp_path / "VOC2012", ["a", "b", "c"], ["d"])
    (root / "SegmentationClassAug" / "orphan.png").write_bytes(
        (root / "SegmentationClassAug" / "a.png").read_bytes())  # a mask without an image
    assert voc.open_voc(root).image_lists() == {"train": ["a", "b", "c"], "val": ["d"]}


def test_coco_adapter_gives_the_same_masks_as_the_voc_layout(benchmark_root):
    for split in ("train", "val"):
        data = coco.open_coco(benchmark_root / "COCO", split, expected_names=None)
        assert data.class_names == SHAPE_NAMES
        assert sorted(data.class_of_category.values()) == list(range(1, 21))
        assert max(data.class_of_category) > 20  # ids were non-contiguous
        for record in data.records:
            # the writer draws VOC's void band as one crowd region: crowd as ignore gives VOC's 255s
            label = coco.render_label(record, data.class_of_category, data.annotation_path, "ignore")
            stem = Path(record.info["file_name"]).stem
            expected = read_label(benchmark_root / "VOC2012/SegmentationClassAug" / f"{stem}.png")
            assert np.array_equal(label, expected), stem


def test_coco_rows_write_masks_and_record_final_paths(benchmark_root, tmp_path):
    data = coco.open_coco(benchmark_root / "COCO", "val", expected_names=None)
    rows = coco.coco_rows(data.shard(0, 3), tmp_path / "staging", tmp_path / "final", 20)
    assert [Path(r.mask_path).parent for r in rows] == [tmp_path / "final"] * 3
    assert all((tmp_path / "staging" / Path(r.mask_path).name).exists() for r in rows)


def test_coco_polygon_and_crowd_conventions(tmp_path):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "val2014").mkdir()
    Image.new("RGB", (10, 8)).save(root / "val2014" / "x.jpg")
    square = [[1, 1, 6, 1, 6, 6, 1, 6]]
    data = {"images": [{"id": 5, "file_name": "x.jpg", "height": 8, "width": 10}],
            "categories": [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}],
            "annotations": [
                {"id": 1, "image_id": 5, "category_id": 90, "iscrowd": 0, "segmentation": square},
                {"id": 2, "image_id": 5, "category_id": 1, "iscrowd": 1,
                 "segmentation": {"size": [8, 10], "counts": [0, 2, 78]}}]}
    (root / "annotations/instances_val2014.json").write_text(json.dumps(data))
    split = coco.open_coco(root, "val", expected_names=None)
    assert split.class_of_category == {1: 1, 90: 2}  # sorted category id order
    label = coco.render_label(split.records[0], split.class_of_category, split.annotation_path, "ignore")
    assert (label == 2).sum() > 0 and (label[:2, 0] == 255).all()  # crowd painted last as 255
    with pytest.raises(PipelineError, match="unknown class name 'toothbrush'"):
        coco.open_coco(root, "val", expected_names=("person", "bicycle"))


def test_coco_crowd_is_background_by_default_or_ignored(tmp_path):
    """dataset.coco_crowd: a crowd region over an instance. background (HSNet's loader, no ignore label):
    the crowd annotation is not painted, its pixels keep the instance's class (0 elsewhere); ignore:
    its pixels are 255. The crowd RLE is column-major: 27 pixels off, 2 on -> rows 3-4 of column 3."""
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "val2014").mkdir()
    Image.new("RGB", (10, 8)).save(root / "val2014" / "x.jpg")
    data = {"images": [{"id": 5, "file_name": "x.jpg", "height": 8, "width": 10}],
            "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "bicycle"}],
            "annotations": [
                {"id": 1, "image_id": 5, "category_id": 2, "iscrowd": 0,
                 "segmentation": [[1, 1, 6, 1, 6, 6, 1, 6]]},
                {"id": 2, "image_id": 5, "category_id": 1, "iscrowd": 1,
                 "segmentation": {"size": [8, 10], "counts": [27, 2, 51]}}]}
    (root / "annotations/instances_val2014.json").write_text(json.dumps(data))
    split = coco.open_coco(root, "val", expected_names=None)
    record, mapping, source = split.records[0], split.class_of_category, split.annotation_path
    render = {crowd: coco.render_label(record, mapping, source, crowd) for crowd in ("background", "ignore")}
    assert render["background"][3:5, 3].tolist() == [2, 2] and 255 not in render["background"]
    assert render["ignore"][3:5, 3].tolist() == [255, 255]
    differ = render["background"] != render["ignore"]
    assert differ.sum() == 2 and differ[3:5, 3].all()
    assert coco.render_label(record, mapping, source).tolist() == render["background"].tolist()  # default


def test_prepare_passes_coco_crowd_to_the_coco_adapter(tmp_path):
    from pipeline.core.params import DatasetParams
    from pipeline.datasets.adapters import open_dataset
    from pipeline.datasets.registry import dataset_spec

    root, spec = tmp_path / "coco", dataset_spec("coco")
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        (root / f"{split}2014").mkdir()
        (root / f"annotations/instances_{split}2014.json").write_text(json.dumps(
            {"images": [], "annotations": [],
             "categories": [{"id": k + 1, "name": n} for k, n in enumerate(spec.class_names)]}))
    assert open_dataset(spec, root).crowd_as == "background"
    assert open_dataset(spec, root, DatasetParams(name="coco", coco_crowd="ignore")).crowd_as == "ignore"


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_missing_root_and_wrong_layouts(tmp_path):
    with pytest.raises(PipelineError) as err:
        voc.open_voc(tmp_path / "nowhere")
    assert "no such directory" in one_line(err)
    (tmp_path / "JPEGImages").mkdir()
    with pytest.raises(PipelineError) as err:
        voc.open_voc(tmp_path)
    assert "missing SegmentationClassAug" in one_line(err)
    with pytest.raises(PipelineError) as err:
        coco.open_coco(tmp_path, "train", expected_names=None)
    assert "missing annotations/instances_train2014.json" in one_line(err)


def test_unreadable_image_names_the_file(tmp_path):
    root = make_voc(tmp_path / "VOC2012", ["a"], ["b"])
    (root / "JPEGImages" / "b.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(PipelineError) as err:
        voc.voc_rows(voc.open_voc(root), "val", ["b"], 20)
    assert "b.jpg: unreadable image" in one_line(err)
    (root / "JPEGImages" / "b.jpg").unlink()
    with pytest.raises(PipelineError, match="b.jpg: unreadable image"):
        voc.voc_rows(voc.open_voc(root), "val", ["b"], 20)


def test_broken_images_fail_in_prepare_or_are_skipped_and_listed(tmp_path):
    """A truncated JPEG (its header reads fine), a zero-byte one and a truncated mask each stop
    the index with one line naming the file; with a ``skipped`` list they are left out instead."""
    ids = ["a", "b", "c", "d"]
    size = (96, 128)
    root = make_voc(tmp_path / "VOC2012", ids[:2], ids[2:], size=size)
    jpeg = (root / "JPEGImages" / "b.jpg").read_bytes()
    (root / "JPEGImages" / "b.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    assert Image.open(root / "JPEGImages" / "b.jpg").size == size[::-1]  # the header alone passes
    (root / "JPEGImages" / "c.jpg").write_bytes(b"")
    png = (root / "SegmentationClassAug" / "d.png").read_bytes()
    (root / "SegmentationClassAug" / "d.png").write_bytes(png[: len(png) // 2])
    layout = voc.open_voc(root)
    for image_id, culprit in (("b", "b.jpg: unreadable image (image file is truncated"),
                              ("c", "c.jpg: unreadable image"), ("d", "d.png: unreadable mask")):
        with pytest.raises(PipelineError) as err:
            voc.voc_rows(layout, "val", [image_id], 20)
        assert culprit in one_line(err), one_line(err)
    skipped: list[str] = []
    rows = voc.voc_rows(layout, "val", ids, 20, skipped=skipped)
    assert [r.image_id for r in rows] == ["a"]
    assert [s.split(":")[0].rsplit("/", 1)[1] for s in skipped] == ["b.jpg", "c.jpg", "d.png"]


def test_mask_size_mismatch_and_bad_labels_name_the_mask(tmp_path):
    root = make_voc(tmp_path / "VOC2012", ["a"], ["b"])
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / "SegmentationClassAug" / "b.png")
    with pytest.raises(PipelineError) as err:
        voc.voc_rows(voc.open_voc(root), "val", ["b"], 20)
    assert "b.png: mask is 5x5 but its image" in one_line(err)
    Image.fromarray(np.full((24, 32), 37, np.uint8)).save(root / "SegmentationClassAug" / "b.png")
    with pytest.raises(PipelineError, match="b.png: label 37 outside 0..20 and 255"):
        voc.voc_rows(voc.open_voc(root), "val", ["b"], 20)
    (root / "SegmentationClassAug" / "b.png").write_bytes(b"garbage")
    with pytest.raises(PipelineError, match="b.png: unreadable mask"):
        voc.voc_rows(voc.open_voc(root), "val", ["b"], 20)


def test_train_and_val_lists_must_not_overlap(tmp_path):
    root = make_voc(tmp_path / "VOC2012", ["a", "b"], ["b"])
    (root / "ImageSets/SegmentationAug").mkdir(parents=True)
    (root / "ImageSets/SegmentationAug/train_aug.txt").write_text("a\nb\n")
    with pytest.raises(PipelineError, match="also in"):
        voc.open_voc(root).image_lists()
    shutil.rmtree(root / "ImageSets/SegmentationAug")
