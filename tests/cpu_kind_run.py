"""Run the stages after ``prepare`` of a smoke pipeline in one process, through their main().

``python -m tests.cpu_kind_run RUN OUT PARAMS``: ``RUN`` holds ``clip``; the synthetic benchmark,
index, splits, episodes, priors, features, pseudo-masks, ``train@0`` and ``evaluate@0`` are
written under ``OUT``, and ``OUT/kernels.json`` says which CPU kernels and dtypes ran. (In
a process of its own: torch DataLoader workers forked from a process that ran a Prefect flow exit
with status 1 at shutdown, which would fail later tests of the session.)
:mod:`tests.test_cpu_kinds` runs it once with the machine's own kernels and once with
``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` (a CPU without AVX-512) and compares.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(run: Path, out: Path, params: Path) -> None:
    from prefect.testing.utilities import prefect_test_harness

    from pipeline.core.dtype import describe, resolve
    from pipeline.core.params import load_params
    from stages import episodes, evaluate, features, prepare, priors, pseudo_masks, split, train

    out.mkdir(parents=True, exist_ok=True)
    common = ["--params", str(params), "--index", str(out / "index"), "--episodes", str(out / "episodes")]
    stores = ["--priors", str(out / "priors.zarr"), "--features", str(out / "features.zarr"),
              "--pseudo_masks", str(out / "pseudo_masks.zarr")]
    fold = [*common, *stores, "--models", str(out / "models"), "--fold", "0"]
    stored = ["--priors", str(out / "priors.zarr"), "--features", str(out / "features.zarr")]
    with prefect_test_harness(server_startup_timeout=60):
        steps = [
            (prepare, ["--params", str(params), "--synthetic", str(out / "synthetic"),
                       "--index", str(out / "index")]),
            (split, ["--params", str(params), "--index", str(out / "index"), "--out", str(out / "splits")]),
            (episodes, ["--params", str(params), "--splits", str(out / "splits"),
                        "--out", str(out / "episodes")]),
            (priors, [*common, "--clip", str(run / "clip"), "--out", str(out / "priors.zarr"),
                      "--preview", str(out / "preview.png")]),
            (features, [*common, "--clip", str(run / "clip"), "--out", str(out / "features.zarr")]),
            (pseudo_masks, [*common, *stored, "--out", str(out / "pseudo_masks.zarr"),
                            "--metrics", str(out / "pseudo_masks.json")]),
            (train, [*fold, "--plots", str(out / "plots")]),
            (evaluate, [*fold, "--metrics", str(out / "metrics"), "--predictions", str(out / "predictions"),
                        "--splits", str(out / "splits")]),
        ]
        for stage, args in steps:
            if stage.main(args) != 0:
                raise SystemExit(f"{stage.__name__} failed")
    cfg = load_params(params)
    kernels = describe() | {"train_dtype": resolve(cfg.train.dtype, "cpu"),
                            "priors_dtype": resolve(cfg.priors.dtype, "cpu")}
    (out / "kernels.json").write_text(json.dumps(kernels))


if __name__ == "__main__":
    main(*map(Path, sys.argv[1:4]))
