"""fp32 against bf16 autocast on this CPU, natively and with PyTorch held to AVX2 kernels.

For a training step of the model (forward, circle loss, backward, Adam; the embedded benchmark's
shapes: 16 episodes of the tiny CLIP trunk's features at 256 px) and for a priors batch (the
shipped tiny CLIP, 32 images: MaskCLIP, VTP, PIR, tokens), prints seconds per step in fp32 and
in bf16, the bf16/fp32 ratio, and what ``auto`` (``pipeline.core.dtype``) picks — each
under the machine's native kernels and under ``ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2`` (a CPU without native bf16: PyTorch emulates it). Each variant runs in
a fresh process with the same thread count.

    .venv/bin/python benchmarks/dtype.py [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from _timing import best_of  # benchmarks/_timing.py (run as a script: its folder is on the path)

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures/tiny-vit"
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
WIDTHS = (10, 12, 6, 14, -9, -9, -11)  # negative: right-aligned


def train_step(resolved: str, repeats: int) -> float:
    from pipeline.core.dtype import autocast
    from pipeline.core.params import BackboneParams, ModelParams, TrainParams
    from pipeline.features.backbone import load_backbone
    from pipeline.fewshot.train import Step, episode_loss
    from pipeline.model.lfss import LFSS, Episodes

    torch.manual_seed(0)
    b, label = 16, 128
    with torch.no_grad():
        feats = load_backbone(BackboneParams(), FIXTURE, "cpu")(torch.randn(2 * b, 3, 256, 256))
    h, w = feats.shape[-2:]
    grid, dim = 8, 96  # the tiny CLIP at 128 px: 8 x 8 tokens of width 96

    def role(part: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"feats": part, "mask": torch.rand(b, h, w), "vtp": torch.rand(b, grid, grid),
                "tokens": torch.randn(b, 2, grid * grid, dim)}

    q, s = role(feats[:b]), role(feats[b:])
    x = Episodes(q["feats"], q["mask"], s["feats"], s["mask"], q["vtp"], s["vtp"], q["tokens"], s["tokens"])
    target = (torch.rand(b, label, label) < 0.3).to(torch.uint8)
    step = Step(x, target, target)
    cfg = TrainParams()
    model = LFSS(feats.shape[1], ModelParams())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def once() -> None:
        optimizer.zero_grad()
        with autocast(resolved, "cpu"):
            loss = episode_loss(model, step, cfg, torch.device("cpu"))
        loss.backward()
        optimizer.step()

    return best_of(once, repeats)


def priors_batch(resolved: str, repeats: int) -> float:
    from pipeline.core.params import PriorsParams
    from pipeline.priors.shards import load_extractor

    torch.manual_seed(0)
    names = [f"class {i}" for i in range(20)]
    ex = load_extractor(FIXTURE, PriorsParams(dtype=resolved), names)
    images = torch.randn(32, 3, ex.image_size, ex.image_size)
    pairs, labels = [[1 + i % 20, 1 + (i + 7) % 20] for i in range(32)], [[1 + i % 20] for i in range(32)]
    return best_of(lambda: ex.priors(images, pairs, labels), repeats)


def child(repeats: int) -> None:
    from pipeline.core.dtype import describe, resolve

    out = {**describe(), "auto": resolve("auto", "cpu")}
    for name, fn in (("train_step", train_step), ("priors_batch", priors_batch)):
        for resolved in ("fp32", "bf16"):
            out[f"{name}_{resolved}"] = fn(resolved, repeats)
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        child(args.repeats)
        return
    header = ("kernels", "capability", "auto", "what", "fp32 s", "bf16 s", "bf16/fp32")
    print("".join(f"{h:<{n}}" if n > 0 else f"{h:>{-n}}" for h, n in zip(header, WIDTHS, strict=True)))
    worst = 0.0
    for kernels, env in (("native", {}), ("avx2", AVX2)):
        done = subprocess.run([sys.executable, __file__, "--child", "--threads", str(args.threads),
                               "--repeats", str(args.repeats)], env={**os.environ, **env},
                              capture_output=True, text=True, check=True)
        got = json.loads(done.stdout.strip().splitlines()[-1])
        for what in ("train_step", "priors_batch"):
            fp32, bf16 = got[f"{what}_fp32"], got[f"{what}_bf16"]
            print(f"{kernels:<10}{got['cpu_capability']:<12}{got['auto']:<6}{what:<14}{fp32:>9.3f}{bf16:>9.3f}"
                  f"{bf16 / fp32:>11.2f}", flush=True)
        worst = max(worst, *(got[f"{what}_{got['auto']}"] / got[f"{what}_fp32"]
                             for what in ("train_step", "priors_batch")))
    print(f"auto_vs_fp32_worst: {worst:.2f}  (time of what auto picks over fp32's; above 1: auto is slower)")


if __name__ == "__main__":
    main()
