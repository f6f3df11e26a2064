"""Rows of a sharded Zarr 3 array read from and written to its shard files directly.

The stores' large arrays (backbone features, 7.7 MB a row for ResNet-50 at 400 px; the VVP
tokens) keep one row per inner chunk and store it raw (``bytes`` codec only): such a row is one
contiguous byte range of its shard file, which the shard's index locates (the Zarr 3 sharding
codec: at the file's end, ``(offset, nbytes)`` as little-endian uint64 per inner chunk, then a
crc32c of the index). :class:`ShardRows` reads those ranges with ``readinto`` into the result:
0.66 ms a 7.7 MB row from the page cache, where zarr's own path took 3.1 ms raw and 7.9 ms
zstd-compressed (``benchmarks/throughput.py``: the feeds of training, evaluation and the
pseudo-masks are bound by these reads). :func:`write_shard` writes a whole shard of such an
array as one file (its rows, then the index and its checksum), 7x faster than zarr's assembling
of the same bytes (29 ms a 7.7 MB row); zarr reads the result as its own. Arrays laid out
otherwise are read and written by zarr.

A shard of features is hundreds of MB written once and read later, so where the filesystem allows
it the rows go to disk with ``O_DIRECT`` from a page-aligned buffer (:func:`aligned_zeros`):
through the page cache the host copied every byte and was held back by the kernel's dirty-page
throttling (2–21 ms of CPU a 7.7 MB row on a shared VM), where a direct write costs ~0.1 ms of
CPU and runs at the disk's speed, without evicting the page cache that readers of other stores
rely on. The bytes written are the same either way.
"""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

import google_crc32c
import numpy as np
import zarr

from pipeline.core.errors import PipelineError

MISSING = 2**64 - 1  # an index entry of an inner chunk never written (equal to the fill value)
RAW_ROWS = {"compressors": None}  # create_array options of an array ShardRows can read
BLOCK = 4096  # O_DIRECT's alignment of addresses, offsets and sizes (any logical block size up to 4 KiB)
DIRECT_MIN = 16 << 20  # rows of a shard below this many bytes go through the page cache


class DamagedShard(PipelineError):
    """A shard file that is not what its writer wrote (cut short, its index overwritten): ``file``
    and what is wrong with it (``detail``). A store reader words it with the store and array
    (:func:`pipeline.core.errors.damaged`)."""

    def __init__(self, file: Path, detail: str) -> None:
        super().__init__(f"{file}: {detail}")
        self.file, self.detail = file, detail

    def __reduce__(self) -> tuple:  # pickled by a worker process: rebuilt from both fields
        return type(self), (self.file, self.detail)


def aligned_zeros(shape: tuple[int, ...], dtype: np.dtype | str) -> np.ndarray:
    """A zero-filled C-contiguous array at a page-aligned address (anonymous memory), so that
    :func:`write_shard` can hand it to the disk without a copy."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if nbytes == 0:
        return np.zeros(shape, dtype)
    return np.frombuffer(mmap.mmap(-1, nbytes), dtype, count=int(np.prod(shape))).reshape(shape)


def _write_direct(path: Path, data: memoryview) -> int:
    """Write the longest block-aligned prefix of ``data`` to a new file ``path`` with
    ``O_DIRECT``; returns the bytes written (0: not possible here, nothing written)."""
    flag = getattr(os, "O_DIRECT", 0)
    size = len(data) - len(data) % BLOCK
    address = np.frombuffer(data, np.uint8).ctypes.data if len(data) else 1
    if not flag or size < DIRECT_MIN or address % BLOCK:
        return 0
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flag, 0o644)
    except OSError as error:  # e.g. tmpfs: no direct I/O
        if error.errno == errno.EINVAL:
            return 0
        raise
    done = 0
    try:
        while done < size:
            done += os.write(fd, data[done: min(size, done + (1 << 30))])
    except OSError as error:
        if error.errno != errno.EINVAL:
            raise
        done = 0  # refused part-way (a misaligned partial write): write it all again, buffered
    finally:
        os.close(fd)
    return done


def _checksum(index: bytes) -> bytes:
    """The crc32c the sharding codec stores after a shard's index (little-endian uint32)."""
    return np.uint32(google_crc32c.value(index)).astype("<u4").tobytes()


