"""Fast check before ``benchmarks/gpu_check.sh`` runs ``scale.py`` on a bare GPU machine.

Imports every module the stages that ``scale.py`` runs import, eagerly or lazily (``dvclive`` in
``stages/train.py``, the Prefect API server that a stage starts), prints the versions the
carried wheels meet on that machine, and checks CUDA; then reports (never fails on) whether the
default ``clip`` backbone loads on the device. One line per failure, then exit status 1.

    PYTHONPATH=/tmp/site:$PWD python3 benchmarks/gpu_smoke.py          # on the GPU machine
    .venv/bin/python benchmarks/gpu_smoke.py --cpu-ok                  # here: imports only
"""

from __future__ import annotations

import importlib
import sys
import time
from importlib.metadata import PackageNotFoundError, version

STAGES = ("prepare", "clip_model", "split", "episodes", "priors", "features", "pseudo_masks", "train",
          "evaluate", "_prefect_server")
MODULES = (*(f"stages.{s}" for s in STAGES), "open_clip", "pycocotools.mask", "zarr", "numcodecs.zstd",
           "ruamel.yaml", "dvclive", "dvc.repo", "uvicorn", "prefect.server.api.server", "aiosqlite",
           "asyncpg", "cryptography.fernet", "h2")
# carried wheels that shadow or lean on the machine's own packages: which versions meet
VERSIONS = ("torch", "torchvision", "numpy", "typing_extensions", "pydantic", "prefect", "fastapi",
            "starlette", "anyio", "httpx", "httpcore", "click", "rich", "typer", "pluggy", "humanize",
            "packaging", "jinja2", "fsspec", "cloudpickle", "huggingface_hub", "timm", "safetensors",
            "pandas", "pyarrow", "scipy", "pillow", "matplotlib", "zarr", "open_clip_torch", "dvc")


def clip_backbone(device: str) -> str:
    """Not scale.py's path (ResNet-50 there), a known suspect: the project's default backbone
    (``clip``) loaded straight onto ``device``, as stages/features.py does. Reported, never fatal."""
    from pathlib import Path

    import torch

    from pipeline.core.params import BackboneParams
    from pipeline.features.backbone import load_backbone

    try:
        fixture = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-vit"
        net = load_backbone(BackboneParams(name="clip"), fixture, device)
        with torch.no_grad():
            out = net(torch.zeros(1, 3, 256, 256, device=device))
        return f"ok, features {tuple(out.shape)}"
    except Exception as exc:  # noqa: BLE001 - reported only
        return f"FAILS: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def main() -> int:
    start = time.perf_counter()
    failed = []
    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - every failure is reported, then exit 1
            failed.append(name)
            print(f"IMPORT FAILED {name}: {type(exc).__name__}: {exc}", flush=True)

    def found(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "-"

    print("versions: " + ", ".join(f"{d} {found(d)}" for d in VERSIONS))
    import torch
    import typing_extensions

    print(f"typing_extensions from {typing_extensions.__file__}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        x = torch.randn(1024, 1024, device="cuda")
        torch.cuda.synchronize()
        print(f"cuda: {torch.cuda.get_device_name()} (sm {torch.cuda.get_device_capability()}), "
              f"matmul ok: {bool(torch.isfinite(x @ x).all())}")
    elif "--cpu-ok" not in sys.argv:
        failed.append("cuda")
        print("CUDA FAILED: torch.cuda.is_available() is False: scale.py would run on the CPU")
    if not failed:
        print(f"backbone 'clip' (shipped tiny-vit) on {device}: {clip_backbone(device)}")
    imported = len(MODULES) - len([f for f in failed if f != "cuda"])
    print(f"smoke: {imported} of {len(MODULES)} imports in {time.perf_counter() - start:.1f} s"
          + (f"; FAILED: {' '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
