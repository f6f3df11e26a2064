"""Memory, time and disk of every stage on a real-shaped benchmark, at N and at 4N images.

The embedded benchmark is 128 px with tiny models; PASCAL-5i and COCO-20i are ~500x375 px with
CLIP ViT-B/16 at 473 px and ResNet-50 features at 400 px. This builds that shape without any
download: the synthetic generator at 432 px with mixed sizes and aspect ratios (around
500x375's area), a random-weight open_clip ViT-B-16 and a random-weight torchvision ResNet-50
saved locally, and runs the real stages (``python -m stages.<name>``, fold 0 for train and
evaluate) at N and at 4N images, each stage in a fresh process. Printed per stage: peak RSS at N
and 4N and their ratio, seconds per image, and store bytes per image; then ``memory_ratio_4x``
(the largest ratio over the stages) and the RAM / disk projected for PASCAL-5i and COCO-20i.

``--cache-gb`` is the ``orchestration.cache_gb`` the stages run under: 0 (default) reads every
store by rows, the path a dataset larger than the budget takes; peak memory must then not grow
with the dataset. The weights are random: this measures memory and throughput, not accuracy.

    .venv/bin/python benchmarks/scale.py                   # N = 64 on the CPU: ~25 min on 2 cores
    .venv/bin/python benchmarks/scale.py --images 256 --device cuda

N is at least ~64: every one of the 20 shape classes needs two images in each role of each fold.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml
import zarr

REPO = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "clip_model", "split", "episodes", "priors", "features", "pseudo_masks", "train",
          "evaluate")
MEASURED = ("priors", "features", "pseudo_masks", "train", "evaluate")
STORES = {"priors": "priors.zarr", "features": "features.zarr", "pseudo_masks": "pseudo_masks.zarr"}
# What the real benchmarks touch (docs/design.md#scale): images with priors and features, test episodes.
DATASETS = {"PASCAL-5i": {"images": 11_000, "episodes": 4 * (2 * 1000) + 4 * (4000 + 300)},
            "COCO-20i": {"images": 60_000, "episodes": 4 * (2 * 1000) + 4 * (4000 + 300)}}
# The stage inside a wrapper whose only child it is: the wrapper reports the child's peak RSS.
WRAPPER = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1:]); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
           "raise SystemExit(done.returncode)")


def save_random_models(folder: Path) -> tuple[Path, Path]:
    """A random-weight open_clip ViT-B-16 and torchvision ResNet-50, as local checkpoint files."""
    import open_clip
    import torch
    import torchvision

    folder.mkdir(parents=True, exist_ok=True)
    vit, resnet = folder / "vit-b-16-random.pt", folder / "resnet50-random.pth"
    torch.manual_seed(0)
    if not vit.exists():
        torch.save(open_clip.create_model("ViT-B-16", pretrained=None).state_dict(), vit)
    if not resnet.exists():
        torch.save(torchvision.models.resnet50().state_dict(), resnet)
    return vit, resnet


def params(n: int, vit: Path, resnet: Path, cache_gb: float) -> dict:
    """params.yaml of a run with ``n`` train and ``n`` val images at the papers' resolutions."""
    out = yaml.safe_load((REPO / "params.yaml").read_text())
    out["prepare"]["synthetic"].update(image_size=432, train_images=n, val_images=n, caption_images=0,
                                       mixed_sizes=True, shard_size=50)
    out["split"].update(min_pixels=1, novel_in_train="mask")  # every class in every role: about scale
    # test and validation manifests have a fixed size (1000 episodes in the papers), the training
    # pool grows with the images: the stores then hold every image the run has
    out["episodes"].update(test_episodes=64, val_episodes=16, train_episodes=2 * n, shots=[1], seeds=[0])
    out["clip"].update(model="ViT-B-16", pretrained=str(vit))
    out["priors"].update(image_size=473, shard_size=8, batch_size=4)
    out["backbone"].update(name="resnet50", weights=str(resnet), image_size=400)
    out["pseudo_masks"].update(batch_size=8)
    out["train"].update(epochs=1, batch_size=4, dtype="fp32")
    out["evaluate"].update(samples=2, batch_size=8)
    out["orchestration"].update(cache_gb=cache_gb)
    return out


