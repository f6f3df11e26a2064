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


@pytest.mark.parametrize("path_taken", ["direct", "refused", "unaligned"])
def test_a_shard_written_past_the_page_cache_has_the_same_bytes(tmp_path, monkeypatch, path_taken):
    """Large shards go to disk with O_DIRECT from a page-aligned buffer (the rows' aligned bulk;
    the rest and the index appended); a filesystem that refuses it (tmpfs: EINVAL) or a buffer
    that is not page-aligned gets the buffered write. The file is the same bytes each way."""
    import errno
    import os

    from pipeline.core import shard_rows

    rng = np.random.default_rng(1)
    values = shard_rows.aligned_zeros((16, 3, 37, 41), np.float16)  # rows of 9 102 bytes: not block-sized
    values[:] = rng.standard_normal(values.shape).astype(np.float16) + 3  # no row equal to the fill value
    rows = values[:8] if path_taken != "unaligned" else values[1:9]  # 9 102 bytes past a page
    write(tmp_path / "ref.zarr", rows, 8, **RAW_ROWS)
    array = write(tmp_path / "s.zarr", np.zeros((8, 3, 37, 41), np.float16), 8, **RAW_ROWS)
    monkeypatch.setattr(shard_rows, "DIRECT_MIN", shard_rows.BLOCK)
    direct_flag, opened = getattr(os, "O_DIRECT", 0), []
    real_open = os.open

    def spy_open(path, flags, *args, **kwargs):
        opened.append(bool(flags & direct_flag))
        if path_taken == "refused" and flags & direct_flag:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy_open)
    shard_rows.write_shard(array, 0, rows)
    monkeypatch.undo()
    ours = (tmp_path / "s.zarr/images/x/c/0/0/0/0").read_bytes()
    assert ours == (tmp_path / "ref.zarr/images/x/c/0/0/0/0").read_bytes()
    if path_taken == "unaligned" or not direct_flag:
        assert not any(opened)
    elif path_taken == "direct":
        try:  # does this filesystem take direct I/O at all?
            os.close(os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT | direct_flag))
        except OSError:
            pytest.skip("this filesystem refuses O_DIRECT")
        assert opened == [True]
    else:
        assert opened == [True]
    assert not list((tmp_path / "s.zarr").rglob("*.partial"))


def test_aligned_zeros_is_page_aligned_zero_and_writable():
    from pipeline.core.shard_rows import BLOCK, aligned_zeros

    x = aligned_zeros((3, 5, 7), np.int16)
    assert x.ctypes.data % BLOCK == 0 and x.dtype == np.int16 and x.shape == (3, 5, 7)
    assert not x.any() and x.flags.c_contiguous and x.flags.writeable
    x[1, 2, 3] = 9
    assert x.sum() == 9
    assert aligned_zeros((0, 4), np.float16).shape == (0, 4)


class Priors(StoreReader):
    stage = "priors"


def test_a_damaged_store_is_one_line_naming_store_array_and_repair(tmp_path, values):
    """What a stage prints for a store damaged after its run: the store, the array, the damage and
    the repair command, for a shard read directly and for arrays zarr reads (a checksum that does
    not match, a chunk that does not decode, unreadable metadata)."""
    write(tmp_path / "s.zarr", values, 8, **RAW_ROWS)
    write(tmp_path / "z.zarr", values, 8)  # zstd, read by zarr
    store = tmp_path / "s.zarr"
    shard = store / "images/x/c/0/0/0/0"
    data = shard.read_bytes()
    shard.write_bytes(data[:200] + data[-(16 * 8 + 4):])
    with pytest.raises(PipelineError) as caught:
        Priors(store).read_rows("images/x", [3])
    assert str(caught.value) == (f"{store}: array images/x is unreadable (shard file c/0/0/0/0: row 3 is cut "
                                 "short): the store is damaged; repair it with: make repair STAGE=priors")
    zstd = tmp_path / "z.zarr/images/x/c/0/0/0/0"
    whole = zstd.read_bytes()
    zstd.write_bytes(whole[: len(whole) // 2])  # the index's place holds other bytes
    checksum = (r"z\.zarr: array images/x is unreadable \(ValueError: Stored and computed checksum do not "
                r"match.*repair it with: make repair STAGE=priors$")
    for read in (lambda r: r.read_rows("images/x", [1]), lambda r: r.cached("images/x"),
                 lambda r: r.read("images/x", 2)):
        with pytest.raises(PipelineError, match=checksum) as caught:
            read(Priors(tmp_path / "z.zarr", cache_bytes=2**20))
        assert "\n" not in str(caught.value)
    index = 16 * 8 + 4
    zstd.write_bytes(b"\xab" * (len(whole) - index) + whole[-index:])  # chunks overwritten, the index intact
    with pytest.raises(PipelineError, match=r"images/x is unreadable \(RuntimeError: Zstd decompression"):
        Priors(tmp_path / "z.zarr").read_rows("images/x", [0])
    (tmp_path / "z.zarr/images/x/zarr.json").write_text("{")
    with pytest.raises(PipelineError, match=r"array images/x is unreadable \(JSONDecodeError"):
        Priors(tmp_path / "z.zarr").read("images/x")
    (tmp_path / "z.zarr/zarr.json").write_text("{")
    with pytest.raises(PipelineError, match=r"z\.zarr is unreadable \(JSONDecodeError.*STAGE=priors$"):
        Priors(tmp_path / "z.zarr")
    with pytest.raises(IndexError):  # a request out of range is no damage
        Priors(store).read("images/x", 99)


def test_a_damaged_shard_keeps_its_fields_across_processes(tmp_path):
    import pickle

    from pipeline.core.shard_rows import DamagedShard

    again = pickle.loads(pickle.dumps(DamagedShard(tmp_path / "c/0", "row 3 is cut short")))
    assert (again.file, again.detail, str(again)) == (tmp_path / "c/0", "row 3 is cut short",
                                                      f"{tmp_path / 'c/0'}: row 3 is cut short")


def _fails(i: int) -> int:
    raise PipelineError("x.zarr: array y is unreadable (...): the store is damaged")


def test_an_error_of_a_loader_worker_process_is_one_line():
    """torch re-raises a DataLoader worker's PipelineError with the worker's traceback in its message;
    the stage prints the original line."""
    from pipeline.core.errors import one_line
    from pipeline.fewshot.data import prefetched

    with pytest.raises(PipelineError) as caught:
        list(prefetched(_fails, 2, workers=1))
    assert "\n" in str(caught.value)
    assert one_line(caught.value) == "x.zarr: array y is unreadable (...): the store is damaged"
    assert one_line(PipelineError("a: b")) == "a: b"
