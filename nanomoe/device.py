"""
Where and in what precision a script runs: the device ('auto' = cuda > mps > cpu), the dtype ('auto' = bf16 on
GPUs that have it), the autocast context, whether torch.compile is used, and the peak FLOP/s MFU is measured
against.
"""
import math
import os
import sys
import time
from contextlib import nullcontext

import torch

from nanomoe.errors import UserError


def pick_device(device):
    """'auto' picks cuda > mps > cpu; anything else is checked to exist so the error is readable."""
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    kind = device.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{device}' asked for but CUDA is not available (use --device=cpu or --device=auto)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device '{device}' asked for but MPS is not available (use --device=cpu or --device=auto)")
    index = device.split(":", 1)[1] if ":" in device else "0"
    if kind not in ("cuda", "mps", "cpu") or not index.isdigit() or (kind != "cuda" and ":" in device):
        raise UserError(f"unknown device '{device}' (use auto, cpu, cuda, cuda:N or mps)")
    return device


DTYPES = ("auto", "float32", "bfloat16", "float16")


def pick_dtype(dtype, device):
    """'auto' means bf16 where the GPU supports it, else fp16 on CUDA, else fp32."""
    if dtype == "auto":
        if device.startswith("cuda"):
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"unknown dtype '{dtype}' (use auto, float32, bfloat16 or float16)")
    if dtype == "float16" and not device.startswith("cuda"):
        raise UserError("dtype 'float16' needs a CUDA device (use --dtype=float32 or bfloat16)")
    return dtype


def autocast_context(device, dtype):
    """Mixed precision for the forward pass; float32 runs without autocast."""
    if dtype == "float32":
        return nullcontext()
    device_type = device.split(":")[0]
    return torch.autocast(device_type=device_type, dtype=getattr(torch, dtype))


def compile_supported(device):
    """torch.compile needs a working C++/Triton toolchain; we only turn it on by default on CUDA."""
    return device.startswith("cuda") and sys.platform != "win32" and os.environ.get("NANOMOE_NO_COMPILE") is None


# bf16 dense tensor-core peaks (FLOP/s) of the GPUs we know; others take the peak_flops config value
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def gpu_peak_flops(device, configured=None):
    """The hardware peak that MFU is measured against: the config value if set, else a known GPU's."""
    if configured:
        return float(configured)
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops
    return None


def cpu_matmul_flops():
    """FLOP/s of a float32 1024x1024 matmul on this CPU (best of 3, about 0.1 s). The matrix is not random:
    drawing it would move the global RNG, and a resumed run must continue it exactly."""
    a = torch.full((1024, 1024), 0.5)
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2 * 1024 ** 3 / best
