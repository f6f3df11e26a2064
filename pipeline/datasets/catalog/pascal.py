"""PASCAL VOC2012 with SBD masks: the data of PASCAL-5i (fold i tests classes 5i+1..5i+5)."""

from pipeline.datasets.spec import DatasetSpec

SPEC = DatasetSpec(
    name="pascal",
    class_names=(
        "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
        "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
        "train", "tvmonitor",
    ),
    prompt_names=(
        "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
        "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa",
        "train", "tv monitor",
    ),
    fold_convention="contiguous",
    adapter="voc",
)
