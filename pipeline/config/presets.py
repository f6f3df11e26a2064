"""Apply a preset (``configs/*.yaml``: the papers' settings for PASCAL-5i or COCO-20i) to
``params.yaml``, so that DVC tracks what a run used.

A preset is a partial params file; ``--set section.key=value`` adds overrides (e.g. the
dataset's root). Every value it names replaces the one in ``params.yaml``, the rest (and every
comment) is kept; the result is validated before anything is written -- the schema, and that the
dataset's root exists laid out as the preset's dataset -- so a bad preset, value or root fails with
one line and leaves ``params.yaml`` as it was (DVC never sees it, so no output is removed)::

    python -m pipeline.config.presets configs/pascal-5i.yaml --set dataset.root=/data/VOC2012
    make repro CONFIG=configs/pascal-5i.yaml DATASET_ROOT=/data/VOC2012   # the same, then dvc repro
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Any

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedSeq

from pipeline.config.check import check_dataset_root
from pipeline.core.artifacts import write_atomic
from pipeline.core.errors import PipelineError
from pipeline.core.params import parse_params, read_params_file


def _merge(into: dict, values: dict) -> None:
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        elif isinstance(value, list):  # written [a, b], as params.yaml writes lists
            into[key] = CommentedSeq(value)
            into[key].fa.set_flow_style()
        else:
            into[key] = value


def _editor() -> YAML:
    """A round-trip YAML: params.yaml's comments, order and quotes survive; null stays null."""
    editor = YAML()
    editor.width = 4096
    editor.preserve_quotes = True
    editor.representer.add_representer(
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null"))
    return editor


def override(text: str) -> dict[str, Any]:
    """``"a.b=value"`` -> ``{"a": {"b": value}}`` (value parsed as YAML: numbers, lists, null)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise PipelineError(f"--set {text!r}: expected section.key=value")
    out: dict[str, Any] = yaml.safe_load(value) if value else None
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def apply_preset(params_path: Path, preset: Path | None, overrides: list[str]) -> dict:
    """Write ``params.yaml`` with the preset and ``overrides`` merged in; return the merged params."""
    layers = []
    if preset is not None:
        try:
            layers.append(yaml.safe_load(Path(preset).read_text()) or {})
        except FileNotFoundError:
            raise PipelineError(f"{preset}: no such preset (see configs/)") from None
        except yaml.YAMLError as exc:
            raise PipelineError(f"{preset}: not valid YAML ({str(exc).splitlines()[0]})") from None
    layers += [override(text) for text in overrides]
    read_params_file(Path(params_path))  # one line for a missing, empty or non-mapping params.yaml
    editor = _editor()
    document = editor.load(Path(params_path).read_text())
    for layer in layers:
        if not isinstance(layer, dict):
            raise PipelineError(f"{preset}: expected a mapping of params sections")
        _merge(document, layer)
    buffer = io.StringIO()
    editor.dump(document, buffer)
    merged = yaml.safe_load(buffer.getvalue())
    source = f"{params_path} with {preset or 'the overrides'}"
    check_dataset_root(parse_params(merged, source).dataset, Path(params_path), source)  # before writing
    write_atomic(Path(params_path), lambda tmp: tmp.write_text(buffer.getvalue()))
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.config.presets",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("preset", nargs="?", type=Path, help="a configs/*.yaml preset")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a further override (repeatable)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    try:
        merged = apply_preset(args.params, args.preset, args.set)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.params}: {args.preset or 'overrides'} applied (dataset {merged['dataset']['name']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
