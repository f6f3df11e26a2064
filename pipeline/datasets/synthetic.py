"""Scenes of the embedded synthetic benchmark: shapes on cluttered backgrounds
(docs/design.md#the-embedded-synthetic-benchmark).

Every image draws from its own generator seeded by ``(seed, split, index)``, so any shard can
be rendered alone, in any order, on any worker, and the bytes never change.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from pipeline.datasets.shapes import SHAPE_NAMES, rasterize

IGNORE = 255
SPLITS = ("train", "val", "captions", "heldout")  # heldout: CLIP zero-shot evaluation

#: Named colours (the words the captions use) and their RGB centres.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 35, 35),
    "green": (40, 160, 60),
    "blue": (40, 70, 210),
    "yellow": (235, 215, 40),
    "orange": (240, 135, 25),
    "purple": (130, 50, 170),
    "pink": (240, 130, 185),
    "cyan": (40, 195, 215),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
    "brown": (125, 80, 35),
}
TEXTURES = ("solid", "stripes", "checker", "dots", "gradient")

MIN_VISIBLE = 0.5  # every object keeps at least half of its area visible after occlusion
RADIUS_RANGE = (0.10, 0.28)  # object half-extent, as a fraction of the image side


@dataclass(frozen=True)
class SceneObject:
    class_id: int  # 1..20
    colour: str
    texture: str
    center: tuple[float, float]  # (x, y) pixels
    radius: float
    angle: float

    @property
    def name(self) -> str:
        return SHAPE_NAMES[self.class_id - 1]


@dataclass(frozen=True)
class Scene:
    """One rendered image.

    Attributes:
        image: ``(H, W, 3)`` uint8.
        instances: ``(H, W)`` uint8, 0 background, ``j + 1`` where object ``j`` is visible.
        band: ``(H, W)`` bool, the VOC-style ignore band along label boundaries.
        objects: the objects in drawing order (later ones occlude earlier ones).
    """

    image: np.ndarray
    instances: np.ndarray
    band: np.ndarray
    objects: tuple[SceneObject, ...]

    @property
    def label(self) -> np.ndarray:
        """``(H, W)`` uint8 VOC label map: 0 background, class ids, 255 on the band."""
        lut = np.array([0] + [o.class_id for o in self.objects], dtype=np.uint8)
        label = lut[self.instances]
        label[self.band] = IGNORE
        return label

    @property
    def caption(self) -> str:
        """E.g. ``"a photo of a red star and an orange ring."``"""
        return caption([o.name for o in self.objects], [o.colour for o in self.objects])


def caption(names: list[str], colours: list[str] | None = None) -> str:
    """``"a photo of a red star and an orange ring."``; without colours ``"a photo of a star and
    a ring."``"""
    words = [f"{c} {n}" for c, n in zip(colours, names, strict=True)] if colours else names
    phrases = [f"{_article(w)} {w}" for w in words]
    body = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"a photo of {body}."


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def mixed_shape(seed: int, split: str, index: int, size: int) -> tuple[int, int]:
    """``(H, W)`` of image ``index`` in a mixed-size benchmark: area scale 0.75-1.25 of
    ``size²`` and aspect 3:4 to 4:3, from a stream of its own (the scene itself is unchanged)."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index, 1])
    side, aspect = size * float(np.sqrt(rng.uniform(0.75, 1.25))), float(np.exp(rng.uniform(-0.29, 0.29)))
    return round(side / np.sqrt(aspect)), round(side * np.sqrt(aspect))


def resized(scene: Scene, shape: tuple[int, int]) -> Scene:
    """``scene`` at ``(H, W)``: the image bicubic, instances and ignore band nearest."""
    h, w = shape
    image = np.asarray(Image.fromarray(scene.image).resize((w, h), Image.BICUBIC))
    instances = np.asarray(Image.fromarray(scene.instances).resize((w, h), Image.NEAREST))
    band = np.asarray(Image.fromarray(scene.band).resize((w, h), Image.NEAREST))
    return Scene(image, instances, band, scene.objects)


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of image ``index`` of ``split``: independent of every other image."""
    return np.random.default_rng([seed, SPLITS.index(split), index])


def render_scene(
    rng: np.random.Generator, size: int, max_objects: int, boundary_width: int, parts: bool = False
) -> Scene:
    """Draw 1..max_objects shapes with colour, texture, size, rotation and occlusion.

    ``parts``: every object in two parts, as real objects have (a person's face and clothes): the
    half beyond the shape's own axis gets a second colour and its class's part texture
    (:func:`part_of`). Off, the generator draws exactly what it drew before the option existed.
    """
    image = _background(rng, size)
    instances = np.zeros((size, size), np.uint8)
    full_areas: list[int] = []
    objects: list[SceneObject] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        placed = _place(rng, size, instances, full_areas)
        if placed is None:
            continue
        obj, mask = placed
        objects.append(obj)
        full_areas.append(int(mask.sum()))
        instances[mask] = len(objects)
        image[mask] = _paint(rng, obj, size)[mask]
        if parts:
            part, second = part_of(rng, obj, size)
            image[mask & part] = _paint(rng, second, size)[mask & part]
    if not objects:  # practically unreachable: an empty canvas always takes one object
        return render_scene(rng, size, max_objects, boundary_width, parts)
    lut = np.array([0] + [o.class_id for o in objects], dtype=np.uint8)
    return Scene(image, instances, _boundary_band(lut[instances], boundary_width), tuple(objects))


