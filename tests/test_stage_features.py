"""The features stage on the smoke run: its store holds the backbone's features of every episode image."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch

pytestmark = pytest.mark.slow


def test_features_are_the_backbones_for_every_episode_image(features_run, pipeline_run):
    from pipeline.clip.loader import load_local_dir
    from pipeline.core.images import load_normalized
    from pipeline.datasets.episodes import episode_images, read_manifests
    from pipeline.features.backbone import build_backbone
    from pipeline.features.store import FeatureStore

    store = FeatureStore(features_run)
    assert store.attrs["image_ids"] == episode_images(read_manifests(pipeline_run / "episodes").values())
    index = pq.read_table(pipeline_run / "index/index.parquet").to_pandas().set_index("image_id")
    ids = store.attrs["image_ids"][-3:]
    net = build_backbone("clip", load_local_dir(pipeline_run / "clip"))
    direct = net(load_normalized([index.at[i, "image_path"] for i in ids], 256, net.mean, net.std))
    assert store.read(ids).shape == direct.shape == (3, 192, 16, 16)
    assert torch.allclose(store.read(ids).float(), direct, atol=2e-2, rtol=1e-2)  # float16 storage
