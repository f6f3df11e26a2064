"""The priors on an accelerator: CUDA (fp32 and fp16 autocast) against the CPU, and the
per-image extraction time over one ``encode_image`` forward on the same device.

Needs only torch, open_clip, scipy, PIL and pycocotools (no Zarr, Prefect or pydantic), so it
runs on a bare GPU machine: ``python benchmarks/priors_device.py [data/models/clip]``; without
a CLIP folder it uses an untrained tiny-vit. Images are synthetic scenes rendered on the spot.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.clip.loader import load_local_dir
from pipeline.clip.prompts import text_embeddings
from pipeline.core.params import PriorsParams
from pipeline.datasets.shapes import SHAPE_NAMES
from pipeline.datasets.synthetic import render_scene, scene_rng
from pipeline.priors.extract import extract_priors
from pipeline.priors.vtp import prompt_bank
from pipeline.tinyclip.model import build_tiny

CFG = PriorsParams()  # the schema's defaults
OPTIONS = {"prompt_set": CFG.prompt_set, "pir_blocks": CFG.pir_blocks, "pir_threshold": CFG.pir_threshold,
           "cam_scale": CFG.cam_scale, "box": CFG.box}


def scenes(n: int, size: int, mean, std) -> tuple[torch.Tensor, list[list[int]]]:
    rendered = [render_scene(scene_rng(0, "heldout", i), 128, 4, 1) for i in range(n)]
    images = torch.from_numpy(np.stack([s.image for s in rendered])).permute(0, 3, 1, 2).float() / 255
    images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
    images = (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return images, [sorted({o.class_id for o in s.objects}) for s in rendered]


def timed(fn, repeats: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("data/models/clip")
    bundle = load_local_dir(folder) if folder.is_dir() else build_tiny("tiny-vit", 0)
    model = bundle.model.eval()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"model: {'trained ' + bundle.sha256[:12] if bundle.sha256 else 'untrained tiny-vit'}")
    tok = bundle.tokenizer()
    bank = prompt_bank(model, tok, SHAPE_NAMES, "a photo of a {}.", "a photo without {}.")
    class_text = text_embeddings(model, tok, SHAPE_NAMES)
    images, labels = scenes(256, bundle.image_size, bundle.mean, bundle.std)
    pair_image = torch.tensor([i for i, ls in enumerate(labels) for _ in ls])
    pair_class = [c for ls in labels for c in ls]

    def run(device: str, autocast: bool = False):
        m = model.to(device)
        with torch.autocast("cuda", dtype=torch.float16, enabled=autocast):
            return extract_priors(m, images.to(device), pair_image.to(device), pair_class, labels,
                                  bank, class_text, **OPTIONS)

    cpu = run("cpu")
    for autocast in (False, True):
        gpu = run("cuda", autocast)
        name = "fp16_autocast" if autocast else "fp32"
        for key in ("vtp", "pir", "maskclip_scores"):
            diff = (getattr(gpu, key).float().cpu() - getattr(cpu, key).float()).abs()
            print(f"cuda_{name}_{key}_max_abs_diff: {diff.max():.2e} (mean {diff.mean():.2e})")
        agree = (gpu.maskclip_labels.cpu() == cpu.maskclip_labels).float().mean()
        print(f"cuda_{name}_maskclip_label_agreement: {agree:.4f}")
    model.to("cuda")
    x, p = images.cuda(), pair_image.cuda()
    for autocast in (False, True):
        with torch.autocast("cuda", dtype=torch.float16, enabled=autocast), torch.no_grad():
            ours = timed(lambda: extract_priors(model, x, p, pair_class, labels, bank, class_text, **OPTIONS))
            plain = timed(lambda: model.encode_image(x))
        name = "fp16_autocast" if autocast else "fp32"
        print(f"cuda_{name}_per_image_us: {1e6 * ours / len(x):.1f}  encode_image_per_image_us: "
              f"{1e6 * plain / len(x):.1f}  per_image_vs_encode_image: {ours / plain:.2f}")


if __name__ == "__main__":
    main()