class ShardRows:
    """Direct reads of whole rows of ``array`` (see the module docstring); build with :meth:`of`."""

    def __init__(self, folder: Path, shard: int, row_shape: tuple[int, ...], dtype: np.dtype,
                 fill_value: float, dims: int) -> None:
        self.folder, self.shard, self.row_shape, self.dtype = folder, shard, row_shape, dtype
        self.fill_value, self.dims = fill_value, dims
        self.row_bytes = int(np.prod(row_shape)) * dtype.itemsize
        self._index: dict[int, np.ndarray | None] = {}

    @classmethod
    def of(cls, array: zarr.Array) -> ShardRows | None:
        """The direct reader of ``array``, or None when it is not a local array of raw one-row
        inner chunks sharded along its first axis only."""
        meta = array.metadata.to_dict()
        root = getattr(array.store, "root", None)
        codecs = meta.get("codecs", ())
        if root is None or len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
            return None
        config = codecs[0]["configuration"]
        inner, shape = tuple(config["chunk_shape"]), tuple(array.shape)
        shard = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        raw = [c["name"] for c in config["codecs"]] == ["bytes"] and all(
            c.get("configuration", {}).get("endian", "little") == "little" for c in config["codecs"])
        index_ok = ([c["name"] for c in config["index_codecs"]] == ["bytes", "crc32c"]
                    and config.get("index_location", "end") == "end")
        key = meta.get("chunk_key_encoding", {})
        if not (raw and index_ok and inner == (1, *shape[1:]) and shard[1:] == shape[1:]
                and key.get("name") == "default" and key.get("configuration", {}).get("separator") == "/"):
            return None
        dtype = np.dtype(array.dtype).newbyteorder("<")
        return cls(Path(root) / array.path, shard[0], shape[1:], dtype, meta["fill_value"], len(shape))

    def _file(self, shard: int) -> Path:
        return self.folder / "c" / str(shard) / "/".join(["0"] * (self.dims - 1))

    def _offsets(self, shard: int) -> np.ndarray | None:
        """``(shard, 2)`` offset and size of each row of ``shard`` in its file (None: no file)."""
        if shard not in self._index:
            path = self._file(shard)
            try:
                with open(path, "rb") as f:
                    f.seek(max(0, path.stat().st_size - (16 * self.shard + 4)))
                    tail = f.read()
            except FileNotFoundError:  # every row of the shard equals the fill value
                self._index[shard] = None
                return None
            index, checksum = tail[:-4], tail[-4:]
            if len(tail) != 16 * self.shard + 4 or _checksum(index) != checksum:
                raise DamagedShard(path, "its shard index does not match its checksum")
            self._index[shard] = np.frombuffer(index, "<u8").reshape(-1, 2)
        return self._index[shard]

    def read(self, rows: np.ndarray) -> np.ndarray:
        """``(len(rows), *row_shape)`` rows, in the order asked (repeats allowed)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), *self.row_shape), self.dtype)
        shards = rows // self.shard
        for shard in np.unique(shards).tolist():  # each shard's file opened once
            wanted = np.flatnonzero(shards == shard)
            index = self._offsets(shard)
            if index is None:
                out[wanted] = self.fill_value
                continue
            path = self._file(shard)
            with open(path, "rb", buffering=0) as file:
                for j in wanted.tolist():
                    offset, size = index[rows[j] - shard * self.shard]
                    if offset == MISSING:
                        out[j] = self.fill_value
                        continue
                    if int(size) != self.row_bytes:
                        raise DamagedShard(path, f"row {rows[j]} has {size} bytes, not {self.row_bytes}")
                    file.seek(int(offset))
                    if file.readinto(memoryview(out[j]).cast("B")) != self.row_bytes:
                        raise DamagedShard(path, f"row {rows[j]} is cut short")
        return out


def write_shard(array: zarr.Array, start: int, values: np.ndarray) -> None:
    """``array[start: start + len(values)] = values`` where the rows are one whole shard (the last
    may be shorter) of an array :class:`ShardRows` reads: its file written at once (to a temporary
    name, then renamed: a crash leaves no half file); otherwise through zarr."""
    direct = ShardRows.of(array)
    whole = direct is not None and start % direct.shard == 0 and (
        len(values) == direct.shard or start + len(values) == array.shape[0])
    if not whole:
        array[start: start + len(values)] = values
        return
    data = np.ascontiguousarray(values, dtype=direct.dtype)
    index = np.full((direct.shard, 2), MISSING, "<u8")
    index[: len(data), 0] = np.arange(len(data), dtype=np.uint64) * np.uint64(direct.row_bytes)
    index[: len(data), 1] = direct.row_bytes
    checksum = _checksum(index.tobytes())
    path = direct._file(start // direct.shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    rows = memoryview(data).cast("B")
    done = _write_direct(partial, rows)  # the aligned bulk, past the page cache where possible
    with open(partial, "ab" if done else "wb") as f:
        f.write(rows[done:])
        f.write(index.tobytes() + checksum)
    os.replace(partial, path)
