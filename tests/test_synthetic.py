import io
from collections import Counter
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.datasets import synthetic_writer
from pipeline.datasets.shapes import SHAPE_NAMES, rasterize
from pipeline.datasets.synthetic import IGNORE, MIN_VISIBLE, part_of, render_scene, scene_rng
from tests.conftest import SMOKE

SCENES = [render_scene(scene_rng(0, "train", i), 96, 4, 1) for i in range(60)]


def test_twenty_distinct_shapes():
    assert len(SHAPE_NAMES) == 20
    masks = [rasterize(n, (48, 48), (24, 24), 20, 0.3) for n in SHAPE_NAMES]
    for i in range(20):
        assert 80 < masks[i].sum() < 48 * 48
        for j in range(i):
            assert (masks[i] != masks[j]).sum() > 40, (SHAPE_NAMES[i], SHAPE_NAMES[j])


def test_scenes_are_deterministic_by_seed_and_differ_across_images():
    again = render_scene(scene_rng(0, "train", 7), 96, 4, 1)
    assert np.array_equal(again.image, SCENES[7].image)
    assert np.array_equal(again.label, SCENES[7].label)
    other_seed = render_scene(scene_rng(1, "train", 7), 96, 4, 1)
    assert not np.array_equal(other_seed.image, SCENES[7].image)
    assert not np.array_equal(SCENES[6].image, SCENES[7].image)


def test_objects_in_parts_get_a_second_colour_beyond_their_axis_and_keep_their_labels():
    for i in range(20):
        plain = render_scene(scene_rng(0, "train", i), 96, 1, 1)
        parted = render_scene(scene_rng(0, "train", i), 96, 1, 1, parts=True)
        # one object: its placement is drawn before its part, so the labels are the same
        assert np.array_equal(plain.label, parted.label) and plain.objects == parted.objects
        (obj,) = parted.objects
        side, second = part_of(np.random.default_rng(0), obj, 96)
        assert second.colour != obj.colour and second.class_id == obj.class_id
        inside = (parted.instances == 1) & ~parted.band
        near, far = inside & ~side, inside & side
        assert np.array_equal(parted.image[near], plain.image[near])  # the first part as before
        if far.sum() > 50:  # the second part is painted anew
            assert np.abs(parted.image[far].astype(int) - plain.image[far]).mean() > 5
    cfg = SMOKE.model_copy(update={"parts": True})  # the tiny CLIP's caption corpus stays as it is
    assert np.array_equal(synthetic_writer._render("captions", 3, cfg).image,
                          render_scene(scene_rng(SMOKE.seed, "captions", 3), SMOKE.image_size,
                                       SMOKE.max_objects, SMOKE.boundary_width).image)
    assert not np.array_equal(synthetic_writer._render("train", 3, cfg).image,
                              synthetic_writer._render("train", 3, SMOKE).image)


def test_one_to_four_objects_and_every_class_occurs():
    counts = Counter(len(s.objects) for s in SCENES)
    assert set(counts) == {1, 2, 3, 4}
    many = [render_scene(scene_rng(0, "val", i), 64, 4, 1) for i in range(200)]
    assert {o.class_id for s in many for o in s.objects} == set(range(1, 21))


def test_label_values_match_the_objects_and_band_separates_labels():
    for scene in SCENES:
        label = scene.label
        assert set(np.unique(label)) <= {0, IGNORE} | {o.class_id for o in scene.objects}
        # VOC-style band: two different labels never touch without 255 in between.
        for a, b in ((label[:, 1:], label[:, :-1]), (label[1:, :], label[:-1, :])):
            touching = (a != b) & (a != IGNORE) & (b != IGNORE)
            assert not touching.any()
        assert (label == IGNORE).mean() < 0.2  # thin


def test_objects_occlude_each_other_but_stay_mostly_visible():
    occluded = 0
    for scene in SCENES:
        for j, obj in enumerate(scene.objects):
            full = rasterize(obj.name, scene.instances.shape, obj.center, obj.radius, obj.angle)
            visible = (scene.instances == j + 1).sum()
            assert visible >= MIN_VISIBLE * full.sum()
            occluded += visible < full.sum()
    assert occluded >= 3  # occlusion really happens


