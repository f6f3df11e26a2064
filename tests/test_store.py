import os
import stat

import numpy as np
import pytest
import zarr

from pipeline.core.artifacts import Staging, StoreReader, fingerprint, read_rows, write_atomic, write_json
from pipeline.core.errors import PipelineError


def test_commit_is_atomic_and_replaces_the_old_artifact(tmp_path):
    final = tmp_path / "artifact"
    final.mkdir()
    (final / "old.txt").write_text("old")
    staging = Staging(final, "fp")
    (staging.path / "new.txt").write_text("new")
    assert (final / "old.txt").exists()  # untouched until commit
    staging.commit()
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert not staging.path.exists() and not list(tmp_path.glob(".*"))


def test_finished_shards_survive_a_crash_only_with_the_same_fingerprint(tmp_path):
    final = tmp_path / "artifact"
    first = Staging(final, fingerprint({"n": 1}))
    first.mark_done("a")
    (first.path / "a.bin").write_text("a")
    # "crash": no commit. Same params resume; other params start over.
    assert Staging(final, fingerprint({"n": 1})).pending(["a", "b"]) == ["b"]
    restarted = Staging(final, fingerprint({"n": 2}))
    assert restarted.pending(["a", "b"]) == ["a", "b"] and not (restarted.path / "a.bin").exists()


def test_a_finished_shard_whose_files_changed_is_redone(tmp_path, capsys):
    """A ``.done`` marker records its shard's files: one truncated, overwritten or deleted after
    it was finished makes the shard pending again (its files removed, one line said), and an
    unfinished shard's half-written files go before it is redone."""
    final = tmp_path / "artifact"
    staging = Staging(final, "fp")
    files = {s: [staging.path / f"{s}.bin", staging.path / f"{s}.absent"] for s in "abcde"}
    for shard in "abcd":
        files[shard][0].write_bytes(shard.encode() * 100)
        staging.mark_done(shard, files[shard])
    files["e"][0].write_bytes(b"half")  # a crash while writing shard e
    files["a"][0].write_bytes(b"a" * 50)  # truncated
    files["b"][0].write_bytes(b"B" * 100)  # same size, other bytes
    files["c"][1].write_bytes(b"")  # a file that was not there is now
    resumed = Staging(final, "fp")
    assert resumed.pending("abcde", files.__getitem__) == ["a", "b", "c", "e"]
    assert [p.name for p in sorted(staging.path.glob("*.bin"))] == ["d.bin"]
    err = capsys.readouterr().err.splitlines()
    changed = (("a", "bin"), ("b", "bin"), ("c", "absent"))
    assert err == [f"{final}: shard {s}: {s}.{kind} changed since it was finished (truncated or "
                   "overwritten): recomputing it" for s, kind in changed]
    assert Staging(final, "fp").pending("abcde") == ["a", "b", "c", "e"]  # d still trusted


def test_zarr_shard_files_are_the_files_a_shard_writes(tmp_path):
    from pipeline.core.artifacts import zarr_shard_files

    root = zarr.open_group(tmp_path / "s.zarr", mode="w")
    for name in ("m/x", "y"):
        root.create_array(name, shape=(10, 3), dtype="uint8", chunks=(1, 3), shards=(4, 3), fill_value=0)
    before = {p for p in (tmp_path / "s.zarr").rglob("*") if p.is_file()}
    root["m/x"][4:8] = 1
    root["y"][4:8] = 2
    written = {p for p in (tmp_path / "s.zarr").rglob("*") if p.is_file()} - before
    assert set(zarr_shard_files(tmp_path / "s.zarr", 1)) == written
    assert zarr_shard_files(tmp_path / "s.zarr", 1, ["y"]) == [tmp_path / "s.zarr/y/c/1/0"]


def test_fingerprint_is_order_independent_and_write_json_is_stable(tmp_path):
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})
    write_json(tmp_path / "x.json", {"b": 1, "a": [1, 2]})
    assert (tmp_path / "x.json").read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'


def test_a_failed_write_leaves_neither_file_nor_temporary(tmp_path):
    def half_then_crash(tmp):
        tmp.write_text("half")
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        write_atomic(tmp_path / "y.json", half_then_crash)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("cache_bytes", [0, 2**20])
def test_rows_come_in_the_order_asked_with_repeats_streamed_or_cached(tmp_path, cache_bytes):
    values = np.arange(13 * 3 * 2, dtype=np.float32).reshape(13, 3, 2)
    root = zarr.open_group(tmp_path / "s.zarr", mode="w")
    array = root.create_array("x", shape=values.shape, dtype="float32", chunks=(1, 3, 2), shards=(4, 3, 2))
    array[:] = values
    reader = StoreReader(tmp_path / "s.zarr", cache_bytes=cache_bytes)
    for rows in ([7, 2, 3, 4, 12, 2, 0], [5], list(range(13)), [12, 11, 12]):
        np.testing.assert_array_equal(reader.read_rows("x", rows), values[rows])
    assert read_rows(root["x"], []).shape == (0, 3, 2)
    assert (reader.cached("x") is not None) == bool(cache_bytes)


def test_debris_of_a_crashed_commit_never_blocks_the_next(tmp_path):
    """A `.old` left by a crashed commit (read-only folders, as DVC protects outputs) and a stale
    `.partial` are removed; the output is replaced; nothing is left beside it."""
    final = tmp_path / "splits"
    (final / "sub").mkdir(parents=True)
    cached = tmp_path / "cache"  # a DVC cache file, hardlinked into the output
    cached.write_text("old")
    cached.chmod(0o444)
    os.link(cached, final / "sub" / "a.txt")
    trash = tmp_path / ".splits.old" / "deep"
    trash.mkdir(parents=True)
    (trash / "f").write_text("x")
    for folder in (trash, trash.parent, final / "sub", final):
        folder.chmod(0o555)
    (tmp_path / ".splits.partial").mkdir()  # no fingerprint: from some other run
    staging = Staging(final, "fp")
    (staging.path / "b.txt").write_text("new")
    staging.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "splits"]
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
    assert stat.S_IMODE(cached.stat().st_mode) == 0o444  # links' files keep their modes


def test_an_output_that_cannot_be_written_is_one_line(tmp_path):
    (tmp_path / "data").write_text("a file where a folder should be")
    with pytest.raises(PipelineError) as err:
        Staging(tmp_path / "data" / "splits", "fp")
    message = str(err.value)
    assert message.startswith(f"cannot write {tmp_path / 'data' / 'splits'}: ") and "\n" not in message
