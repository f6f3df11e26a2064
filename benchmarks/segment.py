"""``lfss-segment`` against ``evaluate@k`` on the same episodes, and its throughput.

Per fold: the first ``--queries`` episodes of each novel class of the fold's 1-shot test manifest
(``test/fold{k}/shot1_seed0``), each with its one support, text-only (the supports' masks are
the language-guided pseudo-masks the segmenter makes). For those episodes:

* ``segment_miou``: the segmenter's masks (one ``Segmenter.segment`` call per episode: its query
  and its support), scored with the pipeline's meter (FSS mIoU over the fold's novel classes);
* ``evaluate_miou``: evaluate@k's predictions of the same episodes, through its own code
  (:func:`pipeline.segment.compare.evaluate_episodes`: stored features, priors, pseudo-masks);
* ``pixel_agreement``: the fraction of pixels where both masks agree;
* ``episodes_per_s``: queries per second of the per-episode calls (priors, backbone and
  pseudo-masks of the support included: every call starts from image files);
* ``batched_queries_per_s``: one call per class, its ``--queries`` queries with the first
  episode's support (as the command runs on a folder), batch ``--batch-size``.

Run after ``make repro``, from the repository root: ``.venv/bin/python benchmarks/segment.py
--run . --threads 2`` (the run directory is only read). Writes ``--out`` (JSON) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.core.metrics import FewShotMeter, binary_target
from pipeline.datasets.episodes import read_manifests
from pipeline.segment.compare import evaluate_episodes
from pipeline.segment.run import RunDir
from pipeline.segment.segmenter import Segmenter


def chosen_rows(run: RunDir, manifest: str, per_class: int) -> list[int]:
    """The first ``per_class`` episodes of each class of ``manifest`` (manifest rows, in order)."""
    table = read_manifests(run.root / "data" / "episodes")[manifest]
    return sorted(int(r) for c in sorted(set(table["class_id"]))
                  for r in table.index[table["class_id"] == c][:per_class])


def fold_figures(run: RunDir, fold: int, per_class: int, batch_size: int) -> dict:
    manifest = f"test/fold{fold}/shot1_seed0"
    rows = chosen_rows(run, manifest, per_class)
    ref = evaluate_episodes(run, fold, manifest, rows)
    classes = sorted(set(ref.episodes["class_id"].tolist()))
    seg = Segmenter.from_run(run.root, fold=fold, device="cpu", batch_size=batch_size)
    names, paths = run.class_names(), dict(zip(run.index().image_id, run.index().image_path, strict=True))
    meter, agree, pixels = FewShotMeter(len(names)), 0, 0
    start = time.perf_counter()
    masks = []
    for _, episode in ref.episodes.iterrows():
        got = seg.segment([paths[episode["query"]]], names[episode["class_id"] - 1],
                          [paths[s] for s in episode["supports"]])
        masks.append(got.predictions[0].mask)
    per_episode_s = time.perf_counter() - start
    for j, (mask, episode) in enumerate(zip(masks, ref.episodes.itertuples(), strict=True)):
        label, c = ref.labels[j], torch.tensor([episode.class_id])
        meter.update(torch.from_numpy(mask)[None], binary_target(torch.from_numpy(label)[None], c), c)
        agree += int((mask == (ref.probabilities[j] >= 0.5)).sum())
        pixels += mask.size
    start = time.perf_counter()
    batched = 0
    for c in classes:
        episodes = ref.episodes[ref.episodes["class_id"] == c]
        batched += len(seg.segment([paths[q] for q in episodes["query"]], names[c - 1],
                                   [paths[episodes["supports"].iloc[0][0]]]).predictions)
    batched_s = time.perf_counter() - start
    return {"fold": fold, "manifest": manifest, "episodes": len(rows), "classes": classes,
            "segment_miou": round(meter.miou(classes), 2), "evaluate_miou": round(ref.meter.miou(classes), 2),
            "pixel_agreement": round(agree / pixels, 6),
            "episodes_per_s": round(len(rows) / per_episode_s, 2),
            "batched_queries_per_s": round(batched / batched_s, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default=".", help="the run directory (default: %(default)s)")
    p.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--queries", type=int, default=20, help="episodes per novel class (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default="segment_benchmark.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run = RunDir.open(args.run)
    rows = []
    for k in args.folds:
        rows.append(fold_figures(run, k, args.queries, args.batch_size))
        print(json.dumps(rows[-1]), flush=True)  # each fold as it ends (a long run keeps what it did)
    mean = {key: round(float(np.mean([r[key] for r in rows])), 2)
            for key in ("segment_miou", "evaluate_miou", "episodes_per_s", "batched_queries_per_s")}
    mean["pixel_agreement"] = round(float(np.mean([r["pixel_agreement"] for r in rows])), 6)
    result = {"folds": rows, "mean": mean, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("| fold | episodes | segment mIoU | evaluate mIoU | pixels agreeing | episodes/s "
          "| batched queries/s |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    for r in [*rows, {"fold": "mean", "episodes": sum(r["episodes"] for r in rows), **mean}]:
        print(f"| {r['fold']} | {r['episodes']} | {r['segment_miou']:.2f} | {r['evaluate_miou']:.2f} | "
              f"{100 * r['pixel_agreement']:.3f}% | {r['episodes_per_s']:.2f} "
              f"| {r['batched_queries_per_s']:.2f} |")
    print(f"torch threads {result['threads']}, {result['cpus']} CPUs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
