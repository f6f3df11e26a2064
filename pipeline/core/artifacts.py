"""Atomic, resumable artifact directories.

A stage builds its output in a *staging* directory beside the final path
(``data/.index.partial`` for ``data/index``) and renames it into place only when complete,
so an interrupted stage never leaves a half artifact that DVC could take for a finished one.
Work inside is split into shards, each finished by an explicit ``.done`` marker that records
the size and sha256 of the files the shard wrote: a re-run with the same fingerprint (the params
that decide the content) skips finished shards whose files are intact, redoes one whose files
changed since (truncated, overwritten, deleted), and a different fingerprint starts over.

Also here: JSON written atomically, the read-only opening every store reader shares
(:func:`open_store`), and the git state provenance records (:func:`git_state`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.core.errors import PipelineError, damaged
from pipeline.core.shard_rows import DamagedShard, ShardRows

# A staging folder's bookkeeping (.done/, .fingerprint) sits beside its Zarr arrays, and zarr warns
# that each is "not recognized" whenever it lists the members: ignored here, for good (a
# catch_warnings block is not thread-safe, and shard tasks list members while others run).
warnings.filterwarnings("ignore", message=r"Object at \.", category=zarr.errors.ZarrUserWarning)

_FINGERPRINT = ".fingerprint"


def fingerprint(config: Any) -> str:
    """A stable hash of a JSON-able description of what the artifact will contain."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class Staging:
    """The staging directory of one artifact.

    Usage::

        staging = Staging(Path("data/index"), fingerprint(cfg))
        for shard in staging.pending(shards, files):  # skips shards finished by an earlier run
            write(staging.path, shard); staging.mark_done(shard, files(shard))
        staging.commit()                               # atomic rename into data/index

    ``files(shard)``: the files a shard writes (paths inside the staging folder).
    """

    def __init__(self, final: Path, fingerprint: str) -> None:
        self.final = Path(final)
        self.path = self.final.with_name(f".{self.final.name}.partial")
        marker = self.path / _FINGERPRINT
        with _one_line(self.final):
            if self.path.exists() and (not marker.exists() or marker.read_text() != fingerprint):
                remove_tree(self.path)  # left by a run with other params: start over
            self.path.mkdir(parents=True, exist_ok=True)
            marker.write_text(fingerprint)

    def _marker(self, shard: str) -> Path:
        return self.path / ".done" / shard

    def is_done(self, shard: str) -> bool:
        """Finished, and every file it wrote still has the size and sha256 recorded then. A shard
        whose files changed since is not: its marker and recorded files go, and it is redone."""
        marker = self._marker(shard)
        if not marker.exists():
            return False
        try:
            record = json.loads(marker.read_text() or "{}")  # empty: a marker without files
        except json.JSONDecodeError:
            record = {"": "unreadable marker"}
        changed = [name for name, digest in record.items() if file_digest(self.path / name) != digest]
        if not changed:
            return True
        print(f"{self.final}: shard {shard}: {changed[0] or marker} changed since it was finished "
              "(truncated or overwritten): recomputing it", file=sys.stderr)
        for name in [n for n in record if n]:
            (self.path / name).unlink(missing_ok=True)
        marker.unlink()
        return False

    def mark_done(self, shard: str, files: Iterable[Path] = ()) -> None:
        """Mark ``shard`` finished, recording the size and sha256 of the ``files`` it wrote (inside
        the staging folder; one that does not exist is recorded as absent)."""
        record = {str(Path(f).relative_to(self.path)): file_digest(Path(f)) for f in files}
        marker = self._marker(shard)
        marker.parent.mkdir(exist_ok=True)
        tmp = marker.with_name(f"{marker.name}.tmp")
        tmp.write_text(json.dumps(record, sort_keys=True))
        os.replace(tmp, marker)

    def pending(self, shards: Iterable[str],
                files: Callable[[str], Iterable[Path]] | None = None) -> list[str]:
        """The shards not finished; with ``files``, what an unfinished one may have half written is
        removed first (a file cut short by a crash is never read back)."""
        todo = [s for s in shards if not self.is_done(s)]
        for shard in todo if files else ():
            for path in files(shard):
                Path(path).unlink(missing_ok=True)
        return todo

    def commit(self) -> Path:
        """Drop the bookkeeping and rename the staging directory onto the final path. The
        previous output goes to ``.<name>.old`` first and is removed last; one left behind by a
        crashed run (read-only, as DVC leaves its outputs) is removed, never in the way."""
        with _one_line(self.final):
            remove_tree(self.path / ".done")
            (self.path / _FINGERPRINT).unlink()
            trash = self.final.with_name(f".{self.final.name}.old")
            remove_tree(trash)
            if self.final.exists() or self.final.is_symlink():
                os.replace(self.final, trash)
            os.replace(self.path, self.final)
            remove_tree(trash)
        return self.final


