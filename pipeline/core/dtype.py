"""The dtype policy: ``fp32``, ``bf16``, or ``auto`` (mixed precision only where it is fast).

bf16 autocast is 1–1.8× faster than fp32 on a CPU with native bf16 instructions (AVX512-BF16 or
AMX) and 45–58× *slower* on one without (AVX2 only: PyTorch emulates bf16). ``auto`` therefore
decides by what this process may actually execute, not by the CPU alone: ``ATEN_CPU_CAPABILITY``
and ``ONEDNN_MAX_CPU_ISA`` can hold PyTorch to AVX2 kernels on an AVX-512 machine.
"""

from __future__ import annotations

import contextlib
import os
from typing import Literal

import torch

from pipeline.core.params import Dtype

Resolved = Literal["fp32", "bf16", "fp16"]

#: ``ONEDNN_MAX_CPU_ISA`` values (prefixes) that still allow oneDNN's native bf16 kernels.
_BF16_ISAS = ("ALL", "AVX512_CORE_BF16", "AVX512_CORE_AMX", "AVX10")


def native_cpu_bf16() -> bool:
    """Whether this process runs bf16 natively on the CPU: ATen's kernels are AVX-512 (not held
    to AVX2), oneDNN is not capped below its bf16 ISA, and the CPU has AVX512-BF16 or AMX."""
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").strip().upper() or "ALL"
    if not isa.startswith(_BF16_ISAS):
        return False
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve(dtype: Dtype, device: torch.device | str) -> Resolved:
    """What the policy ``dtype`` means on ``device``: ``auto`` is fp16 mixed precision on CUDA,
    bf16 on a CPU with native bf16 (:func:`native_cpu_bf16`), else fp32."""
    if dtype != "auto":
        return dtype
    if torch.device(device).type == "cuda":
        return "fp16"
    return "bf16" if native_cpu_bf16() else "fp32"


def autocast(resolved: Resolved, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The autocast context of a resolved dtype (none for fp32)."""
    if resolved == "fp32":
        return contextlib.nullcontext()
    half = torch.bfloat16 if resolved == "bf16" else torch.float16
    return torch.autocast(torch.device(device).type, dtype=half)


def describe() -> dict[str, str | bool]:
    """What a report's provenance says about the CPU kernels: torch, ATen capability, bf16."""
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_cpu_bf16": native_cpu_bf16()}
