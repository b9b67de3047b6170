"""
Benchmark training steps (forward, backward, optimizer) of a dense GPT and the MoE GPT with each expert
implementation, at equal backbone and expert size, in one process:

    python -m tools.bench config/bench_cpu.py                       # small shapes, any machine
    python -m tools.bench config/train_gpt2_moe.py --moe_top_k=1    # GPT-2 124M shape, on a GPU

Each step is train.py's own (train.train_step: the MoE's step hooks, auxiliary losses, clipping, the
non-finite check), on random tokens. Prints one line per variant (median ms/step, tokens/s, MFU over active
parameters, peak memory) and the MoE/dense ratios. Accepts every train.py config key and vocab_size, plus the
few below.
"""
import os
import signal
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace

if __name__ == "__main__":  # Ctrl-C while the imports below load: exit quietly with 130, no traceback
    signal.signal(signal.SIGINT, lambda signum, frame: sys.exit(130))

import torch

from nanomoe.checkpoint import model_state, save_checkpoint
from nanomoe.cli import run_cli
from nanomoe.configurator import parse_args
from nanomoe.data import to_device
from nanomoe.device import autocast_context, gpu_peak_flops
from nanomoe.distributed.parallel import setup_processes
from nanomoe.errors import UserError
from nanomoe.factory import build_model, model_keys
from nanomoe.optim import build_optimizer
from nanomoe.settings import Valid, script_keys
from train import RUN_KEYS, train_step

# -----------------------------------------------------------------------------
# bench's own keys; every train.py and model key is one too (vocab_size included: there is no dataset)
bench_variants = "dense,loop,grouped"  # which of dense, loop, grouped to run
bench_warmup: Valid(min=0) = 3  # untimed steps first (compilation, allocator warm-up)
bench_steps: Valid(min=1) = 10  # timed steps; the median is reported
bench_checkpoint = True  # also time an atomic save of the full training checkpoint (model + AdamW state)
# -----------------------------------------------------------------------------
KEYS = {**RUN_KEYS, **model_keys(), **script_keys(sys.modules[__name__])}
VARIANTS = ("dense", "loop", "grouped")


def build(variant, cfg):
    """The dense GPT, or the MoE with the variant's expert implementation, from the same settings."""
    torch.manual_seed(cfg.seed)
    if variant == "dense":
        return build_model({**vars(cfg), "n_experts": 0})
    return build_model({**vars(cfg), "moe_impl": variant})


def make_step(variant, cfg, proc):
    """(model, step): the variant's model on proc.device and a function that runs one training step of it on
    fresh random tokens, exactly as train.py would (train_step)."""
    model = build(variant, cfg).to(proc.device)
    optimizer = build_optimizer(model, vars(cfg), proc.device_type)
    runs = torch.compile(model) if proc.compile else model
    ctx = autocast_context(proc.device, proc.dtype)
    scaler = torch.amp.GradScaler(proc.device_type, enabled=(proc.dtype == "float16"))
    gen = torch.Generator().manual_seed(cfg.seed)
    shape = (cfg.batch_size, cfg.block_size)

    def step():
        batches = [(to_device(torch.randint(cfg.vocab_size, shape, generator=gen), proc.device),
                    to_device(torch.randint(cfg.vocab_size, shape, generator=gen), proc.device))
                   for _ in range(cfg.gradient_accumulation_steps)]
        train_step(runs, model, optimizer, scaler, batches, ctx, proc, cfg.grad_clip)
    return model, optimizer, step


def bench_variant(variant, cfg, proc):
    """(model, median seconds per training step, peak memory in bytes (CUDA only), checkpoint save) of one
    variant."""
    model, optimizer, step = make_step(variant, cfg, proc)

    def sync():
        if proc.device_type == "cuda":
            torch.cuda.synchronize()
        elif proc.device_type == "mps":
            torch.mps.synchronize()

    for _ in range(cfg.bench_warmup):
        step()
    sync()
    if proc.device_type == "cuda":
        torch.cuda.reset_peak_memory_stats(proc.device)
    times = []
    for _ in range(cfg.bench_steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    peak_mem = torch.cuda.max_memory_allocated(proc.device) if proc.device_type == "cuda" else None
    save = time_checkpoint_save(model, optimizer) if cfg.bench_checkpoint else None
    return model, statistics.median(times), peak_mem, save


def time_checkpoint_save(model, optimizer, repeats=3):
    """Median seconds of an atomic save (temp file, fsync, rename) of what train.py saves, and its size."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "ckpt.pt")
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            save_checkpoint({**model_state(model), "optimizer": optimizer.state_dict()}, path)
            times.append(time.perf_counter() - t0)
        return statistics.median(times), os.path.getsize(path)


def main(argv=None):
    cfg = SimpleNamespace(**parse_args(KEYS, sys.argv[1:] if argv is None else argv))
    variants = [v.strip() for v in cfg.bench_variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise UserError(f"bench_variants has {unknown or 'nothing'}; use a comma-separated list of dense, loop, grouped")
    if cfg.n_experts < 1 and set(variants) - {"dense"}:
        raise UserError("the MoE variants need experts: set --n_experts (e.g. --n_experts=8), or "
                        "--bench_variants=dense")
    proc = setup_processes(cfg)
    peak = gpu_peak_flops(proc.device, cfg.peak_flops)
    tokens = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    name = torch.cuda.get_device_name(proc.device) if proc.device_type == "cuda" else proc.device
    print(f"device {name}, dtype {proc.dtype}, compile {proc.compile}, torch {torch.__version__}; "
          f"{cfg.n_layer} layers x {cfg.n_embd}, block {cfg.block_size}, batch {cfg.batch_size} x "
          f"{cfg.gradient_accumulation_steps}; MoE: {cfg.n_experts} experts, top-{cfg.moe_top_k}, every "
          f"{cfg.moe_every} layer(s), capacity_factor {cfg.capacity_factor}; "
          + (f"Mamba2 layers {cfg.mamba_layers}; " if cfg.mamba_layers else "") + f"median of {cfg.bench_steps} steps")
    results = {}
    for variant in variants:
        model, dt, mem, save = bench_variant(variant, cfg, proc)
        mfu = model.estimate_mfu(tokens, dt, peak)
        results[variant] = dt
        label = "dense" if variant == "dense" else f"moe-{variant}"
        print(f"{label:12s} {dt * 1000:9.2f} ms/step  {tokens / dt:12,.0f} tok/s  "
              f"mfu {'n/a' if mfu is None else f'{mfu * 100:5.1f}%'}  "
              f"peak mem {'n/a' if mem is None else f'{mem / 2**30:.2f} GiB'}  "
              f"params {model.get_num_params() / 1e6:.2f}M, active {model.num_active_params() / 1e6:.2f}M"
              + (f"  ckpt save {save[0] * 1000:.0f} ms ({save[1] / 2**20:.1f} MiB)" if save else ""), flush=True)
        del model
        if proc.device_type == "cuda":
            torch.cuda.empty_cache()
    if "dense" in results:
        ratios = [f"moe-{v}/dense {results[v] / results['dense']:.2f}x" for v in ("loop", "grouped") if v in results]
        if ratios:
            print("ratio: " + ", ".join(ratios))


if __name__ == "__main__":
    run_cli(main)
