"""``python -m stages._remote push|pull [DVC ARGS ...]`` (``make push``, ``make pull``): ``dvc push``
or ``dvc pull``, once the DVC remote they use is known to be there.

Without a remote DVC says "Everything is up to date" (or nothing useful) before its error, and a
local remote whose folder is missing (a disk not mounted, a path mistyped) makes ``dvc pull`` print
thousands of lines without saying so. Checked first, in about half a second, each is one line
saying how to fix it and exit status 1, and DVC is not started: no remote set (add one:
docs/operations.md#disk-and-sharing-the-dvc-cache-and-remotes), a remote name that is not
configured, a local remote whose folder does not exist (for ``push``: nor its parent, since a push
creates the folder itself).
Remote URLs with a scheme (``s3://``, ``ssh://``, ...) are left to DVC.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from pipeline.core.errors import PipelineError

HOW_TO_ADD = ("add one with `dvc remote add -d NAME URL` (a folder, s3://..., ssh://...; "
              "docs/operations.md#disk-and-sharing-the-dvc-cache-and-remotes)")


def local_folder(url: str) -> Path | None:
    """The folder of a local remote's ``url`` (a path, or ``file://``), else None."""
    if url.startswith("file://"):
        return Path(url.removeprefix("file://"))
    return None if "://" in url else Path(url)


def check_remote(action: str, name: str | None = None) -> str:
    """The remote ``dvc push``/``dvc pull`` would use (``name``, else the default), once it is
    configured and, for a local one, its folder exists (``push``: or its parent); one
    :class:`PipelineError` line otherwise. Returns its name."""
    from dvc.config import Config, ConfigError
    from dvc.exceptions import NotDvcRepoError

    try:
        config = Config.from_cwd()
    except NotDvcRepoError:
        raise PipelineError(f"{Path.cwd()}: not a DVC repository (run make {action} from the project "
                            "root)") from None
    except ConfigError as exc:
        raise PipelineError(f".dvc/config: {str(exc).splitlines()[0]}") from None
    remotes = config.get("remote", {})
    name = name or config.get("core", {}).get("remote")
    if not name:
        raise PipelineError(f"no DVC remote set to {action} {'to' if action == 'push' else 'from'}: "
                            f"{HOW_TO_ADD}")
    if name not in remotes:
        known = ", ".join(sorted(remotes)) or "none"
        raise PipelineError(f"DVC remote {name!r}: not configured (known: {known}); {HOW_TO_ADD}")
    folder = local_folder(str(remotes[name].get("url", "")))
    if folder is not None and not folder.is_dir():
        if action == "pull" or not folder.parent.is_dir():
            missing = folder if action == "pull" else folder.parent
            raise PipelineError(f"DVC remote {name!r}: folder {missing} does not exist (a disk not mounted? "
                                f"a mistyped path? `dvc remote modify {name} url URL` points it elsewhere)")
    return name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages._remote", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("push", "pull"))
    parser.add_argument("-r", "--remote", help="the remote to use (default: DVC's default remote)")
    args, rest = parser.parse_known_args(argv)
    try:
        name = check_remote(args.action, args.remote)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return subprocess.call([sys.executable, "-m", "dvc", args.action, "-r", name, *rest])


if __name__ == "__main__":
    raise SystemExit(main())
