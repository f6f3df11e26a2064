"""Ground-truth masks of controlled precision and recall: the oracle of the mask-quality study
(``model.pseudo_masks: truth``, ``model.truth_morph``), which asks how good the masks the model is
given must be."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def disk(radius: int) -> np.ndarray:
    """``(2r+1, 2r+1)`` bool disk."""
    y, x = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    return x * x + y * y <= radius * radius


def truth_mask(label: np.ndarray, class_id: int, morph: int = 0) -> np.ndarray:
    """``(H, W)`` bool: the pixels of ``label`` that are ``class_id``, dilated by a disk of radius
    ``morph`` when it is positive (recall kept, precision lost) or eroded by one of ``-morph`` when
    negative (precision kept, recall lost; the image border does not erode)."""
    mask = np.asarray(label) == class_id
    if morph > 0:
        return ndimage.binary_dilation(mask, disk(morph))
    if morph < 0:
        return ndimage.binary_erosion(mask, disk(-morph), border_value=1)
    return mask
