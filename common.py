"""
Small pieces shared by train.py, sample.py, bench.py and prepare.py: the user-facing error type, a progress
line, writing a file all or nothing, device/dtype selection and the autocast context. Each is written once
here and imported everywhere.
"""
import argparse
import errno
import math
import os
import sys
import time
from contextlib import contextmanager, nullcontext


class UserError(Exception):
    """Bad input from the person running a script. Printed as one 'error: ...' line, exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse for prepare.py and plot.py, whose usage mistakes end like every other bad input: one
    'error: ...' line and exit 2, instead of argparse's usage dump."""

    def error(self, message):
        raise UserError(f"{message} (see: python {self.prog} --help)")


def run_cli(main):
    """Run main() the way every script runs: a UserError is one 'error: ...' line on stderr and exit code 2
    (no traceback); Ctrl-C before a script handles it exits quietly with 130; a reader that closes our
    stdout (`train.py | head`) stops the printing, not the run."""
    stdout, sys.stdout = sys.stdout, PipeSafeStdout(sys.stdout)
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        sys.stdout.flush()
        sys.stdout = stdout


class PipeSafeStdout:
    """sys.stdout that, once its reader has gone (BrokenPipeError), sends the rest to /dev/null."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self._to_devnull()
            return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except BrokenPipeError:
            self._to_devnull()

    def _to_devnull(self):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self.stream.fileno())  # what is still buffered goes there too
        os.close(devnull)

    def __getattr__(self, name):
        return getattr(self.stream, name)


class Progress:
    """A single status line on stderr, rewritten with \\r; only on a terminal, so logs stay clean."""

    force_on = False  # a script's --progress flag: also when stderr is not a terminal

    def __init__(self):
        self.on = self.force_on or sys.stderr.isatty()
        self.last = 0.0
        self.shown = False

    def update(self, msg, force=False):
        now = time.monotonic()
        if self.on and (force or now - self.last > 0.1):  # ~10 redraws/s is plenty and costs nothing
            print(f"\r{msg}\033[K", end="", file=sys.stderr, flush=True)
            self.last, self.shown = now, True

    def done(self):
        if self.shown:
            print(file=sys.stderr)


def temp_path(path):
    """Where path is written before it is renamed into place: a hidden name in the same folder (so the rename
    is atomic) with our pid (so two processes never write over each other's temp file). train.py removes
    leftovers of killed runs by the '.tmp-' prefix."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".tmp-{name}.{os.getpid()}")


def replace_durably(tmp, path):
    """Rename tmp over path and fsync the folder, so the rename itself survives a power cut."""
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path, mode="wb", **open_kwargs):
    """Write path all or nothing, the one way every file we write in place is written:

        with atomic_write("out/ckpt.pt") as f:
            torch.save(ckpt, f)

    The file is written under temp_path(path), flushed and fsync'ed, then renamed over path. On any failure
    (disk full, Ctrl-C) the temp file is removed and path is as it was; a full disk is a UserError that says
    so."""
    tmp = temp_path(path)
    try:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them the file
        replace_durably(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(disk_full_message(path)) from None
        raise


def disk_full_message(path):
    return (f"the disk is full: no space left to write {path} (what was there before is unchanged); "
            f"free some space, then run the command again")


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
    index = device.split(":", 1)[1] if ":" in device else "0"
    if kind not in ("cuda", "mps", "cpu") or not index.isdigit() or (kind != "cuda" and ":" in device):
        raise UserError(f"unknown device '{device}' (use auto, cpu, cuda, cuda:N or mps)")
    return device


DTYPES = ("auto", "float32", "bfloat16", "float16")
MAX_SEED = 2**32 - 1 - 1024  # numpy's seeds end at 2**32 - 1; each DDP rank adds its rank (and eval adds 999)


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


def cpu_matmul_flops():
    """FLOP/s of a float32 1024x1024 matmul on this CPU (best of 3, about 0.1 s). The matrix is not random:
    drawing it would move the global RNG, and a resumed run must continue it exactly."""
    import time

    import torch  # imported on use: prepare.py needs this module but not torch

    a = torch.full((1024, 1024), 0.5)
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2 * 1024 ** 3 / best


def duration(seconds):
    """3h05m, 4m10s, 12s: how long, at a glance."""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"
