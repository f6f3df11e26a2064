"""The dtype policy: ``auto`` never picks emulated bf16."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pipeline.core import dtype


def test_explicit_choices_are_kept_and_auto_is_fp16_on_cuda():
    assert dtype.resolve("fp32", "cuda") == "fp32" and dtype.resolve("bf16", "cpu") == "bf16"
    assert dtype.resolve("auto", "cuda") == "fp16"


def test_auto_on_the_cpu_follows_native_bf16(monkeypatch):
    monkeypatch.setattr(dtype, "native_cpu_bf16", lambda: True)
    assert dtype.resolve("auto", "cpu") == "bf16"
    monkeypatch.setattr(dtype, "native_cpu_bf16", lambda: False)
    assert dtype.resolve("auto", "cpu") == "fp32"


@pytest.mark.parametrize("env", [{"ATEN_CPU_CAPABILITY": "avx2"}, {"ONEDNN_MAX_CPU_ISA": "AVX2"}])
def test_kernels_held_to_avx2_mean_no_native_bf16(env):
    """Either variable alone makes bf16 emulated (ATen's or oneDNN's kernels), whatever the CPU."""
    code = "from pipeline.core.dtype import native_cpu_bf16; print(native_cpu_bf16())"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "False"


def test_autocast_contexts():
    x = torch.ones(2, 2)
    with dtype.autocast("bf16", "cpu"):
        assert (x @ x).dtype == torch.bfloat16
    with dtype.autocast("fp32", "cpu"):
        assert (x @ x).dtype == torch.float32
    assert set(dtype.describe()) == {"torch", "cpu_capability", "native_cpu_bf16"}
