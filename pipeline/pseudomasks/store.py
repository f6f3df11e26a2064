"""``data/pseudo_masks.zarr``: language-guided pseudo-masks of every episode, and its reader.

::

    attrs: the pseudo_masks and backbone params, the sources' hashes
    <manifest>/support_initial   (E, K, S, S) bool   MaskCLIP label == class (∧ VTP >= threshold)
    <manifest>/support_refined   (E, K, S, S) bool   after the self-supported refiner
    <manifest>/query_initial     (E, S, S)    bool
    <manifest>/query_refined     (E, S, S)    bool

S is ``backbone.image_size``; episode e of ``test/fold0/shot1_seed0`` is row e. Each array is
sharded by ``attrs["shard"]`` episodes (:func:`shard_episodes`: as many as fit the memory
budget, at most ``MAX_SHARD``), the unit of work of :func:`pipeline.pseudomasks.shards.refine_shard`,
which writes each batch's rows as it finishes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import zarr

from pipeline.core.artifacts import StoreReader, read_rows
from pipeline.core.errors import PipelineError

MAX_SHARD = 1000  # episodes per shard at most
MIN_SHARD_BYTES = 2**30  # a shard task may always use this much memory (cache_gb 0 included)
ARRAYS = ("support_initial", "support_refined", "query_initial", "query_refined")
Role = Literal["support", "query"]
Kind = Literal["initial", "refined"]


def episode_bytes(shots: int, feature_shape: Sequence[int], size: int) -> int:
    """Memory of one episode in a batch being refined: per image, its float32 features
    ``feature_shape`` ``(C, h, w)`` with two working copies, and six ``size²`` masks (initial and
    refined, on their way to the store)."""
    return (shots + 1) * (3 * 4 * int(np.prod(feature_shape)) + 6 * size * size)


def kept_bytes(shots: int, feature_shape: Sequence[int], size: int) -> int:
    """Memory a shard keeps per episode until it is done: per image, a float32 background
    similarity on the ``(h, w)`` grid and its ``size²`` initial mask, a bit a pixel."""
    return (shots + 1) * (4 * int(np.prod(feature_shape[-2:])) + -(-size * size // 8))


def shard_episodes(shots: int, feature_shape: Sequence[int], size: int, budget: int) -> int:
    """Episodes per shard (at most ``MAX_SHARD``) such that what a shard keeps fits ``budget``
    bytes (at least ``MIN_SHARD_BYTES``)."""
    return max(1, min(MAX_SHARD, max(budget, MIN_SHARD_BYTES) // kept_bytes(shots, feature_shape, size)))


def shards_at_once(shard: int, batch_size: int, shots: int, feature_shape: Sequence[int], size: int,
                   budget: int) -> int:
    """How many shard tasks (each ``shard`` episodes kept, ``batch_size`` in flight) fit ``budget``
    bytes together (at least one)."""
    task = (shard * kept_bytes(shots, feature_shape, size)
            + batch_size * episode_bytes(shots, feature_shape, size))
    return max(1, max(budget, MIN_SHARD_BYTES) // task)


def create(root: zarr.Group, manifests: dict[str, pd.DataFrame], size: int, shard: int) -> None:
    """The empty arrays of every manifest, ``shard`` episodes to a Zarr shard (kept when a resumed
    run already made them)."""
    for name, table in manifests.items():
        shot = int(table["shot"].max())
        for array in ARRAYS:
            if f"{name}/{array}" in root:
                continue
            per_episode = (shot, size, size) if array.startswith("support") else (size, size)
            shape = (len(table), *per_episode)
            root.create_array(f"{name}/{array}", shape=shape, dtype="bool", chunks=(1, *shape[1:]),
                              shards=(shard, *shape[1:]), fill_value=False)
    root.attrs["shard"] = shard


class PseudoMaskStore(StoreReader):
    """Read access to ``data/pseudo_masks.zarr`` by manifest, role and kind."""

    stage = "pseudo_masks"

    def episodes(self, manifest: str) -> int:
        """How many episodes ``manifest`` has masks for."""
        return self._array(manifest, "query", "initial").shape[0]

    def masks(
        self, manifest: str, role: Role, kind: Kind, episodes: Sequence[int] | range | None = None
    ) -> np.ndarray:
        """``(E, K, S, S)`` support or ``(E, S, S)`` query masks (bool) of ``manifest``: every
        episode, a ``range`` of them (one contiguous read), or the rows ``episodes``."""
        array = self._array(manifest, role, kind)
        with self.checked(array.path):
            if episodes is None:
                return array[:]
            if isinstance(episodes, range) and episodes.step == 1:
                return array[episodes.start: episodes.stop]
            return read_rows(array, episodes)

    def _array(self, manifest: str, role: Role, kind: Kind) -> zarr.Array:
        key = f"{manifest}/{role}_{kind}"
        if key not in self.root:
            raise PipelineError(f"pseudo-masks: no masks for manifest {manifest!r} "
                                "(re-run the pseudo_masks stage)")
        return self.root[key]
