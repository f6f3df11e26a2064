"""The evaluation protocol a run follows, by name, and every convention that can move its numbers
(docs/method.md#reference-conventions).

:func:`conventions` reads them from the params; :func:`protocol_name` names the protocol they
make: ``hsnet`` or ``pfenet`` when the test episodes, the scoring size and the absent-class rule are
that reference code's, else ``custom``. ``evaluate`` records both in ``fold{k}.json`` and the report
prints them under each table, so a reader checks a number against a paper's in one look.
"""

from __future__ import annotations

from pipeline.core.params import Params

#: what makes each reference code's evaluation: episodes.protocol, evaluate.resize, evaluate.absent_class
REFERENCE_PROTOCOLS: dict[str, dict[str, str]] = {
    "hsnet": {"episodes.protocol": "hsnet", "evaluate.resize": "hsnet", "evaluate.absent_class": "zero"},
    "pfenet": {"episodes.protocol": "pfenet", "evaluate.resize": "pfenet", "evaluate.absent_class": "zero"},
}


def conventions(params: Params) -> dict[str, str]:
    """Every convention of a run whose choice can move a published-style number, as
    ``{"section.key": value}`` (``dataset.coco_crowd`` only for COCO, where it applies)."""
    out = {
        "episodes.protocol": params.episodes.protocol,
        "evaluate.resize": params.evaluate.resize,
        "evaluate.absent_class": params.evaluate.absent_class,
        "split.novel_in_train": params.split.novel_in_train,
        "priors.cam_scale": params.priors.cam_scale,
        "priors.box": params.priors.box,
    }
    if params.dataset.name == "coco":
        out["dataset.coco_crowd"] = params.dataset.coco_crowd
    return out


def protocol_name(values: dict[str, str]) -> str:
    """``hsnet`` / ``pfenet`` when ``values`` (:func:`conventions`) hold that reference's evaluation
    conventions, else ``custom``."""
    for name, wanted in REFERENCE_PROTOCOLS.items():
        if all(values.get(key) == value for key, value in wanted.items()):
            return name
    return "custom"


def protocol_record(params: Params) -> dict:
    """What ``evaluate`` writes under ``protocol`` in ``fold{k}.json``: the name and the conventions."""
    values = conventions(params)
    return {"name": protocol_name(values), "conventions": values}
