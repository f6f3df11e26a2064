"""Shared fixtures: a small synthetic benchmark on disk and a Prefect server for stage tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from pipeline.core.params import SyntheticParams  # noqa: E402
from pipeline.datasets import synthetic_writer  # noqa: E402

SMOKE = SyntheticParams(image_size=64, train_images=120, val_images=200, caption_images=12,
                        shard_size=50)


def write_benchmark(root: Path, cfg: SyntheticParams = SMOKE) -> Path:
    """The synthetic benchmark written through the library, shard by shard."""
    for split, n in (("train", cfg.train_images), ("val", cfg.val_images)):
        for start in range(0, n, cfg.shard_size):
            synthetic_writer.write_benchmark_shard(
                root, split, range(start, min(start + cfg.shard_size, n)), cfg)
    for start in range(0, cfg.caption_images, cfg.shard_size):
        synthetic_writer.write_caption_shard(
            root, range(start, min(start + cfg.shard_size, cfg.caption_images)), cfg)
    synthetic_writer.finalize(root, cfg)
    return root


@pytest.fixture(scope="session")
def benchmark_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_benchmark(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server for every test that runs a flow."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


def run_first_stages(params: Path | str, root: Path) -> None:
    """prepare -> split -> episodes through the stages' main(), as DVC calls them, writing
    ``root/{synthetic,index,splits,episodes}``."""
    from stages import episodes, prepare, split

    params = str(params)
    assert prepare.main(["--params", params, "--synthetic", str(root / "synthetic"),
                         "--index", str(root / "index")]) == 0
    assert split.main(["--params", params, "--index", str(root / "index"),
                       "--out", str(root / "splits")]) == 0
    assert episodes.main(["--params", params, "--splits", str(root / "splits"),
                          "--out", str(root / "episodes")]) == 0