class _one_line:
    """Turn an OSError while writing ``final`` into a one-line :class:`PipelineError`."""

    def __init__(self, final: Path) -> None:
        self.final = final

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: object) -> bool:
        if isinstance(exc, OSError):
            raise PipelineError(f"cannot write {self.final}: {exc.strerror or exc} "
                                f"({exc.filename or self.final})") from None
        return False


def file_digest(path: Path) -> list | None:
    """``[size, sha256]`` of the file ``path``; None when there is none."""
    try:
        with path.open("rb") as f:
            return [os.fstat(f.fileno()).st_size, hashlib.file_digest(f, "sha256").hexdigest()]
    except FileNotFoundError:
        return None


def read_verified(path: Path, sidecar: Path, missing: str, damaged: str) -> tuple[bytes, str]:
    """The bytes of ``path`` and their sha256, once it equals the one recorded in ``sidecar`` (its
    first word). One line otherwise: ``missing`` says what makes the files, ``damaged`` what to do."""
    try:
        blob = path.read_bytes()
        expected = sidecar.read_text().split()[0]
    except FileNotFoundError as exc:
        raise PipelineError(f"{exc.filename}: missing ({missing})") from None
    sha = hashlib.sha256(blob).hexdigest()
    if sha != expected:
        raise PipelineError(f"{path}: sha256 {sha[:12]}… differs from {sidecar.name} ({expected[:12]}…): "
                            f"{damaged}")
    return blob, sha


def zarr_shard_files(root: Path, index: int, arrays: Iterable[str] | None = None) -> list[Path]:
    """The files holding Zarr shard ``index`` (along the first axis) of each of ``arrays`` (default:
    every array) of the Zarr group at ``root``; a shard whose chunks all equal the fill value has
    no file."""
    group = zarr.open_group(root, mode="r")
    if arrays is None:
        members = group.members(max_depth=None)
        arrays = [name for name, member in members if isinstance(member, zarr.Array)]
    names = sorted(arrays)
    files = []
    for name in names:
        array = group[name]
        files.append(Path(root) / name / array.metadata.encode_chunk_key((index,) + (0,) * (array.ndim - 1)))
    return files


def remove_tree(path: Path) -> None:
    """Remove the folder ``path`` if it exists, even one left read-only (as DVC protects its
    outputs): its folders are made writable first (files keep their modes: they may be links
    into DVC's cache), so nothing a crashed run left can block the next."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        path.unlink()
        return

    def writable(folder: str) -> None:
        if not os.path.islink(folder):
            os.chmod(folder, os.stat(folder).st_mode | stat.S_IRWXU)

    writable(str(path))
    for root, folders, _ in os.walk(path):
        for folder in folders:
            writable(os.path.join(root, folder))
    shutil.rmtree(path)


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` then rename ``tmp`` onto ``path`` (a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj: Any) -> None:
    """Write pretty, key-sorted JSON atomically (stable bytes for DVC)."""
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))


def git_state(root: Path = Path("."), ignore: Sequence[str] = ()) -> tuple[str, bool] | None:
    """HEAD's full hash and whether tracked files other than ``ignore`` differ from it (for
    provenance); None outside a git checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        exclude = [f":(exclude){path}" for path in ignore]
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *exclude],
                               cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit, bool(dirty)


def open_store(path: Path, stage: str) -> zarr.Group:
    """The Zarr store at ``path`` opened read-only; missing: one line naming the stage that writes
    it; unreadable (its metadata damaged): one line naming the command that repairs it."""
    try:
        return zarr.open_group(Path(path), mode="r")
    except FileNotFoundError:
        raise PipelineError(f"{path}: missing (run the {stage} stage)") from None
    except (ValueError, OSError) as exc:  # zarr.json cut short or overwritten, unreadable file
        raise damaged(path, None, _first_line(exc), stage) from None


