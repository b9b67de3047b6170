"""
Small pieces shared by train.py, sample.py, bench.py and prepare.py: the user-facing error type,
device/dtype selection and the autocast context. Each is written once here and imported everywhere.
"""
import argparse
import os
import sys
from contextlib import nullcontext


class UserError(Exception):
    """Bad input from the person running a script. Printed as one 'error: ...' line, exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse for prepare.py and plot.py, whose usage mistakes end like every other bad input: one
    'error: ...' line and exit 2, instead of argparse's usage dump."""

    def error(self, message):
        raise UserError(f"{message} (see: python {self.prog} --help)")


def run_cli(main):
    """Run main(); turn a UserError into a one-line message on stderr and exit code 2 (no traceback)."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def pick_device(device):
    """'auto' picks cuda > mps > cpu; anything else is checked to exist so the error is readable."""
    import torch  # imported on use: prepare.py needs this module but not torch

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
    if kind not in ("cuda", "mps", "cpu"):
        raise UserError(f"unknown device '{device}' (use auto, cpu, cuda, cuda:N or mps)")
    return device


def pick_dtype(dtype, device):
    """'auto' means bf16 where the GPU supports it, else fp16 on CUDA, else fp32."""
    import torch  # imported on use: prepare.py needs this module but not torch

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
    import torch  # imported on use: prepare.py needs this module but not torch

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
    import torch  # imported on use: prepare.py needs this module but not torch

    if configured:
        return float(configured)
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops
    return None
