"""How many (image, class) pairs of the embedded benchmark the PI-CLIP conventions change.

``python -m benchmarks.cam_saturation [--images N]`` renders the first N validation images of the
embedded benchmark (the generator's default params), runs the shipped tiny CLIP (``fixtures/tiny-vit``)
on every (image, class) pair whose class has at least ``split.min_pixels`` pixels (auto: 179 at
128 px), and counts the pairs whose target softmax saturates (p < 1e-4) and the pairs whose VTP /
PIR differ by more than 1e-3 between ``priors.cam_scale`` pi-clip and minmax (under either box
rule: under pi-clip's, a VTP change of 1e-7 can move a cell across a uint8 step and so a box) and
between ``priors.box`` pi-clip and exact. ``--prompt-set``: ``priors.prompt_set``. Prints one JSON
object. A few minutes on two cores for 300 images.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.core.params import PriorsParams, SyntheticParams
from pipeline.datasets import synthetic_writer
from pipeline.datasets.shapes import SHAPE_NAMES
from pipeline.priors.forward import image_features
from pipeline.priors.shards import load_extractor
from pipeline.priors.vtp import prompt_sets

REPO = Path(__file__).resolve().parents[1]
MIN_PIXELS = 179  # split.min_pixels auto on 128 px images (docs/design.md#conventions)


def target_probability(ex, images: torch.Tensor, pair_image: torch.Tensor,
                       classes: list[int]) -> torch.Tensor:
    """``(P,)`` the softmax probability GradCAM explains: each pair's foreground prompt over its set."""
    model = ex.bundle.model
    feats = image_features(model.visual, images, attention_blocks=ex.pir_blocks)
    prompts, target, mask = prompt_sets(ex.bank, torch.tensor(classes), None, ex.prompt_set)
    embedding = F.normalize(feats.embedding.detach()[pair_image], dim=-1)
    cosines = torch.einsum("pe,pke->pk", embedding, prompts.to(embedding.dtype))
    logits = model.logit_scale.exp().item() * cosines
    probs = logits.masked_fill(~mask, float("-inf")).float().softmax(-1)
    return probs.gather(1, target.view(-1, 1))[:, 0]


#: what each count compares: (cam_scale, box) of one extraction against another's, and the map
CONTRASTS = {
    "vtp_changed_by_scale": (("pi-clip", "pi-clip"), ("minmax", "pi-clip"), "vtp"),
    "pir_changed_by_scale_pi_clip_boxes": (("pi-clip", "pi-clip"), ("minmax", "pi-clip"), "pir"),
    "pir_changed_by_scale_exact_boxes": (("pi-clip", "exact"), ("minmax", "exact"), "pir"),
    "pir_changed_by_box": (("pi-clip", "pi-clip"), ("pi-clip", "exact"), "pir"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--prompt-set", default="target", choices=["target", "image_labels", "all"])
    args = parser.parse_args(argv)
    cfg = SyntheticParams()
    variants = {}
    for scale in ("pi-clip", "minmax"):
        for box in ("pi-clip", "exact"):
            priors = PriorsParams(cam_scale=scale, box=box, prompt_set=args.prompt_set)
            variants[scale, box] = load_extractor(REPO / "fixtures/tiny-vit", priors, list(SHAPE_NAMES))
    counts: dict = {"prompt_set": args.prompt_set, "pairs": 0, "saturated": 0}
    for key in CONTRASTS:
        counts[key], counts[key.replace("changed_by", "max_diff")] = 0, 0.0
    peaks: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthetic_writer.write_benchmark_shard(root, "val", range(args.images), cfg)
        ids = [synthetic_writer.image_id("val", i) for i in range(args.images)]
        masks = root / "VOC2012/SegmentationClassAug"
        for start in range(0, len(ids), args.batch):
            batch = ids[start:start + args.batch]
            paths = [str(root / "VOC2012/JPEGImages" / f"{i}.jpg") for i in batch]
            labels = [np.asarray(Image.open(masks / f"{i}.png")) for i in batch]
            pair_classes = [[c for c in range(1, len(SHAPE_NAMES) + 1) if (lab == c).sum() >= MIN_PIXELS]
                            for lab in labels]
            got = {key: ex.priors(ex.load_images(paths), pair_classes, pair_classes)
                   for key, ex in variants.items()}
            ex = variants["pi-clip", "pi-clip"]
            pair_image = torch.tensor([i for i, cs in enumerate(pair_classes) for _ in cs])
            flat = [c for cs in pair_classes for c in cs]
            with torch.no_grad():
                saturated = target_probability(ex, ex.load_images(paths), pair_image, flat) < 1e-4
            counts["pairs"] += len(flat)
            counts["saturated"] += int(saturated.sum())
            for key, (a, b, kind) in CONTRASTS.items():
                diff = (getattr(got[a], kind) - getattr(got[b], kind)).abs().flatten(1).amax(1)
                counts[key] += int((diff > 1e-3).sum())
                top = key.replace("changed_by", "max_diff")
                counts[top] = max(counts[top], float(diff.max()))
            peaks += got["pi-clip", "pi-clip"].vtp[saturated].flatten(1).amax(1).tolist()
    counts["saturated_vtp_peak_range"] = [min(peaks), max(peaks)] if peaks else None
    print(json.dumps(counts, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
