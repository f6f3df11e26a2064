"""``python -m pipeline.config.check [params.yaml]``: the whole file checked in about a second, as
``dvc repro`` needs it (``make repro`` runs it before DVC touches anything): the schema
(:mod:`pipeline.core.params`), every section written out, the dataset's name and root
(:mod:`pipeline.datasets.registry`), and that the root exists laid out as that dataset (its
adapter's layout check, :mod:`pipeline.datasets.adapters`). A bad value is one line naming the key,
and exit status 1."""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.core.params import DatasetParams, Params, check_complete
from pipeline.datasets.adapters import check_layout
from pipeline.datasets.registry import check_dataset


def check_dataset_root(dataset: DatasetParams, params_path: Path, source: str) -> None:
    """``dataset``'s name and root fit (:func:`check_dataset`) and, for a dataset that is read
    rather than generated, the root exists laid out as that dataset. A relative root is taken from
    ``params_path``'s folder, where DVC runs ``prepare``. One :class:`PipelineError` line, starting
    with ``source``, otherwise."""
    spec = check_dataset(dataset, source)
    if not spec.generated:
        try:
            check_layout(spec, Path(params_path).parent / dataset.resolved_root)
        except PipelineError as exc:
            raise PipelineError(f"{source}: {exc}") from None


def check_params(path: str | Path = "params.yaml") -> Params:
    """``path`` validated whole: one :class:`PipelineError` line on the first bad key."""
    params = check_complete(path)
    check_dataset_root(params.dataset, Path(path), str(path))
    return params


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        check_params(Path(args[0] if args else "params.yaml"))
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
