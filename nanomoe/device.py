"""
Where and in what precision a script runs: the device ('auto' = cuda > mps > cpu), the dtype ('auto' = bf16 on
GPUs that have it), TF32 for float32 matmuls on CUDA, the autocast context, whether torch.compile is used,
waiting for the device before reading a clock, the peak FLOP/s MFU is measured against, and, on a CPU, keeping
freed memory in the process.
"""
import ctypes
import math
import os
import re
import sys
import time
from contextlib import nullcontext

import torch

from nanomoe.errors import UserError


def pick_device(device):
    """'auto' picks cuda > mps > cpu; anything else is checked to exist so the error is readable. Picking CUDA
    also lets its float32 matmuls use TF32 (use_tf32)."""
    device = _which_device(device)
    if device.startswith("cuda"):
        use_tf32()
    return device


def use_tf32():
    """float32 matmuls on TF32 tensor cores (Ampere and later; cuDNN's convolutions already use them by
    default), as nanoGPT does. What runs in float32: every matmul of a --dtype=float32 run, and in a bf16 run
    the parts kept in float32 on purpose, Mamba2's scan einsums and the router's logits. In IEEE float32 they
    would run off the tensor cores (an H100 SXM's datasheet: 67 TFLOP/s against 495 in TF32).
    The router is not kept in IEEE float32: TF32 rounds a matmul's inputs to 10 mantissa bits (a relative
    5e-4; bf16 keeps 7 bits, and Hugging Face's Mixtral computes its router logits in bf16 under autocast) and
    accumulates in float32; keeping one layer out would take a global switch flipped inside the compiled
    graph. Softmax, top-k, the z-loss and the scan's decays are elementwise float32, which TF32 leaves alone."""
    torch.set_float32_matmul_precision("high")


def _which_device(device):
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


def synchronize(device):
    """Wait until the device has finished what was queued on it: a clock read after this times the work, not
    its launch. (CUDA and MPS run asynchronously; the CPU does not.)"""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    elif device == "mps":
        torch.mps.synchronize()


# bf16 dense (no sparsity) tensor-core peaks in FLOP/s from NVIDIA's datasheets, matched in order against
# torch.cuda.get_device_name(): the PCIe and NVL parts before the SXM part of the same name, which reports no
# form factor ("NVIDIA H100 80GB HBM3"). Whole words: GH200 and GB200 are other parts (unknown here).
GPU_PEAK_FLOPS = [
    (r"\bH100\b.*\bPCIe\b", 756e12),
    (r"\bH[12]00\b.*\bNVL\b", 835e12),  # H100 NVL and H200 NVL, per GPU
    (r"\bH100\b", 989e12),  # SXM
    (r"\bH200\b", 989e12),  # SXM
    (r"\bA100\b", 312e12),  # SXM and PCIe alike
    (r"\bB200\b", 2250e12),
    (r"\bL4\b", 121e12),
]


def peak_flops_of(gpu_name):
    """The bf16 dense peak of the GPU named gpu_name (as torch.cuda.get_device_name says it), or None when
    the table does not know it."""
    for pattern, flops in GPU_PEAK_FLOPS:
        if re.search(pattern, gpu_name, re.IGNORECASE):
            return flops
    return None


def gpu_peak_flops(device, configured=None):
    """The hardware peak that MFU is measured against: the config value if set, else a known GPU's (None:
    unknown, and no MFU is shown)."""
    if configured:
        return float(configured)
    if device.startswith("cuda"):
        return peak_flops_of(torch.cuda.get_device_name(device))
    return None


def cpu_matmul_flops(n=1024):
    """FLOP/s of a float32 n x n matmul on this CPU (best of 3; about 0.1 s at n=1024 on one core). The matrix
    is not random: drawing it would move the global RNG, and a resumed run must continue it exactly."""
    a = torch.full((n, n), 0.5)
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def keep_freed_memory():
    """On Linux with glibc: keep the memory that freed tensors leave inside the process, for the next step.
    By default glibc maps every large allocation (activations, gradients: megabytes each) fresh from the
    system and returns it when it is freed, so each training step on a CPU faults its pages in again and the
    kernel zero-fills them. An MoE, whose gradients cover every expert, pays that on several times the dense
    model's bytes: docs/clock.md measures the step with and without. No-op where glibc's mallopt is absent."""
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    mallopt(M_MMAP_MAX, 0)  # large blocks come from the heap too, where a freed block is reused ...
    mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # ... and the heap is not handed back to the system
