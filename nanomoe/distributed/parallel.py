"""
Processes and devices for training, on PyTorch's own distributed engine: one process, or one per GPU (or
CPU share) launched by torchrun. The helpers are no-ops in a single process, so train.py reads the same
either way.

How the model is spread over the processes (train.py --fsdp, --ep_size; DDP is the default):
- DDP: every process holds the whole model and optimizer; gradients are averaged (train.py wraps it).
- FSDP2 (fsdp=True, torch's fully_shard): each block, then the rest (embedding, tied head, final norm), is
  one unit whose parameters, gradients and Adam moments are split over the processes and gathered for its
  forward and backward only. An MoE block's stacked expert tensors belong to its block's unit: every rank
  runs every expert (on zero rows if it got no token), so every rank joins every gather.
- Expert parallel (ep_size > 1, expert_parallel.py): each MoE layer's experts split over ep_size processes;
  the rest is DDP over all processes.
torch.compile is not used with FSDP or expert parallel (untested here): setup_processes turns it off with a
note.
"""
import os
import signal
from contextlib import nullcontext
from types import SimpleNamespace

import torch
import torch.distributed as dist

from nanomoe.device import compile_supported, keep_freed_memory, pick_device, pick_dtype
from nanomoe.errors import UserError

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
    # both flags take effect only under torchrun: one process holds everything anyway
    # sharding: () for none, else the modes, ("fsdp",), ("ep",) or ("fsdp", "ep")
    sharding = tuple(m for m, on in (("fsdp", cfg.fsdp), ("ep", cfg.ep_size > 1)) if on) if ddp else ()
    if device == "cpu":
        keep_freed_memory()  # each step reuses the last step's memory instead of faulting it in afresh
    use_compile = cfg.compile and compile_supported(device) and not sharding
    if cfg.compile and not use_compile and rank == 0:
        why = f"on device '{device}' (it is used on CUDA)" if not compile_supported(device) else \
            f"with {' and '.join(sharding)} (untested here)"
        print(f"note: torch.compile is off {why}")
    return SimpleNamespace(ddp=ddp, rank=rank, local_rank=local_rank, world_size=world_size, master=rank == 0,
                           device=device, device_type=device.split(":")[0], dtype=pick_dtype(cfg.dtype, device),
                           compile=use_compile, sharding=sharding)


def join(proc, backend="auto"):
    """Join the process group: nccl on CUDA, gloo otherwise, unless backend names one."""
    if proc.ddp:
        dist.init_process_group(backend=backend if backend != "auto" else
                                ("nccl" if proc.device_type == "cuda" else "gloo"))


def check_sharding(cfg, proc):
    """FSDP and expert parallel settings that cannot work, before any process group is joined."""
    ep, n_experts = cfg.ep_size, cfg.n_experts
    if cfg.fsdp and proc.device_type == "mps":
        raise UserError("fsdp=True needs CUDA or CPU processes under torchrun (FSDP cannot shard over MPS); "
                        "use --fsdp=False")
    if ep > 1 and n_experts == 0:
        raise UserError(f"ep_size={ep} splits the experts of an MoE model, but this model is dense (n_experts=0); "
                        f"use --ep_size=1, or set --n_experts")
    if ep > 1 and cfg.n_layer < cfg.moe_every:
        raise UserError(f"ep_size={ep} splits the experts of the MoE layers, but with n_layer={cfg.n_layer} and "
                        f"moe_every={cfg.moe_every} the model has none; use --ep_size=1, or a smaller --moe_every")
    if ep > 1 and n_experts % ep:
        raise UserError(f"ep_size={ep} does not divide n_experts={n_experts}: each process holds n_experts / ep_size "
                        f"experts; use an ep_size that divides {n_experts}")
    if proc.world_size % ep:
        raise UserError(f"ep_size={ep} does not divide the world size {proc.world_size} (the processes torchrun "
                        f"starts); use an ep_size that divides {proc.world_size}, or --ep_size=1")
    if cfg.fsdp and proc.dtype == "float16":
        raise UserError("fsdp=True with dtype float16 is not supported (the GradScaler's skip over sharded "
                        "gradients is untested here); use --dtype=bfloat16")