def stage_args(stage: str, run: Path) -> list[str]:
    fold = ["--index", str(run / "index"), "--episodes", str(run / "episodes"),
            "--features", str(run / "features.zarr"), "--priors", str(run / "priors.zarr"),
            "--pseudo_masks", str(run / "pseudo_masks.zarr"), "--models", str(run / "models"), "--fold", "0"]
    return {
        "prepare": ["--synthetic", str(run / "synthetic"), "--index", str(run / "index")],
        "clip_model": ["--synthetic", str(run / "synthetic"), "--out", str(run / "clip"),
                       "--metrics", str(run / "metrics/clip.json")],
        "split": ["--index", str(run / "index"), "--out", str(run / "splits")],
        "episodes": ["--splits", str(run / "splits"), "--out", str(run / "episodes")],
        "priors": ["--index", str(run / "index"), "--episodes", str(run / "episodes"), "--clip",
                   str(run / "clip"), "--out", str(run / "priors.zarr"),
                   "--preview", str(run / "preview.png")],
        "features": ["--index", str(run / "index"), "--episodes", str(run / "episodes"), "--clip",
                     str(run / "clip"), "--out", str(run / "features.zarr")],
        "pseudo_masks": ["--index", str(run / "index"), "--episodes", str(run / "episodes"), "--priors",
                         str(run / "priors.zarr"), "--features", str(run / "features.zarr"),
                         "--out", str(run / "pseudo_masks.zarr"), "--metrics", str(run / "metrics/pm.json")],
        "train": [*fold, "--plots", str(run / "plots")],
        "evaluate": [*fold, "--metrics", str(run / "metrics"), "--predictions", str(run / "predictions"),
                     "--splits", str(run / "splits")],
    }[stage]


def run_stage(stage: str, run: Path, env: dict) -> tuple[float, int]:
    """``(seconds, peak RSS bytes)`` of one stage in a fresh process."""
    cmd = [sys.executable, "-c", WRAPPER, sys.executable, "-m", f"stages.{stage}",
           "--params", str(run / "params.yaml"), *stage_args(stage, run)]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{stage} failed:\n{done.stderr[-3000:]}")
    return seconds, 1024 * int(done.stderr.strip().splitlines()[-1])


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure(n: int, root: Path, vit: Path, resnet: Path, cache_gb: float, env: dict) -> dict:
    run = root / f"n{n}"
    run.mkdir(parents=True, exist_ok=True)
    (run / "params.yaml").write_text(yaml.safe_dump(params(n, vit, resnet, cache_gb)))
    figures: dict = {}
    for stage in STAGES:
        seconds, rss = run_stage(stage, run, env)
        figures[stage] = {"seconds": seconds, "peak_rss": rss}
        print(f"  n={n} {stage}: {seconds:.1f} s, peak RSS {rss / 2**20:.0f} MiB", flush=True)
    images = len(zarr.open_group(run / "priors.zarr", mode="r").attrs["image_ids"])
    episodes = sum(pq.read_metadata(p).num_rows for p in (run / "episodes").rglob("*.parquet"))
    figures["images"], figures["episodes"] = images, episodes
    for stage, store in STORES.items():
        figures[stage]["bytes"] = disk_bytes(run / store)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64, help="N: train and val images of the small run")
    parser.add_argument("--cache-gb", type=float, default=0.0, help="orchestration.cache_gb of the runs")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--keep", type=Path, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    env = {**os.environ, "PREFECT_LOGGING_LEVEL": "ERROR"}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        vit, resnet = save_random_models(root / "models")
        small = measure(args.images, root, vit, resnet, args.cache_gb, env)
        large = measure(4 * args.images, root, vit, resnet, args.cache_gb, env)
    print(f"\nreal-shaped benchmark: {small['images']} and {large['images']} images with priors "
          f"({small['episodes']} and {large['episodes']} episodes), cache_gb {args.cache_gb}, {args.device}")
    print(f"{'stage':<14}{'peak MiB (N)':>14}{'peak MiB (4N)':>15}{'ratio':>8}{'s/image (4N)':>14}"
          f"{'store B/image':>15}")
    ratios = {}
    for stage in MEASURED:
        a, b = small[stage], large[stage]
        ratios[stage] = b["peak_rss"] / a["peak_rss"]
        per_image = b.get("bytes", 0) / (large["episodes"] if stage == "pseudo_masks" else large["images"])
        print(f"{stage:<14}{a['peak_rss'] / 2**20:>14.0f}{b['peak_rss'] / 2**20:>15.0f}{ratios[stage]:>8.3f}"
              f"{b['seconds'] / large['images']:>14.2f}{per_image:>15.0f}")
    peak = max(large[s]["peak_rss"] for s in MEASURED)
    for name, size in DATASETS.items():
        disk = sum(large[s]["bytes"] / large["images"] * size["images"] for s in ("priors", "features"))
        disk += large["pseudo_masks"]["bytes"] / large["episodes"] * size["episodes"]
        ram = peak + 2 * args.cache_gb * 2**30  # two stores may each hold cache_gb
        print(f"projected {name}: RAM {ram / 2**30:.1f} GiB per stage process (peak at 4N, bounded), "
              f"stores on disk {disk / 2**30:.0f} GiB (once, with DVC cache links)")
    print(f"memory_ratio_4x: {max(ratios.values()):.3f}")


if __name__ == "__main__":
    main()
