"""The pseudo_masks stage on the smoke run: its masks and their mIoU."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.core.params import load_params
from pipeline.priors.store import PriorStore
from tests.conftest import write_params

pytestmark = pytest.mark.slow


def test_pseudo_masks_stage_writes_masks_and_their_miou(priors_run, features_run, pipeline_run, tmp_path):
    import zarr

    from pipeline.datasets.episodes import read_manifests
    from stages import pseudo_masks

    out, metrics = tmp_path / "pseudo_masks.zarr", tmp_path / "pseudo_masks.json"
    params = write_params(tmp_path / "params.yaml")
    assert pseudo_masks.main(["--params", str(params), "--index", str(pipeline_run / "index"),
                              "--episodes", str(pipeline_run / "episodes"), "--priors", str(priors_run),
                              "--features", str(features_run), "--out", str(out),
                              "--metrics", str(metrics)]) == 0
    report = json.loads(metrics.read_text())
    assert sorted(k for k in report if k.startswith("fold")) == ["fold0", "fold1", "fold2", "fold3"]
    assert set(report["mean"]) == {f"{role}_{kind}_{figure}" for role in ("support", "query")
                                   for kind in ("initial", "refined")
                                   for figure in ("miou", "precision", "recall", "missed")}
    assert all(0 <= v <= 100 for v in report["mean"].values())
    root, store = zarr.open_group(out, mode="r"), PriorStore(priors_run)
    manifests = read_manifests(pipeline_run / "episodes")
    size = load_params(params).backbone.image_size
    for name in ("test/fold0/shot5_seed0", "train/fold1"):
        table = manifests[name]
        assert root[f"{name}/support_refined"].shape == (len(table), int(table["shot"].max()), size, size)
        row = table.iloc[-1]
        expected = store.maskclip_labels(row["query"], size=(size, size)) == row["class_id"]
        assert np.array_equal(root[f"{name}/query_initial"][len(table) - 1], expected)