def _place(
    rng: np.random.Generator, size: int, instances: np.ndarray, full_areas: list[int], tries: int = 30
) -> tuple[SceneObject, np.ndarray] | None:
    """Sample an object that leaves every earlier object at least MIN_VISIBLE visible."""
    for _ in range(tries):
        radius = float(rng.uniform(*RADIUS_RANGE)) * size
        lo, hi = 0.6 * radius, size - 0.6 * radius
        obj = SceneObject(
            class_id=int(rng.integers(1, len(SHAPE_NAMES) + 1)),
            colour=str(rng.choice(list(COLOURS))),
            texture=str(rng.choice(TEXTURES)),
            center=(float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))),
            radius=radius,
            angle=float(rng.uniform(0, 2 * np.pi)),
        )
        mask = rasterize(obj.name, (size, size), obj.center, obj.radius, obj.angle)
        if not mask.any():
            continue
        kept = np.bincount(instances[~mask], minlength=len(full_areas) + 1)[1:]
        if all(kept[j] >= MIN_VISIBLE * full_areas[j] for j in range(len(full_areas))):
            return obj, mask
    return None


def part_of(rng: np.random.Generator, obj: SceneObject, size: int) -> tuple[np.ndarray, SceneObject]:
    """An object's second part: ``(H, W)`` bool, the half-plane beyond the line through its centre
    along its own axis (so the part sits at the same place of the shape in every image), and the
    object as that part is painted: another colour (drawn) and the texture of its class."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    side = (xx - obj.center[0]) * np.cos(obj.angle) + (yy - obj.center[1]) * np.sin(obj.angle) > 0
    colour = str(rng.choice([c for c in COLOURS if c != obj.colour]))
    return side, replace(obj, colour=colour, texture=TEXTURES[obj.class_id % len(TEXTURES)])


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random colour field with noise and clutter strokes (lines and arcs)."""
    coarse = rng.uniform(30, 225, (4, 4, 3)).astype(np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), np.float32)
    field += rng.normal(0, 6, field.shape)
    canvas = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(3, 10))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        width = int(rng.integers(1, 4))
        x0, y0, x1, y1 = (float(v) for v in rng.uniform(-0.1, 1.1, 4) * size)
        if rng.random() < 0.6:
            draw.line((x0, y0, x1, y1), fill=colour, width=width)
        else:
            box = (min(x0, x1), min(y0, y1), max(x0, x1) + 4, max(y0, y1) + 4)
            start = float(rng.uniform(0, 360))
            draw.arc(box, start, start + float(rng.uniform(40, 200)), fill=colour, width=width)
    return np.array(canvas)


def _paint(rng: np.random.Generator, obj: SceneObject, size: int) -> np.ndarray:
    """``(H, W, 3)`` uint8 fill of the object's colour with its texture (valid everywhere)."""
    base = np.asarray(COLOURS[obj.colour], np.float32) + rng.normal(0, 10, 3)
    shade = base * rng.uniform(0.55, 0.8)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if obj.texture == "solid":
        weight = np.ones((size, size), np.float32)
    elif obj.texture == "stripes":
        theta, period = rng.uniform(0, np.pi), rng.uniform(4, 8)
        weight = ((xx * np.cos(theta) + yy * np.sin(theta)) // (period / 2) % 2).astype(np.float32)
    elif obj.texture == "checker":
        cell = int(rng.integers(3, 7))
        weight = ((xx // cell + yy // cell) % 2).astype(np.float32)
    elif obj.texture == "dots":
        step = int(rng.integers(5, 9))
        weight = 1.0 - (((xx % step) - step / 2) ** 2 + ((yy % step) - step / 2) ** 2 < (step / 4) ** 2)
    else:  # gradient along a random direction across the object
        theta = rng.uniform(0, 2 * np.pi)
        along = (xx - obj.center[0]) * np.cos(theta) + (yy - obj.center[1]) * np.sin(theta)
        weight = np.clip(0.5 + along / (2 * obj.radius), 0, 1)
    weight = np.asarray(weight, np.float32)[..., None]
    fill = weight * base + (1 - weight) * shade + rng.normal(0, 4, (size, size, 3))
    return np.clip(fill, 0, 255).astype(np.uint8)


def _boundary_band(label: np.ndarray, width: int) -> np.ndarray:
    """``(H, W)`` bool: pixels within ``width`` of a change of label (VOC's void band)."""
    if width == 0:
        return np.zeros(label.shape, bool)
    footprint = np.ones((2 * width + 1, 2 * width + 1), bool)
    return ndimage.maximum_filter(label, footprint=footprint) != ndimage.minimum_filter(
        label, footprint=footprint
    )
