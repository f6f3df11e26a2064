"""Few-shot episode sampling (docs/design.md#conventions) and the manifest schema.

Manifest (Parquet, one row per episode):

==========  ============  =======================================================
column      type          meaning
==========  ============  =======================================================
episode     int32         0..n-1 within the file
fold        int8          fold index
shot        int8          number of supports K
seed        int32         the seed that drew it
class_id    int16         the target class (1..C)
query       string        query image id
supports    list<string>  K distinct support image ids of ``class_id``, never ``query``
==========  ============  =======================================================

Protocols for the test manifests:

* ``hsnet`` (default): queries taken in order from the fold's (image, class) test list and
  cycled until ``n`` episodes; supports drawn at random from the class's other images.
* ``pfenet`` (PFENet / PI-CLIP): every seed draws its own random query order from the list
  (a seeded permutation, cycled) and its own supports; results are reported as mean ± std
  over seeds.

Training episodes (base classes, ``train`` pairs) are drawn one of two ways (``train.sampling``):

* ``pool``: a fixed pool of uniformly random queries, the same every epoch (the embedded
  benchmark's default).
* ``epoch`` (PFENet / HSNet / PI-CLIP): every epoch visits every training (image, class) pair
  as a query, in a fresh seeded order, with fresh supports (:func:`draw_epoch_episodes`); the
  ``train/fold{k}`` manifest then lists every pair once (epoch 0's draw), so the stages that
  store per-image products cover every image and pair a later epoch can draw.

Every draw comes from ``numpy.random.default_rng([seed, fold, shot, purpose(, epoch)])``: the
same inputs give byte-identical files.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.errors import PipelineError

EPISODE_SCHEMA = pa.schema([
    ("episode", pa.int32()),
    ("fold", pa.int8()),
    ("shot", pa.int8()),
    ("seed", pa.int32()),
    ("class_id", pa.int16()),
    ("query", pa.string()),
    ("supports", pa.list_(pa.string())),
])

Protocol = Literal["hsnet", "pfenet"]
_PURPOSE = {"test": 0, "train": 1, "val": 2}


def _rng(seed: int, fold: int, shot: int, purpose: str, *epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, fold, shot, _PURPOSE[purpose], *epoch])


def images_by_class(pairs: pd.DataFrame) -> dict[int, np.ndarray]:
    """Class id -> image ids that contain it (in list order)."""
    return {int(c): g["image_id"].to_numpy() for c, g in pairs.groupby("class_id", sort=True)}


def check_shots(
    pairs: pd.DataFrame, classes: list[int], shot: int, class_names: list[str], where: str
) -> None:
    """Every class needs ``shot`` supports besides the query: ``shot + 1`` images."""
    counts = pairs["class_id"].value_counts()
    for class_id in classes:
        have = int(counts.get(class_id, 0))
        if have < shot + 1:
            raise PipelineError(
                f"episodes.shots: {shot}-shot needs {shot + 1} images of class "
                f"{class_names[class_id - 1]!r} ({where}) but only {have} have it"
            )


def sample_episodes(
    pairs: pd.DataFrame, queries: np.ndarray, fold: int, shot: int, seed: int,
    rng: np.random.Generator,
) -> pa.Table:
    """Episodes for the given query rows of ``pairs``, supports drawn with ``rng``.

    Args:
        pairs: (image, class) pairs with columns ``image_id`` and ``class_id``.
        queries: ``(n,)`` row positions into ``pairs``, one per episode.
    """
    pool = images_by_class(pairs)
    image_ids = pairs["image_id"].to_numpy()
    class_ids = pairs["class_id"].to_numpy()
    supports = []
    for row in queries:
        candidates = pool[int(class_ids[row])]
        others = candidates[candidates != image_ids[row]]
        supports.append(others[rng.choice(len(others), size=shot, replace=False)].tolist())
    n = len(queries)
    return pa.Table.from_pydict({
        "episode": np.arange(n, dtype=np.int32),
        "fold": np.full(n, fold, np.int8),
        "shot": np.full(n, shot, np.int8),
        "seed": np.full(n, seed, np.int32),
        "class_id": class_ids[queries].astype(np.int16),
        "query": image_ids[queries],
        "supports": supports,
    }, schema=EPISODE_SCHEMA)


def draw_test_episodes(
    pairs: pd.DataFrame, fold: int, shot: int, seed: int, n: int, protocol: Protocol
) -> pa.Table:
    """The fold's test manifest for one (shot, seed); ``pairs`` are its ``test`` pairs."""
    rng = _rng(seed, fold, shot, "test")
    order = np.arange(len(pairs)) if protocol == "hsnet" else rng.permutation(len(pairs))
    return sample_episodes(pairs, order[np.arange(n) % len(pairs)], fold, shot, seed, rng)


def draw_pool_episodes(
    pairs: pd.DataFrame, fold: int, shot: int, seed: int, n: int, purpose: Literal["train", "val"]
) -> pa.Table:
    """A fixed pool of ``n`` episodes with uniformly random queries (training / validation)."""
    rng = _rng(seed, fold, shot, purpose)
    return sample_episodes(pairs, rng.integers(0, len(pairs), n), fold, shot, seed, rng)


def draw_epoch_episodes(
    pairs: pd.DataFrame, fold: int, shot: int, seed: int, epoch: int, n: int | None = None
) -> pa.Table:
    """Epoch ``epoch``'s training episodes: every pair of ``pairs`` as a query once, in a seeded
    order, with fresh supports; ``n`` episodes instead (fewer: the first ``n`` of that order;
    more: the order cycled). Episode ``e`` of the result is the ``e``-th of the epoch. The pairs
    are put in (class, image) order first: any order of the same pairs gives the same draw."""
    pairs = pairs.sort_values(["class_id", "image_id"], ignore_index=True)
    rng = _rng(seed, fold, shot, "train", epoch)
    order = rng.permutation(len(pairs))
    if n is not None:
        order = order[np.arange(n) % len(pairs)]
    return sample_episodes(pairs, order, fold, shot, seed, rng)


def query_pairs(table: pd.DataFrame) -> pd.DataFrame:
    """The distinct ``(image_id, class_id)`` query pairs of a manifest, in first-seen order."""
    pairs = pd.DataFrame({"image_id": table["query"].to_numpy(), "class_id": table["class_id"].to_numpy()})
    return pairs.drop_duplicates(ignore_index=True)


def episode_images(manifests: Iterable[pd.DataFrame]) -> list[str]:
    """Every image (query or support) of the given manifests, sorted."""
    ids: set[str] = set()
    for table in manifests:
        ids.update(table["query"])
        ids.update(s for supports in table["supports"] for s in supports)
    return sorted(ids)


def image_classes(manifests: Iterable[pd.DataFrame]) -> dict[str, list[int]]:
    """Image id -> the sorted class ids some episode asks of it (as query or support), by image id."""
    pairs: dict[str, set[int]] = {}
    for table in manifests:
        for row in table.itertuples():
            for image in (row.query, *row.supports):
                pairs.setdefault(image, set()).add(int(row.class_id))
    return {image: sorted(pairs[image]) for image in sorted(pairs)}


def read_manifests(episodes_dir: Path) -> dict[str, pd.DataFrame]:
    """``{"test/fold0/shot1_seed0": episodes, ...}`` for every manifest under ``episodes_dir``."""
    files = sorted(Path(episodes_dir).rglob("*.parquet"))
    if not files:
        raise PipelineError(f"{episodes_dir}: no episode manifests (run the episodes stage first)")
    return {f.relative_to(episodes_dir).with_suffix("").as_posix(): pq.read_table(f).to_pandas()
            for f in files}
