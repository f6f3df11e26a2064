"""The reference implementations' conventions (docs/method.md#reference-conventions): each variant's
value on an input where the variants differ, worked out by hand here."""

from __future__ import annotations

from pipeline.core.params import parse_params
from pipeline.fewshot.protocol import conventions, protocol_name, protocol_record


def test_the_protocol_is_named_from_the_evaluation_conventions():
    defaults = parse_params({})
    assert protocol_record(defaults) == {"name": "custom", "conventions": {
        "episodes.protocol": "pfenet", "evaluate.resize": "original", "evaluate.absent_class": "zero",
        "split.novel_in_train": "drop", "priors.cam_scale": "pi-clip", "priors.box": "pi-clip"}}
    hsnet = parse_params({"episodes": {"protocol": "hsnet"}, "evaluate": {"resize": "hsnet"}})
    assert protocol_name(conventions(hsnet)) == "hsnet"
    pfenet = parse_params({"evaluate": {"resize": "pfenet"}})
    assert protocol_name(conventions(pfenet)) == "pfenet"
    skipping = parse_params({"evaluate": {"resize": "pfenet", "absent_class": "skip"}})
    assert protocol_name(conventions(skipping)) == "custom"  # PFENet's code counts an absent class 0
    coco = parse_params({"dataset": {"name": "coco", "root": "/x"}})
    assert conventions(coco)["dataset.coco_crowd"] == "background"
