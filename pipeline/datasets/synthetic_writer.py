"""Writes the synthetic benchmark in the layouts the real adapters read.

Under ``root``::

    VOC2012/JPEGImages/{id}.jpg                     VOC layout (read by the PASCAL adapter)
    VOC2012/SegmentationClassAug/{id}.png           palette PNG: 0 bg, 1..20, 255 band
    VOC2012/ImageSets/Segmentation/val.txt
    VOC2012/ImageSets/SegmentationAug/train_aug.txt
    COCO/{train,val}2014/{id}.jpg                   hard links to the same JPEGs
    COCO/annotations/instances_{train,val}2014.json the same samples as COCO instances
    meta.json                                       generator params, class names, counts

COCO has no void band: each image's band is one ``iscrowd=1`` region (crowd → 255 in the
adapter), so both adapters give identical label maps. COCO category ids are deliberately
non-contiguous (``3k + 2``) to exercise the adapter's mapping to 1..C.

The tiny CLIP's image-caption corpus (``captions/part-*.parquet``, :func:`write_caption_shard`) is
rendered where it is trained (the ``clip_model`` stage), never by default: a shipped tiny CLIP
does not need it.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.core.params import SyntheticParams
from pipeline.datasets.shapes import SHAPE_NAMES
from pipeline.datasets.synthetic import IGNORE, Scene, mixed_shape, render_scene, resized, scene_rng

JPEG_QUALITY = 95
VOC_DIR, COCO_DIR, CAPTIONS_DIR = "VOC2012", "COCO", "captions"


def coco_category_id(class_id: int) -> int:
    return 3 * (class_id - 1) + 2


def image_id(split: str, index: int) -> str:
    return f"{split}_{index:06d}"


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (bit-interleaved class index), 255 → white-ish."""
    palette = []
    for label in range(256):
        r = g = b = 0
        c = label
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette += [r, g, b]
    palette[3 * IGNORE : 3 * IGNORE + 3] = [224, 224, 192]
    return palette


