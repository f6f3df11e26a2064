"""A GPU's time for model work projected from a run on the CPU, op by op (benchmarks/throughput.py
``--project``; docs/operations.md "Feeding a GPU").

Every ATen op the work dispatches is recorded with its FLOPs (``torch.utils.flop_counter``'s
formulas: matmuls, convolutions, attention) and the bytes of its tensor inputs and outputs (what an
eager kernel reads and writes); views move nothing and are free. On the GPU an op then costs the
larger of its FLOPs at the tensor cores' rate for its dtype and its bytes at the memory's rate (the
roofline), each at a share of the peak a real kernel reaches, and at least one kernel launch. The
sum is a projection, not a measurement: it leaves out what the CPU run cannot see (cuDNN's choice of
algorithm, fused kernels, the host waiting between launches), so the first GPU session replaces it
with CUDA events (``--device cuda``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

MATMULS = {"mm", "bmm", "addmm", "baddbmm", "matmul", "_scaled_dot_product_efficient_attention",
           "_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention"}


@dataclass(frozen=True)
class Gpu:
    """Peak rates of a GPU (dense, no sparsity) and the share of them a kernel reaches."""

    name: str
    tflops_half: float  # fp16 / bf16 tensor cores
    tflops_tf32: float  # what PyTorch gives float32 convolutions by default (cuDNN allows TF32)
    tflops_fp32: float  # float32 matmuls (PyTorch's default matmul precision: "highest")
    tb_per_s: float  # memory bandwidth
    launch_us: float  # the least an op costs (a kernel launch, eager mode)
    efficiency: float = 0.5  # of the peaks, compute and memory alike


GPUS = {"h200": Gpu("H200 (projected)", 989.0, 494.7, 66.9, 4.8, 5.0),
        "h100": Gpu("H100 SXM (projected)", 989.0, 494.7, 66.9, 3.35, 5.0)}


@dataclass
class OpCosts(TorchDispatchMode):
    """Records ``(op name, FLOPs, bytes, dtype)`` of every op run inside it (views left out)."""

    ops: list[tuple[str, int, int, torch.dtype]] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view or func._overloadpacket.__name__ in ("detach", "lift_fresh", "_to_copy_alias"):
            return out
        packet = func._overloadpacket
        flops = flop_registry[packet](*args, **kwargs, out_val=out) if packet in flop_registry else 0
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        dtype = next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)
        self.ops.append((packet.__name__, int(flops), int(nbytes), dtype))
        return out

    def seconds(self, gpu: Gpu, scale: float, half: bool) -> float:
        """Projected seconds of the recorded work with ``scale`` times the items (FLOPs and bytes
        grow with it, launches do not); ``half``: matmuls and convolutions in fp16 autocast."""
        total = 0.0
        for name, flops, nbytes, dtype in self.ops:
            if half or dtype in (torch.float16, torch.bfloat16):
                rate = gpu.tflops_half
            elif name in MATMULS:
                rate = gpu.tflops_fp32
            else:
                rate = gpu.tflops_tf32
            compute = flops * scale / (rate * 1e12 * gpu.efficiency)
            memory = nbytes * scale / (gpu.tb_per_s * 1e12 * gpu.efficiency) / (2 if half else 1)
            total += max(compute, memory, gpu.launch_us * 1e-6)
        return total

    def summary(self) -> str:
        flops = sum(op[1] for op in self.ops)
        nbytes = sum(op[2] for op in self.ops)
        return f"{len(self.ops)} ops, {flops / 1e9:.1f} GFLOP, {nbytes / 1e9:.2f} GB moved"
