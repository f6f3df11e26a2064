"""Rows read straight from shard files equal zarr's own reading, whatever the order, repeats,
unwritten rows and shards; other layouts are left to zarr; a damaged shard is named."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from pipeline.core.artifacts import StoreReader
from pipeline.core.errors import PipelineError
from pipeline.core.shard_rows import RAW_ROWS, ShardRows


def write(path, values: np.ndarray, shard: int, **options) -> zarr.Array:
    root = zarr.open_group(path, mode="w")
    array = root.create_array("images/x", shape=values.shape, dtype=values.dtype,
                              chunks=(1, *values.shape[1:]), shards=(shard, *values.shape[1:]), fill_value=0,
                              **options)
    array[:] = values
    return array


@pytest.fixture
def values() -> np.ndarray:
    x = np.random.default_rng(0).standard_normal((23, 3, 4, 5)).astype(np.float16)
    x[4] = 0  # a row equal to the fill value: not written
    x[8:16] = 0  # a whole shard of them: no file
    return x


def test_direct_rows_equal_zarrs_in_any_order_with_repeats_and_unwritten_rows(tmp_path, values):
    array = write(tmp_path / "s.zarr", values, 8, **RAW_ROWS)
    direct = ShardRows.of(array)
    assert direct is not None and not (tmp_path / "s.zarr/images/x/c/1").exists()
    rows = np.array([22, 4, 0, 9, 22, 17, 3, 15, 21, 0])  # the last shard holds 7 of its 8 rows
    assert np.array_equal(direct.read(rows), values[rows]) and direct.read(rows).dtype == np.float16
    assert direct.read(np.array([], dtype=np.int64)).shape == (0, 3, 4, 5)
    reader = StoreReader(tmp_path / "s.zarr")
    assert np.array_equal(reader.read_rows("images/x", rows), values[rows])


def test_other_layouts_are_read_by_zarr(tmp_path, values):
    compressed = write(tmp_path / "c.zarr", values, 8)  # zstd
    assert ShardRows.of(compressed) is None
    got = StoreReader(tmp_path / "c.zarr").read_rows("images/x", [5, 1, 5])
    assert np.array_equal(got, values[[5, 1, 5]])
    two_rows = zarr.create_array(tmp_path / "t.zarr", shape=values.shape, dtype=values.dtype,
                                 chunks=(2, 3, 4, 5), shards=(8, 3, 4, 5), **RAW_ROWS)
    assert ShardRows.of(two_rows) is None
    unsharded = zarr.create_array(tmp_path / "u.zarr", shape=values.shape, dtype=values.dtype,
                                  chunks=(1, 3, 4, 5), **RAW_ROWS)
    assert ShardRows.of(unsharded) is None


def test_a_cut_shard_is_named_in_one_line(tmp_path, values):
    array = write(tmp_path / "s.zarr", values, 8, **RAW_ROWS)
    shard = tmp_path / "s.zarr/images/x/c/0/0/0/0"
    data = shard.read_bytes()
    index = data[-(16 * 8 + 4):]
    shard.write_bytes(data[:200] + index)  # rows past byte 200 are gone, the index still points at them
    with pytest.raises(PipelineError, match=r"c/0/0/0/0: row 3 is cut short") as caught:
        ShardRows.of(array).read(np.array([0, 3]))
    assert "\n" not in str(caught.value)
    shard.write_bytes(data[: len(data) // 2])  # cut in half: what the index's place holds is not an index
    with pytest.raises(PipelineError, match=r"c/0/0/0/0: its shard index does not match its checksum"):
        ShardRows.of(array).read(np.array([0]))


def test_a_shard_written_directly_reads_back_by_zarr_and_directly(tmp_path, values):
    """Whole shards (the last one shorter) written as one file each; zarr reads them as its own,
    a part of a shard still goes through zarr, and a shard zarr wrote has the same index bytes."""
    from pipeline.core.shard_rows import write_shard

    write(tmp_path / "ref.zarr", values[:8] + 1, 8, **RAW_ROWS)  # no zero rows: all written
    array = write(tmp_path / "s.zarr", np.zeros_like(values), 8, **RAW_ROWS)
    for start in (0, 8, 16):
        write_shard(array, start, values[start: start + 8])
    write_shard(array, 3, values[3:5])  # not a whole shard: zarr writes it
    again = zarr.open_group(tmp_path / "s.zarr", mode="r")["images/x"]
    assert np.array_equal(again[:], values)
    assert np.array_equal(ShardRows.of(again).read(np.arange(23)[::-1]), values[::-1])
    assert not list((tmp_path / "s.zarr").rglob("*.partial"))
    write_shard(array, 0, values[:8] + 1)
    ours = (tmp_path / "s.zarr/images/x/c/0/0/0/0").read_bytes()
    theirs = (tmp_path / "ref.zarr/images/x/c/0/0/0/0").read_bytes()
    assert ours == theirs  # same rows, same layout: the very bytes zarr writes
