"""The GPU projection of benchmarks/throughput.py --project prices each op by the roofline, worked
out by hand here: a large matmul by its FLOPs, an elementwise op by its bytes, a tiny op by one
launch, a view by nothing; the work's size scales FLOPs and bytes, never launches."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from _roofline import Gpu, OpCosts  # noqa: E402

GPU = Gpu("test", tflops_half=100.0, tflops_tf32=50.0, tflops_fp32=10.0, tb_per_s=2.0, launch_us=5.0,
          efficiency=0.5)


def test_a_large_matmul_costs_its_flops_at_the_rate_of_its_dtype():
    a, b = torch.ones(512, 1024), torch.ones(1024, 256)
    with OpCosts() as costs:
        a @ b
    (name, flops, nbytes, dtype), = costs.ops
    assert (name, flops, dtype) == ("mm", 2 * 512 * 1024 * 256, torch.float32)
    assert nbytes == 4 * (512 * 1024 + 1024 * 256 + 512 * 256)
    fp32 = flops / (10e12 * 0.5)  # 53.7 us: above its bytes (3.4 MB at 1 TB/s: 3.4 us) and a launch
    assert costs.seconds(GPU, 1.0, half=False) == pytest.approx(fp32)
    assert costs.seconds(GPU, 1.0, half=True) == pytest.approx(flops / (100e12 * 0.5))  # fp16 autocast
    assert costs.seconds(GPU, 4.0, half=False) == pytest.approx(4 * fp32)


def test_an_elementwise_op_costs_its_bytes_a_tiny_one_a_launch_and_a_view_nothing():
    x = torch.ones(1 << 20)
    with OpCosts() as costs:
        y = x * 2  # 8 MiB read and written: 8.4 us at 1 TB/s
        x.view(1024, 1024).t()  # views: no kernel, not recorded
        torch.ones(3) + 1  # a launch
    assert [op[0] for op in costs.ops] == ["mul", "ones", "add"]
    memory = 2 * 4 * (1 << 20) / (2e12 * 0.5)
    assert costs.seconds(GPU, 1.0, half=False) == pytest.approx(memory + 2 * 5e-6)
    assert costs.seconds(GPU, 10.0, half=False) == pytest.approx(10 * memory + 2 * 5e-6)
    assert torch.equal(y, torch.full((1 << 20,), 2.0))  # the work itself is done as usual
