"""The studies: each a set of rows (params overriding the committed ``params.yaml``) run over
training seeds on every fold, the reference row the others are compared with and the contrasts the
report puts in words (docs/studies.md)."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

from pipeline.core.params import Params

FULL = "+ DPS + mask refine + CCM (the paper's full model)"
BASELINE = "Baseline: global prototype + RCM, initial masks"
REFINED = "Refined pseudo-masks"
GROUND_TRUTH = "Full model with ground-truth masks"


@dataclass(frozen=True)
class Study:
    """Rows (name -> params overriding the committed ones; ``{}`` is the committed configuration),
    the row the others are compared with, the components' contrasts ``(component, row with it, row
    without it)`` the report puts in words, the default training seeds, and the params the
    benchmark must have been made with (``section.key`` -> value; checked in ``params.yaml``)."""

    rows: dict[str, dict[str, object]]
    reference: str
    contrasts: tuple[tuple[str, str, str], ...] = ()
    seeds: tuple[int, ...] = (0, 1, 2)
    requires: tuple[tuple[str, object], ...] = ()


def _truth(morph: int) -> dict[str, object]:
    return {"model.pseudo_masks": "truth", "model.truth_morph": morph}


def switches(*, masks: str, dps: bool = True, ccm: bool = True, vtp: bool = True, pir: bool = True,
             vvp: bool = True) -> dict[str, object]:
    """Every component's switch, explicitly: a row means the same whatever the defaults are (the
    masks too: the paper's rows use refined ones, the schema's default is initial)."""
    return {"model.dps": dps, "model.pseudo_masks": masks, "model.ccm": ccm, "model.vtp": vtp,
            "model.pir": pir, "model.vvp": vvp}


STUDIES: dict[str, Study] = {
    # the LFSS paper's Table 4, extended with the PI-CLIP priors
    "ablation": Study(
        {
            BASELINE: switches(dps=False, masks="initial", ccm=False),
            "+ DPS": switches(masks="initial", ccm=False),
            "+ DPS + mask refine": switches(masks="refined", ccm=False),
            FULL: switches(masks="refined"),
            "Full model without DPS": switches(masks="refined", dps=False),
            "Full model with initial masks": switches(masks="initial"),
            "Full model without PI-CLIP priors": switches(masks="refined", vtp=False, vvp=False),
            "Full model, VTP without PIR": switches(masks="refined", pir=False),
            "Full model without VVP": switches(masks="refined", vvp=False),
        },
        FULL,
        (
            ("DPS (on the baseline)", "+ DPS", BASELINE),
            ("mask refine (without CCM)", "+ DPS + mask refine", "+ DPS"),
            ("CCM (full-image correlation)", FULL, "+ DPS + mask refine"),
            ("DPS (in the full model)", FULL, "Full model without DPS"),
            ("mask refine (in the full model)", FULL, "Full model with initial masks"),
            ("the PI-CLIP priors (VTP and VVP)", FULL, "Full model without PI-CLIP priors"),
            ("PIR", FULL, "Full model, VTP without PIR"),
            ("VVP", FULL, "Full model without VVP"),
        ),
    ),
    # how good must the masks given to the model (query and supports) be? Controlled precision
    # (dilated ground truth) and recall (eroded), against the pseudo-masks
    "masks": Study(
        {
            REFINED: {"model.pseudo_masks": "refined"},
            "Initial pseudo-masks (MaskCLIP)": {"model.pseudo_masks": "initial"},
            "Ground truth": _truth(0),  # (dilating by 2 px or less stays inside the 255 band: the same)
            "Ground truth eroded 3 px": _truth(-3),
            "Ground truth eroded 5 px": _truth(-5),
            "Ground truth eroded 8 px": _truth(-8),
            "Ground truth dilated 5 px": _truth(5),
            "Ground truth dilated 8 px": _truth(8),
            "Ground truth dilated 12 px": _truth(12),
            "Ground-truth supports, refined query pseudo-mask": {"model.supervision": "mask",
                                                                  "model.pseudo_masks": "refined"},
        },
        REFINED,
        (
            ("refined instead of initial pseudo-masks", REFINED, "Initial pseudo-masks (MaskCLIP)"),
            ("ground-truth instead of refined masks", "Ground truth", REFINED),
            ("ground-truth supports (query pseudo-mask kept)",
             "Ground-truth supports, refined query pseudo-mask", REFINED),
        ),
    ),
    # does DPS help when objects have parts, as the distributed prototypes are meant for? The same
    # contrast as the ablation's on a benchmark of objects in two parts (`make parts-study`)
    "parts": Study(
        {
            FULL: switches(masks="refined"),
            "Full model without DPS": switches(masks="refined", dps=False),
            # the same without the pseudo-masks' errors: can DPS use parts when its seeds are right?
            GROUND_TRUTH: {**switches(masks="truth"), "model.truth_morph": 0},
            GROUND_TRUTH + ", without DPS": {**switches(dps=False, masks="truth"), "model.truth_morph": 0},
        },
        FULL,
        (
            ("DPS (in the full model, objects in two parts)", FULL, "Full model without DPS"),
            ("DPS with ground-truth masks (objects in two parts)", GROUND_TRUTH,
             GROUND_TRUTH + ", without DPS"),
        ),
        requires=(("prepare.synthetic.parts", True),),
    ),
}


def with_overrides(params: dict, overrides: dict[str, object]) -> dict:
    """A deep copy of ``params`` with dotted ``section.key`` values replaced."""
    out = json.loads(json.dumps(params))
    for dotted, value in overrides.items():
        section, key = dotted.split(".", 1)
        if key not in out.get(section, {}):
            raise SystemExit(f"error: {dotted}: no such param")
        out[section][key] = value
    return out


def check_requires(name: str, study: Study, params: Params) -> None:
    """Exit with one line when ``params`` lack what the study's benchmark needs."""
    for key, value in study.requires:
        found = functools.reduce(getattr, key.split("."), params)
        if found != value:
            raise SystemExit(f"error: params.yaml: the {name} study needs {key}: {value} (it is {found}); "
                             f"`make {name}-study` runs it in a worktree of its own that has it")