def _first_line(exc: BaseException) -> str:
    """``Type: message`` of ``exc``, its message's first line only (at most 160 characters)."""
    text = (str(exc).strip().splitlines() or [""])[0][:160]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def read_rows(array: zarr.Array, rows: Sequence[int] | np.ndarray) -> np.ndarray:
    """``(len(rows), ...)`` rows of ``array``, in the order asked (repeats allowed), read as one
    slice per run of consecutive rows. Zarr's ``oindex`` is not used: on a sharded array with
    large chunks (3.8 MB feature rows) it took 46x the time and 16x the memory (5.9 GB to read
    20 rows, zarr 3.1)."""
    rows = np.asarray(rows, dtype=np.int64)
    unique, inverse = np.unique(rows, return_inverse=True)
    if not len(unique):
        return np.empty((0, *array.shape[1:]), dtype=array.dtype)
    runs = np.split(unique, np.flatnonzero(np.diff(unique) != 1) + 1)
    return np.concatenate([array[int(run[0]): int(run[-1]) + 1] for run in runs])[inverse]


class StoreReader:
    """Read-only access to one Zarr store whose arrays have one row per item on their first axis.

    :meth:`read_rows` reads only the rows asked for (memory in proportion to the request, at any
    store size), except that an array is read whole once and kept when it fits what is left of
    ``cache_bytes`` (far faster than many row selections on a small store such as the embedded
    benchmark's). Subclasses name the ``stage`` that writes the store.

    Every read of an array goes through :meth:`checked` (:meth:`read`, :meth:`read_rows`,
    :meth:`cached`): a store found damaged -- a shard file cut short or overwritten after its stage
    ran, which zarr reports as a checksum or decoding error -- is one :class:`PipelineError` line
    naming the store, the array and the command that repairs it (:func:`~pipeline.core.errors.damaged`),
    in whatever thread or process the read ran. (A *missing* chunk or shard file is not an error
    to zarr: it reads as the fill value, as the writers leave chunks that hold nothing else.)
    """

    stage: str = ""

    def __init__(self, path: Path, *, cache_bytes: int = 0) -> None:
        self.path = Path(path)
        self.root = open_store(path, self.stage)
        self.attrs = dict(self.root.attrs)
        self.cache_bytes = cache_bytes
        self._whole: dict[str, np.ndarray] = {}
        self._direct: dict[str, ShardRows | None] = {}

    @contextmanager
    def checked(self, name: str) -> Iterator[None]:
        """Reads of array ``name`` inside: a failure of the stored bytes (not of the request: a row
        out of range stays an IndexError) becomes the one line of a damaged store."""
        try:
            yield
        except DamagedShard as exc:
            folder = self.path / name
            file = exc.file.relative_to(folder) if exc.file.is_relative_to(folder) else exc.file
            raise damaged(self.path, name, f"shard file {file}: {exc.detail}", self.stage) from None
        except (PipelineError, IndexError):
            raise
        except (ValueError, RuntimeError, OSError, KeyError) as exc:
            # zarr: "Stored and computed checksum do not match" (ValueError), a codec's decoding
            # error (RuntimeError), unreadable metadata (JSONDecodeError), a file gone or unreadable
            raise damaged(self.path, name, _first_line(exc), self.stage) from None

    def read(self, name: str, selection: Any = slice(None)) -> np.ndarray:
        """``array[selection]`` of array ``name``, read by zarr (:meth:`checked`)."""
        with self.checked(name):
            return self.root[name][selection]

    def cached(self, name: str) -> np.ndarray | None:
        """Array ``name`` held in memory (read now if it fits the budget), or None."""
        if name not in self._whole:
            with self.checked(name):
                array = self.root[name]
                if array.nbytes > self.cache_bytes - sum(a.nbytes for a in self._whole.values()):
                    return None
                self._whole[name] = array[:]
        return self._whole[name]

    def read_rows(self, name: str, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """``(len(rows), ...)`` rows of array ``name``, in the order asked (repeats allowed): from
        memory, straight from the shard files for raw one-row chunks
        (:class:`~pipeline.core.shard_rows.ShardRows`), else by zarr."""
        rows = np.asarray(rows, dtype=np.int64)
        whole = self.cached(name)
        if whole is not None:
            return whole[rows]
        with self.checked(name):
            if name not in self._direct:
                self._direct[name] = ShardRows.of(self.root[name])
            direct = self._direct[name]
            return read_rows(self.root[name], rows) if direct is None else direct.read(rows)
