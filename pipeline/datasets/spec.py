"""What every stage may know of a dataset without reading its files: the interface each dataset
module of :mod:`pipeline.datasets.catalog` declares (docs/design.md#adding-a-dataset).

Reading the files is the adapter's business (:mod:`pipeline.datasets.adapters`, used by
``prepare`` alone), so an edit to a file-format reader never touches the stages that only need a
dataset's names — ``clip_model``, ``priors`` and the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: contiguous: fold i tests classes ``i*C/F + 1 .. (i+1)*C/F`` (PASCAL-5i); interleaved: fold i
#: tests ``{F*k + i + 1}`` (COCO-20i)
Convention = Literal["contiguous", "interleaved"]


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: its classes, how prompts say them, its fold convention and its file format.

    Attributes:
        name: the value of ``dataset.name``.
        class_names: class id ``i + 1`` at position ``i``, as the dataset's own files name them.
        prompt_names: the same classes as CLIP prompts say them (VOC's files run words together).
        fold_convention: what ``split.fold_convention: default`` means for this dataset.
        adapter: the file format ``prepare`` reads (a key of ``pipeline.datasets.adapters.ADAPTERS``).
        layout_dir: where that layout lies under the dataset's root ("" for the root itself).
        generated: ``prepare`` generates the dataset (at ``data/synthetic``) instead of reading a
            ``dataset.root``.
        relative_min_pixels: ``split.min_pixels: auto`` is the fraction of an image that 2048 px is
            of a 500x375 VOC image, not 2048 px (for images far smaller than VOC's).
    """

    name: str
    class_names: tuple[str, ...]
    prompt_names: tuple[str, ...]
    fold_convention: Convention
    adapter: str
    layout_dir: str = ""
    generated: bool = False
    relative_min_pixels: bool = False

    def __post_init__(self) -> None:
        if len(self.prompt_names) != len(self.class_names):
            raise ValueError(f"dataset {self.name!r}: {len(self.class_names)} class names but "
                             f"{len(self.prompt_names)} prompt names")
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"dataset {self.name!r}: class names repeat")