def _encode(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _label_png(label: np.ndarray) -> bytes:
    png = Image.fromarray(label, mode="P")
    png.putpalette(voc_palette())
    return _encode(png, "PNG", optimize=False)


def _render(split: str, index: int, cfg: SyntheticParams) -> Scene:
    benchmark = split in ("train", "val")  # the caption corpus stays as it is: the same tiny CLIP
    scene = render_scene(scene_rng(cfg.seed, split, index), cfg.image_size, cfg.max_objects,
                         cfg.boundary_width, parts=cfg.parts and benchmark)
    if cfg.mixed_sizes and benchmark:
        scene = resized(scene, mixed_shape(cfg.seed, split, index, cfg.image_size))
    return scene


def _rle(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def coco_annotations(scene: Scene, img_id: int, first_ann_id: int) -> list[dict[str, Any]]:
    """Visible, band-free object masks (``iscrowd=0``) plus the band as one crowd region."""
    anns = []
    for j, obj in enumerate(scene.objects):
        visible = (scene.instances == j + 1) & ~scene.band
        if visible.any():
            anns.append({"category_id": coco_category_id(obj.class_id), "iscrowd": 0,
                         "segmentation": _rle(visible)})
    if scene.band.any():
        anns.append({"category_id": coco_category_id(scene.objects[0].class_id), "iscrowd": 1,
                     "segmentation": _rle(scene.band)})
    for k, ann in enumerate(anns):
        rle = {"size": ann["segmentation"]["size"], "counts": ann["segmentation"]["counts"].encode()}
        ann.update(id=first_ann_id + k, image_id=img_id, area=float(mask_utils.area(rle)),
                   bbox=[float(v) for v in mask_utils.toBbox(rle)])
    return anns


def write_benchmark_shard(root: Path, split: str, indices: range, cfg: SyntheticParams) -> None:
    """Render images ``indices`` of ``split`` (train|val) into both layouts.

    The shard's COCO records go to ``root/_shards/{split}-{start}.json`` until
    :func:`finalize` merges them.
    """
    files = benchmark_shard_files(root, split, indices)
    for path in files[-1:] + files[:3]:
        path.parent.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for k, index in enumerate(indices):
        scene, name = _render(split, index, cfg), image_id(split, index)
        jpeg, mask, coco_jpeg = files[3 * k: 3 * k + 3]
        Image.fromarray(scene.image).save(jpeg, quality=JPEG_QUALITY)
        mask.write_bytes(_label_png(scene.label))
        _link(jpeg, coco_jpeg)
        img_id = index + 1
        height, width = scene.label.shape
        images.append({"id": img_id, "file_name": f"{name}.jpg", "height": height, "width": width})
        annotations += coco_annotations(scene, img_id, first_ann_id=img_id * 100)
    files[-1].write_text(json.dumps({"images": images, "annotations": annotations}))


def benchmark_shard_files(root: Path, split: str, indices: range) -> list[Path]:
    """The files :func:`write_benchmark_shard` writes: per image its JPEG, label PNG and COCO-layout
    JPEG (a hard link), then the shard's COCO records."""
    files = []
    for index in indices:
        name = image_id(split, index)
        files += [root / VOC_DIR / "JPEGImages" / f"{name}.jpg",
                  root / VOC_DIR / "SegmentationClassAug" / f"{name}.png",
                  root / COCO_DIR / f"{split}2014" / f"{name}.jpg"]
    return [*files, root / "_shards" / f"{split}-{indices.start:06d}.json"]


def _link(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # a filesystem without hard links
        dst.write_bytes(src.read_bytes())


CAPTION_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("image", pa.binary()),        # JPEG
    ("mask", pa.binary()),         # palette PNG, same conventions as the benchmark's masks
    ("caption", pa.string()),
    ("class_ids", pa.list_(pa.int8())),
    ("colours", pa.list_(pa.string())),
])


def write_caption_shard(root: Path, indices: range, cfg: SyntheticParams) -> None:
    """Render caption-corpus images ``indices`` into ``captions/part-{start}.parquet``."""
    rows: dict[str, list[Any]] = {name: [] for name in CAPTION_SCHEMA.names}
    for index in indices:
        scene = _render("captions", index, cfg)
        rows["image_id"].append(image_id("captions", index))
        rows["image"].append(_encode(Image.fromarray(scene.image), "JPEG", quality=JPEG_QUALITY))
        rows["mask"].append(_label_png(scene.label))
        rows["caption"].append(scene.caption)
        rows["class_ids"].append([o.class_id for o in scene.objects])
        rows["colours"].append([o.colour for o in scene.objects])
    (root / CAPTIONS_DIR).mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pydict(rows, schema=CAPTION_SCHEMA)
    pq.write_table(table, caption_shard_file(root, indices))


def caption_shard_file(root: Path, indices: range) -> Path:
    """The file :func:`write_caption_shard` writes."""
    return root / CAPTIONS_DIR / f"part-{indices.start:06d}.parquet"


def finalize(root: Path, cfg: SyntheticParams) -> dict[str, Any]:
    """Merge shard records into the COCO JSONs, write the VOC lists and ``meta.json``."""
    categories = [{"id": coco_category_id(k + 1), "name": name, "supercategory": "shape"}
                  for k, name in enumerate(SHAPE_NAMES)]
    counts = {"train": cfg.train_images, "val": cfg.val_images}
    for split, n in counts.items():
        images, annotations = [], []
        for shard in sorted((root / "_shards").glob(f"{split}-*.json")):
            records = json.loads(shard.read_text())
            images += records["images"]
            annotations += records["annotations"]
        coco = {"info": {"description": "synthetic shapes benchmark"}, "licenses": [],
                "images": images, "annotations": annotations, "categories": categories}
        path = root / COCO_DIR / "annotations" / f"instances_{split}2014.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(coco))
        list_path = root / VOC_DIR / "ImageSets" / (
            "Segmentation/val.txt" if split == "val" else "SegmentationAug/train_aug.txt")
        list_path.parent.mkdir(parents=True, exist_ok=True)
        list_path.write_text("".join(f"{image_id(split, i)}\n" for i in range(n)))
    for shard in (root / "_shards").glob("*.json"):
        shard.unlink()
    (root / "_shards").rmdir()
    meta = {"generator": cfg.model_dump(), "class_names": list(SHAPE_NAMES), "images": counts}
    (root / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta
