"""The priors stage on the smoke run: its store against a direct extraction, resume after a crash,
a Dask cluster."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.core.params import load_params
from pipeline.priors.store import PriorStore
from stages import priors
from tests.conftest import priors_args, zarr_arrays

pytestmark = pytest.mark.slow


def test_priors_cover_every_episode_and_round_trip(priors_run, pipeline_run):
    from pipeline.datasets.episodes import image_classes, read_manifests
    from pipeline.priors.shards import load_extractor

    store = PriorStore(priors_run)
    manifests = read_manifests(pipeline_run / "episodes")
    wanted = image_classes(manifests.values())
    assert store.attrs["image_ids"] == sorted(wanted)
    got = store.pairs.groupby("image_id")["class_id"].apply(sorted).to_dict()
    assert got == wanted
    assert store.attrs["clip_sha256"] == (pipeline_run / "clip/sha256.txt").read_text().strip()
    h, w = store.attrs["grid"]
    assert (h, w) == (8, 8) and store.attrs["preprocess"]["size"] == 128
    assert not any(name.startswith("episodes") for name in store.root)  # VVP is the model's, not stored
    last = manifests["test/fold1/shot5_seed0"].iloc[-1]
    index = pq.read_table(pipeline_run / "index/index.parquet").to_pandas().set_index("image_id")
    masks = [np.asarray(Image.open(index.at[s, "mask_path"])) == last["class_id"] for s in last["supports"]]
    maps = store.vvp(last["query"], list(last["supports"]), masks)
    assert maps.shape == (5, 2, 8, 8) and maps.max() == 1 and maps.min() == 0
    # what the store holds equals a direct extraction of the same images (float16 round trip)
    ids = store.attrs["image_ids"][:3]
    cfg = load_params(priors_run.parent / "priors.zarr.params.yaml").priors
    ex = load_extractor(pipeline_run / "clip", cfg, store.attrs["class_names"])
    direct = ex.priors(ex.load_images([index.at[i, "image_path"] for i in ids]), [wanted[i] for i in ids],
                       [list(index.at[i, "class_ids"]) for i in ids])
    flat = [(i, c) for i in ids for c in wanted[i]]
    for p, (image, c) in enumerate(flat):
        assert np.allclose(store.vtp(image, c), direct.vtp[p].numpy(), atol=2e-3)
        assert np.allclose(store.vtp(image, c, refined=True), direct.pir[p].numpy(), atol=2e-3)
    assert np.array_equal(store.maskclip_labels(ids[0]), direct.maskclip_labels[0].numpy())
    pixels = store.maskclip_labels(ids[0], size=(64, 48))
    assert pixels.shape == (64, 48) and set(np.unique(pixels)) <= set(range(1, 21))
    assert (priors_run.parent / "priors.zarr.png").stat().st_size > 10_000


def test_priors_resume_after_a_crash_computes_only_missing_shards(priors_run, pipeline_run, tmp_path,
                                                                  monkeypatch):
    from pipeline.priors import tasks

    real, calls = tasks.extract_image_shard, []

    def crash_on_second(root, rows, *args):
        calls.append(rows.start)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        real(root, rows, *args)

    monkeypatch.setattr(tasks, "extract_image_shard", crash_on_second)
    out = tmp_path / "priors.zarr"
    with pytest.raises(RuntimeError, match="simulated crash"):
        priors.main(priors_args(pipeline_run, out))  # same threads per task as the run it is compared with
    assert not out.exists()  # nothing half-written in place
    finished = {p.name for p in (tmp_path / ".priors.zarr.partial" / ".done").iterdir()}
    crashed = f"images-{calls[1]:07d}"
    assert crashed not in finished and f"images-{calls[0]:07d}" in finished
    calls.clear()
    assert priors.main(priors_args(pipeline_run, out)) == 0
    assert [f"images-{c:07d}" for c in calls] == [crashed]  # only what was missing
    expected, got = zarr_arrays(priors_run), zarr_arrays(out)
    assert expected.keys() == got.keys()
    for name in expected:
        assert np.array_equal(expected[name], got[name]), name


def test_priors_run_on_a_dask_local_cluster(priors_run, pipeline_run, tmp_path):
    out = tmp_path / "priors.zarr"
    args = priors_args(pipeline_run, out, {"orchestration": {"task_runner": "dask", "max_workers": 2},
                                           "priors": {"shard_size": 128}})
    assert priors.main(args) == 0
    expected, got = zarr_arrays(priors_run), zarr_arrays(out)
    assert expected.keys() == got.keys()
    for name in expected:
        assert np.allclose(expected[name].astype(np.float32), got[name].astype(np.float32), atol=2e-3), name