def test_caption_names_colour_and_shape_of_every_object():
    scene = next(s for s in SCENES if len(s.objects) == 3)
    a, b, c = (f"{o.colour} {o.name}" for o in scene.objects)
    assert scene.caption.startswith("a photo of ")
    assert f"{a}, " in scene.caption and f"{b} and " in scene.caption and scene.caption.endswith(f"{c}.")
    orange = replace(scene, objects=(replace(scene.objects[0], colour="orange"),))
    assert orange.caption == f"a photo of an orange {scene.objects[0].name}."


def test_written_benchmark_layouts_and_caption_corpus(benchmark_root):
    """The benchmark through the writer (tests write the caption corpus too: prepare does not)."""
    voc = benchmark_root / "VOC2012"
    val_ids = (voc / "ImageSets/Segmentation/val.txt").read_text().split()
    train_ids = (voc / "ImageSets/SegmentationAug/train_aug.txt").read_text().split()
    assert len(val_ids) == SMOKE.val_images and len(train_ids) == SMOKE.train_images
    mask = np.asarray(Image.open(voc / "SegmentationClassAug" / f"{val_ids[0]}.png"))
    scene = render_scene(scene_rng(SMOKE.seed, "val", 0), SMOKE.image_size, SMOKE.max_objects,
                         SMOKE.boundary_width)
    assert np.array_equal(mask, scene.label)  # masks are lossless
    jpeg = voc / "JPEGImages" / f"{val_ids[0]}.jpg"
    assert (benchmark_root / "COCO/val2014" / jpeg.name).read_bytes() == jpeg.read_bytes()
    corpus = pq.read_table(benchmark_root / "captions").to_pandas()
    assert len(corpus) == SMOKE.caption_images
    row = corpus.iloc[0]
    label = np.asarray(Image.open(io.BytesIO(row["mask"])))
    assert set(np.unique(label)) - {0, IGNORE} <= set(row["class_ids"])
    for cid, colour in zip(row["class_ids"], row["colours"], strict=True):
        assert f"{colour} {SHAPE_NAMES[cid - 1]}" in row["caption"]
    assert not set(corpus["image_id"]) & set(val_ids)  # a separate corpus


def test_written_shard_is_byte_identical_on_rewrite(tmp_path, benchmark_root):
    synthetic_writer.write_benchmark_shard(tmp_path, "val", range(0, 5), SMOKE)
    for name in ("JPEGImages/val_000003.jpg", "SegmentationClassAug/val_000003.png"):
        assert (tmp_path / "VOC2012" / name).read_bytes() == (benchmark_root / "VOC2012" / name).read_bytes()


@pytest.mark.parametrize("width", [0, 2])
def test_boundary_width_param(width):
    scene = render_scene(scene_rng(0, "train", 3), 96, 4, width)
    ignored = (scene.label == IGNORE).sum()
    assert (ignored == 0) if width == 0 else ignored > (SCENES[3].label == IGNORE).sum()


def test_mixed_sizes_give_each_image_its_own_shape_and_keep_the_captions_square(tmp_path):
    import json

    cfg = SMOKE.model_copy(update={"train_images": 6, "val_images": 6, "caption_images": 2,
                                   "mixed_sizes": True})
    synthetic_writer.write_benchmark_shard(tmp_path, "train", range(6), cfg)
    synthetic_writer.write_caption_shard(tmp_path, range(2), cfg)
    voc = tmp_path / synthetic_writer.VOC_DIR
    shapes = set()
    for i in range(6):
        name = synthetic_writer.image_id("train", i)
        image = np.asarray(Image.open(voc / "JPEGImages" / f"{name}.jpg"))
        label = np.asarray(Image.open(voc / "SegmentationClassAug" / f"{name}.png"))
        assert image.shape[:2] == label.shape and 0.7 < label.size / 64**2 < 1.3
        assert set(np.unique(label)) - {0, IGNORE}  # the objects survive the resize
        shapes.add(label.shape)
    assert len(shapes) > 3  # sizes and aspect ratios of their own
    coco = json.loads(next((tmp_path / "_shards").glob("train-*.json")).read_text())
    assert {(r["height"], r["width"]) for r in coco["images"]} == shapes
    captions = pq.read_table(tmp_path / synthetic_writer.CAPTIONS_DIR).to_pandas()
    assert all(Image.open(io.BytesIO(b)).size == (64, 64) for b in captions["image"])
    square = render_scene(scene_rng(0, "train", 0), 64, 4, 1)  # the scene is drawn as without
    plain = cfg.model_copy(update={"mixed_sizes": False})
    assert np.array_equal(synthetic_writer._render("train", 0, plain).image, square.image)
