"""
Processes and devices for training, on PyTorch's own distributed engine: one process, or one per GPU (or
CPU share) launched by torchrun. The helpers are no-ops in a single process, so train.py reads the same
either way.
"""
import os
import signal
from types import SimpleNamespace

import torch
import torch.distributed as dist

from common import UserError, compile_supported, pick_device, pick_dtype

BACKENDS = ("auto", "nccl", "gloo")  # 'auto' = nccl on CUDA, gloo otherwise


def setup_processes(cfg):
    """Which process this is (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE) and what it runs on. The process
    group is joined later, by join(), once every setting has been checked."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, local_rank, world_size = 0, 0, 1
    if ddp:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
    device = pick_device(cfg.device)
    if ddp and device.startswith("cuda"):
        device = f"cuda:{local_rank}"  # one GPU per process, whatever cuda:N the config names
        torch.cuda.set_device(device)
    if ddp and device == "mps":
        raise UserError("torchrun with device 'mps' is not supported (gloo cannot reduce MPS tensors); "
                        "train on one process, or use --device=cpu")
    use_compile = cfg.compile and compile_supported(device)
    if cfg.compile and not use_compile and rank == 0:
        print(f"note: torch.compile is off on device '{device}' (it is used on CUDA)")
    return SimpleNamespace(ddp=ddp, rank=rank, local_rank=local_rank, world_size=world_size, master=rank == 0,
                           device=device, device_type=device.split(":")[0], dtype=pick_dtype(cfg.dtype, device),
                           compile=use_compile)


def join(proc, backend="auto"):
    """Join the process group: nccl on CUDA, gloo otherwise, unless backend names one."""
    if proc.ddp:
        dist.init_process_group(backend=backend if backend != "auto" else
                                ("nccl" if proc.device_type == "cuda" else "gloo"))


def finish(proc, lock=None):
    """The run is over: leave the process group (every rank together), release out_dir's lock (rank 0)."""
    if proc.ddp:
        dist.barrier()
        dist.destroy_process_group()
    if lock is not None:
        lock.close()


def _reduce_device(proc):
    return proc.device if proc.device_type == "cuda" else "cpu"  # gloo reduces CPU tensors


def any_rank(flag, proc):
    """True on every rank if it is True on any (a bool, or a bool tensor that stays on the device)."""
    if not proc.ddp:
        return flag
    t = torch.as_tensor(flag, dtype=torch.float32, device=_reduce_device(proc))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t > 0 if isinstance(flag, torch.Tensor) else bool(t.item() > 0)


def mean_over_ranks(values, proc):
    """Average a dict of tensors over ranks, so the log shows the global picture."""
    if not proc.ddp:
        return values
    keys = list(values)
    flat = torch.cat([values[k].float().flatten().to(_reduce_device(proc)) for k in keys])
    dist.all_reduce(flat)
    flat = flat.cpu() / proc.world_size
    out, i = {}, 0
    for k in keys:
        n = values[k].numel()
        out[k] = flat[i:i + n].view_as(values[k])
        i += n
    return out


def gather_objects(obj, proc):
    """Every rank's obj (plain values and tensors), in rank order."""
    if not proc.ddp:
        return [obj]
    objs = [None] * proc.world_size
    dist.all_gather_object(objs, obj)
    return objs


def install_stop_handlers(master):
    """Ctrl-C, SIGTERM, SIGHUP (a closed terminal or ssh session): finish the current step, save, exit 0; a
    second signal exits at once. Returns the list the handler appends to (non-empty = stop asked for)."""
    stop_requested = []

    def on_signal(signum, frame):
        if stop_requested:
            os._exit(130)
        stop_requested.append(signum)
        if master:
            print(f"\n{signal.Signals(signum).name} received: stopping after this step (again to quit now)",
                  flush=True)
    for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            signal.signal(sig, on_signal)
    return stop_requested