def shard(model, cfg, proc):
    """Spread the model over the processes (in place: EP slices its experts, FSDP2 swaps its class), before the
    optimizer sees its parameters. -> what the training loop calls: the FSDP module itself, or DDP around the
    expert-parallel model. With both, FSDP shards everything but the experts over all processes and EP splits
    the experts. (torch's sharding modules are imported here: they take a second to import, which every other
    run would pay.)"""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    from nanomoe.distributed import expert_parallel
    experts = None
    if "ep" in proc.sharding:
        mesh = init_device_mesh(proc.device_type, (proc.world_size // cfg.ep_size, cfg.ep_size),
                                mesh_dim_names=("dp", "ep"))
        expert_parallel.shard_experts(model, mesh)
        names = set(expert_parallel.expert_param_names(model))
        experts = {p for name, p in model.named_parameters() if name in names}
    if "fsdp" not in proc.sharding:
        # DDP averages the dense gradients over all processes; the experts are synced by sync_gradients
        DDP._set_params_and_buffers_to_ignore_for_model(model, sorted(names))
        return DDP(model, device_ids=[proc.local_rank] if proc.device_type == "cuda" else None)
    mesh = init_device_mesh(proc.device_type, (proc.world_size,), mesh_dim_names=("fsdp",))
    # bf16 runs gather bf16 weights for the matmuls and reduce the gradients in fp32; the sharded master
    # weights and Adam's moments stay fp32
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if proc.dtype == "bfloat16" else MixedPrecisionPolicy()
    # expert-parallel experts are left out (ignored_params): each process already holds only its share
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=policy, ignored_params=experts)
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=experts)  # the rest: tied embedding/head
    return model


def accumulating(model, sync, proc):
    """The context of one micro-step's forward and backward: gradients are synced only when `sync` (the last
    micro-step). DDP skips it inside no_sync(); FSDP2 is told by set_requires_gradient_sync."""
    if "fsdp" in proc.sharding:
        model.set_requires_gradient_sync(sync)
        return nullcontext()
    return nullcontext() if sync else model.no_sync()


def sync_gradients(model, proc):
    """After the last micro-step's backward: what the wrappers do not sync themselves (the expert gradients)."""
    if "ep" in proc.sharding:
        from nanomoe.distributed import expert_parallel
        expert_parallel.sync_expert_grads(model, proc.world_size)


def clip_gradients(model, max_norm, proc):
    """clip_grad_norm_ over the whole model however it is spread; -> the total norm (a plain tensor)."""
    if "ep" in proc.sharding:
        from nanomoe.distributed import expert_parallel
        return expert_parallel.clip_grad_norm_(model, max_norm)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if "fsdp" in proc.sharding else norm  # FSDP: a DTensor, summed over the shards


def local_tensor(t):
    """This process's part of a parameter (the whole tensor unless FSDP sharded it)."""
    return t.to_local() if hasattr(t, "to_local") else t


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
    """Average a dict of tensors over ranks (one all-reduce), each back on its own device: nothing is copied to
    the host, so the step hooks (reduce_mean) run every step without waiting for the GPU, and the log reads
    the numbers when it prints them."""
    if not proc.ddp:
        return values
    keys = list(values)
    flat = torch.cat([values[k].float().flatten().to(_reduce_device(proc)) for k in keys])
    dist.all_reduce(flat)
    flat = flat / proc.world_size
    out, i = {}, 0
    for k in keys:
        n = values[k].numel()
        out[k] = flat[i:i + n].view_as(values[k]).to(values[k].device)
        i += n
    return out


def reduce_mean(proc):
    """The function the model's step hooks take (GPT.start_step, end_step): a tensor -> its mean over the
    processes, on the tensor's device (the tensor itself in one process)."""
    return lambda t: mean_over_ranks({"t": t}, proc)["t"]


def gather_objects(obj, proc):
    """Every rank's obj (plain values and tensors), in rank order."""
    if not proc.ddp:
        return [obj]
    objs = [None] * proc.world_size
    dist.all_gather_object(objs, obj)
    return objs


def install_stop_handlers(master):
    """Ctrl-C, SIGTERM, SIGHUP (a closed terminal or ssh session): finish the current step (or abandon an
    evaluation), save, exit 0; a second signal exits at once. Returns the list the handler appends to (non-empty = stop asked for)."""
    stop_requested = []

    def on_signal(signum, frame):
        if stop_requested:
            os._exit(130)
        stop_requested.append(signum)
        if master:
            print(f"\n{signal.Signals(signum).name} received: stopping after this step, or now during an evaluation "
                  f"(again to quit at once)", flush=True)
    for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            signal.signal(sig, on_signal)
    return stop_requested
