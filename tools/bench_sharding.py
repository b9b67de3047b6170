"""
What each process holds under DDP, FSDP and expert parallel: one training step (train.py's train_step) on
random tokens, then every rank reports the bytes of the parameters, gradients and Adam moments it keeps and
its peak resident memory (ru_maxrss). Takes train.py's config files and flags, launched like train.py:

    torchrun --standalone --nproc_per_node=2 -m tools.bench_sharding config/train_gpt2_moe.py --fsdp=True
    torchrun --standalone --nproc_per_node=4 -m tools.bench_sharding config/train_gpt2_moe.py --ep_size=4

Every rank first builds the whole model (as train.py does) and then shards it, so the peak RSS includes one
full copy of the fp32 weights whatever the mode; the held bytes are what a step needs afterwards. A gradient
has its parameter's shape and sharding, so the gradients a step holds are counted as the bytes of the
trainable parameters (the step frees them at its end, as train.py's does).
"""
import resource
import sys
import time
from types import SimpleNamespace

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from nanomoe.cli import run_cli
from nanomoe.configurator import parse_args
from nanomoe.data import to_device
from nanomoe.device import autocast_context, synchronize
from nanomoe.distributed.parallel import (check_sharding, finish, gather_objects, join, local_tensor,
                                          setup_processes, shard)
from nanomoe.factory import build_model, model_keys
from nanomoe.optim import configure_optimizers
from train import RUN_KEYS, train_step

KEYS = {**RUN_KEYS, **model_keys()}  # train.py's keys, vocab_size included (there is no dataset)


def main():
    cfg = SimpleNamespace(**parse_args(KEYS, sys.argv[1:]))
    proc = setup_processes(cfg)
    check_sharding(cfg, proc)
    join(proc, cfg.backend)
    torch.manual_seed(cfg.seed)
    raw = build_model(vars(cfg)).to(proc.device)
    if proc.sharding:
        model = shard(raw, cfg, proc)
    else:
        model = DDP(raw) if proc.ddp else raw
    optimizer = configure_optimizers(raw, cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                     proc.device_type)
    ctx = autocast_context(proc.device, proc.dtype)
    scaler = torch.amp.GradScaler(proc.device_type, enabled=(proc.dtype == "float16"))
    gen = torch.Generator().manual_seed(cfg.seed + proc.rank)
    times = []
    for step in range(3):  # the first step allocates Adam's moments; the others are timed
        synchronize(proc.device)  # the step queues its work on a GPU: time it from an idle device to the end
        t0 = time.perf_counter()
        x = to_device(torch.randint(0, raw.config.vocab_size, (cfg.batch_size, cfg.block_size), generator=gen),
                      proc.device)
        train_step(model, raw, optimizer, scaler, [(x, x)], ctx, proc, cfg.grad_clip)
        synchronize(proc.device)
        times.append(time.perf_counter() - t0)
    trainable = sum(nbytes(p) for p in raw.parameters() if p.requires_grad)
    held = {"params": sum(nbytes(p) for p in raw.parameters()), "grads": trainable,
            "adam": sum(nbytes(t) for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))}
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    reports = gather_objects({**held, "peak_rss": peak_rss, "step_s": min(times[1:])}, proc)
    if proc.master:
        mode = "+".join(proc.sharding) or ("ddp" if proc.ddp else "one process")
        n = sum(p.numel() for p in raw.parameters()) if not proc.sharding else None
        print(f"{mode}, {proc.world_size} process(es){f', {n / 1e6:.1f}M parameters' if n else ''}")
        for rank, r in enumerate(reports):
            total = r["params"] + r["grads"] + r["adam"]
            print(f"rank {rank}: params {gib(r['params'])} + grads {gib(r['grads'])} + adam {gib(r['adam'])} = "
                  f"{gib(total)} GiB held; peak RSS {gib(r['peak_rss'])} GiB; step {r['step_s'] * 1000:.0f} ms")
    finish(proc)


def nbytes(t):
    t = local_tensor(t)
    return t.numel() * t.element_size()


def gib(n):
    return f"{n / 2**30:.3f}"


if __name__ == "__main__":
    run_cli(main)
