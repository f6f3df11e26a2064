"""``lfss-segment``: masks of your own images for a class name, with a trained fold.

    lfss-segment --class star --support s1.jpg --query photos/ --out out/
    lfss-segment --class star --support s1.jpg s2.jpg --support-mask m1.png m2.png --query q.jpg --out out/

Bad input (an unreadable image, a mask count or size that does not fit, an empty or over-long
class name, a checkpoint from another CLIP, a missing run directory, an ``--out`` folder of other
files) is one line ``error: ...`` and status 1. Ctrl-C (SIGINT) or SIGTERM stops it with one line
and status 130. Either way nothing is left half-written: the outputs are built in a staging folder
and renamed onto ``--out`` when complete (:func:`~pipeline.segment.outputs.staged`).
"""

from __future__ import annotations

import argparse
import itertools
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.core.errors import PipelineError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def query_files(items: Sequence[str]) -> list[str]:
    """Files as given; a folder: its images (by suffix, sorted, not recursive)."""
    out: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                kinds = ", ".join(sorted(IMAGE_SUFFIXES))
                raise PipelineError(f"{path}: a query folder with no images ({kinds})")
            out += [str(p) for p in found]
        elif path.is_file():
            out.append(str(path))
        else:
            raise PipelineError(f"{path}: unreadable image (no such file or folder)")
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lfss-segment", description=(
        "Segment images of a class given by name with a trained LFSS fold: supports without masks "
        "get language-guided pseudo-masks (MaskCLIP + refiner, as in training), or give one mask each."))
    p.add_argument("--class", dest="class_name", required=True, metavar="NAME",
                   help="the class to segment (any name; outside the run's vocabulary it is added to it)")
    p.add_argument("--support", nargs="+", required=True, metavar="IMAGE", help="one or more support images")
    p.add_argument("--support-mask", nargs="+", metavar="MASK",
                   help="one binary mask per support (nonzero = foreground): standard few-shot")
    p.add_argument("--query", nargs="+", required=True, metavar="PATH",
                   help="query images or folders of them")
    p.add_argument("--out", required=True, help="output folder (masks, overlays, summary.json, index.html); "
                   "an earlier output there is replaced, a folder of other files refused")
    p.add_argument("--run", default=".", help="the run directory: params.yaml, data/ (default: %(default)s)")
    p.add_argument("--fold", type=int, default=0, help="the fold whose model to use (default: %(default)s)")
    p.add_argument("--model", help="a fold checkpoint (default: <run>/data/models/fold<fold>/model.pt)")
    p.add_argument("--batch-size", type=int, default=16, help="queries per forward (default: %(default)s)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="(default: cuda when present)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's, one per core; on a machine "
                   "shared with other jobs 1 is much faster: see docs/operations.md)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    handled = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
    previous = {sig: signal.signal(sig, _interrupt) for sig in handled}
    try:
        return run(args)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        by = exc.args[0] if exc.args else "SIGINT"
        print(f"lfss-segment: stopped by {by}; nothing written ({args.out} is as it was)", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run(args: argparse.Namespace) -> int:
    """The command, its arguments parsed; raises :class:`PipelineError` for bad input."""
    from pipeline.segment.outputs import OutputWriter, check_replaceable, staged
    from pipeline.segment.segmenter import Segmenter

    if not " ".join(args.class_name.split()):
        raise PipelineError("--class: an empty class name")
    if args.batch_size < 1:
        raise PipelineError(f"--batch-size = {args.batch_size}: must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise PipelineError("--device cuda: no CUDA device here")
    if args.threads is not None:
        if args.threads < 1:
            raise PipelineError(f"--threads = {args.threads}: must be at least 1")
        torch.set_num_threads(args.threads)
    queries = query_files(args.query)
    inputs = [*queries, *args.support, *(args.support_mask or [])]
    check_replaceable(Path(args.out), inputs)  # before any work: a folder of other files is refused
    segmenter = Segmenter.from_run(args.run, fold=args.fold, model=args.model, device=args.device,
                                   batch_size=args.batch_size)
    batches = -(-len(queries) // args.batch_size)

    def progress(it):
        return tqdm(it, total=batches, desc="lfss-segment", unit="batch", file=sys.stderr)

    parts = segmenter.segment_batches(queries, args.class_name, args.support, args.support_mask,
                                      progress=None if args.no_progress else progress)
    first = next(parts)  # every image checked, nothing written yet
    with staged(Path(args.out), inputs) as folder:
        writer = OutputWriter(folder)
        for part in itertools.chain([first], parts):
            writer.add(part)  # one batch at a time: memory does not grow with the queries
        summary = writer.finish(segmenter, args.support_mask)
    fg = [q["foreground_fraction"] for q in summary["queries"]]
    print(f"lfss-segment: {len(fg)} queries of {summary['class']!r} ({summary['support_masks']} supports), "
          f"mean foreground {100 * sum(fg) / len(fg):.1f}%: {Path(args.out) / 'index.html'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
