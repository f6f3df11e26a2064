"""The 20 shape classes of the synthetic benchmark, as polygon programs in unit coordinates.

A shape is a list of ``(polygon, fill)`` strokes in the square [-1, 1]^2 (y pointing down):
strokes are painted in order with ``fill`` 1 (add) or 0 (cut out), which gives holes (ring,
frame) and bites (crescent) without a general polygon-boolean library.
"""

from __future__ import annotations

from functools import cache

import numpy as np
from PIL import Image, ImageDraw

Stroke = tuple[np.ndarray, int]  # (V, 2) vertices, fill value


def _regular(n: int, radius: float = 1.0, phase: float = -np.pi / 2) -> np.ndarray:
    t = phase + 2 * np.pi * np.arange(n) / n
    return radius * np.stack([np.cos(t), np.sin(t)], axis=1)


def _polar(r_of_t, n: int = 96) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = r_of_t(t)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _poly(*points: tuple[float, float]) -> np.ndarray:
    return np.asarray(points, dtype=np.float64)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y + 2.5], axis=1)
    return pts / np.abs(pts).max()


def _teardrop() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
    return np.stack([0.8 * np.sin(t) * np.sin(t / 2), -np.cos(t)], axis=1)


def _star() -> np.ndarray:
    outer, inner = _regular(5, 1.0), _regular(5, 0.4, phase=-np.pi / 2 + np.pi / 5)
    return np.stack([outer, inner], axis=1).reshape(-1, 2)


#: Class names in class-id order (id = position + 1). Folds of 5 (PASCAL-5i scheme) mix
#: curved, angular and holed shapes so that every fold is a fair test.
SHAPES: dict[str, list[Stroke]] = {
    # fold 0
    "circle": [(_regular(64), 1)],
    "square": [(_regular(4, 1.0, phase=np.pi / 4), 1)],
    "triangle": [(_regular(3, 1.0), 1)],
    "star": [(_star(), 1)],
    "heart": [(_heart(), 1)],
    # fold 1
    "ring": [(_regular(64), 1), (_regular(64, 0.55), 0)],
    "cross": [(_poly((-.3, -1), (.3, -1), (.3, -.3), (1, -.3), (1, .3), (.3, .3), (.3, 1),
                     (-.3, 1), (-.3, .3), (-1, .3), (-1, -.3), (-.3, -.3)), 1)],
    "crescent": [(_regular(64), 1), (_regular(64, 0.85) + [0.45, -0.1], 0)],
    "hexagon": [(_regular(6, 1.0, phase=0), 1)],
    "pentagon": [(_regular(5, 1.0), 1)],
    # fold 2
    "diamond": [(_poly((0, -1), (.6, 0), (0, 1), (-.6, 0)), 1)],
    "arrow": [(_poly((-1, -.25), (.2, -.25), (.2, -.7), (1, 0), (.2, .7), (.2, .25), (-1, .25)), 1)],
    "ellipse": [(_regular(64) * [1.0, 0.5], 1)],
    "trapezoid": [(_poly((-1, .6), (1, .6), (.45, -.6), (-.45, -.6)), 1)],
    "semicircle": [(np.concatenate([_polar(lambda t: np.ones_like(t), 64)[:33]]) + [0, -.5], 1)],
    # fold 3
    "flower": [(_polar(lambda t: 0.55 + 0.45 * np.abs(np.cos(3 * t))), 1)],
    "hourglass": [(_poly((-.75, -1), (.75, -1), (.12, 0), (.75, 1), (-.75, 1), (-.12, 0)), 1)],
    "chevron": [(_poly((-1, .2), (0, -.8), (1, .2), (1, .75), (0, -.25), (-1, .75)), 1)],
    "teardrop": [(_teardrop(), 1)],
    "frame": [(_regular(4, 1.0, phase=np.pi / 4), 1), (_regular(4, 0.62, phase=np.pi / 4), 0)],
}

SHAPE_NAMES: tuple[str, ...] = tuple(SHAPES)
assert len(SHAPE_NAMES) == 20


def rasterize(
    name: str, size: tuple[int, int], center: tuple[float, float], radius: float, angle: float
) -> np.ndarray:
    """Binary mask of one shape.

    Args:
        name: a key of :data:`SHAPES`.
        size: canvas ``(H, W)``.
        center: ``(x, y)`` in pixels; radius: half-extent in pixels; angle: radians.

    Returns:
        ``(H, W)`` bool mask.
    """
    h, w = size
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    canvas = Image.new("1", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for vertices, fill in _strokes(name):
        pts = vertices @ rot.T * radius + np.asarray(center)
        draw.polygon([tuple(p) for p in pts.tolist()], fill=fill)
    return np.asarray(canvas, dtype=bool)


@cache
def _strokes(name: str) -> list[Stroke]:
    try:
        return SHAPES[name]
    except KeyError:
        raise KeyError(f"unknown shape {name!r}; known: {', '.join(SHAPE_NAMES)}") from None
