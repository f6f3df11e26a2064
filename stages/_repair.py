"""``make repair STAGE=<name>``: rebuild a stage's outputs *and* the DVC cache objects behind them.

Why: DVC links the workspace's outputs to its cache (``cache.type = hardlink,...``), so a write
into an output file after its run -- a shard truncated or overwritten in place -- changes the
cache object too. ``dvc repro -f`` alone then rewrites the workspace but keeps the bad object
(DVC does not re-store an object it already has), and a later ``dvc checkout`` or ``dvc push``
brings the bad bytes back. So this:

1. checks every cache object of the stage's outputs recorded in ``dvc.lock`` (each file of a
   folder output): an object whose md5 is not its name is damaged and removed;
2. runs ``dvc repro -f -s <stage>`` (the stage again: its outputs are rewritten and stored in the
   cache anew, the removed objects included);
3. runs ``dvc checkout --relink <stage>`` (the re-run leaves copies beside objects the cache
   already had: links again, so the store costs its size once) and checks the objects again.

Usage: ``python -m stages._repair priors`` (what ``make repair STAGE=priors`` runs; the one-line
error of a damaged store names that command: :func:`pipeline.core.errors.repair_command`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline.core.errors import PipelineError


def cache_objects(repo: Path, stage: str) -> tuple[Path, list[tuple[str, Path]]]:
    """The cache folder of ``repo`` and ``(md5, object path)`` of every file of ``stage``'s outputs
    as ``dvc.lock`` records them (none for a stage never run)."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(repo)) as dvc:
            odb = dvc.cache.local
            stages = dvc.stage.collect(stage)
            oids = [out.hash_info.value for found in stages for out in found.outs
                    if out.use_cache and out.hash_info and out.hash_info.value]
    except DvcException as exc:
        raise PipelineError(f"make repair STAGE={stage}: {exc}") from None
    objects = []
    for oid in oids:
        if not oid.endswith(".dir"):
            objects.append((oid, Path(odb.oid_to_path(oid))))
            continue
        try:  # a folder: its listing, one {md5, relpath} per file
            entries = json.loads(Path(odb.oid_to_path(oid)).read_text())
        except (OSError, ValueError):
            continue  # not in the cache: the re-run stores it
        objects += [(e["md5"], Path(odb.oid_to_path(e["md5"]))) for e in entries]
    return Path(odb.path), objects


def _md5(path: Path) -> str | None:
    try:
        with path.open("rb") as f:
            return hashlib.file_digest(f, "md5").hexdigest()
    except FileNotFoundError:
        return None


def damaged_objects(objects: Sequence[tuple[str, Path]], workers: int = 4) -> list[Path]:
    """The objects present whose content's md5 is not their name (hashed ``workers`` at a time)."""
    with ThreadPoolExecutor(workers) as pool:  # hashlib releases the GIL on large reads
        found = list(pool.map(_md5, [path for _, path in objects]))
    return [path for (md5, path), got in zip(objects, found, strict=True) if got is not None and got != md5]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages._repair", description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", help="the DVC stage whose outputs to rebuild (e.g. priors, train@0)")
    stage = parser.parse_args(argv).stage
    dvc = [sys.executable, "-m", "dvc"]
    try:
        cache, objects = cache_objects(Path.cwd(), stage)
        bad = damaged_objects(objects)
        for path in bad:
            path.unlink()
        print(f"repair {stage}: {len(bad)} of {len(objects)} cache objects damaged, removed"
              + "".join(f"\n  {p.relative_to(cache)}" for p in bad[:10]), file=sys.stderr)
        for command in (["repro", "-f", "-s", stage], ["checkout", "--relink", stage]):
            if subprocess.run([*dvc, *command]).returncode:
                raise PipelineError(f"repair {stage}: `dvc {' '.join(command)}` failed (its error is above)")
        still = damaged_objects(cache_objects(Path.cwd(), stage)[1])
        if still:
            raise PipelineError(f"repair {stage}: {still[0]} is still damaged after the re-run")
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"repair {stage}: outputs rebuilt, cache objects verified", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
