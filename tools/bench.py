"""
Benchmark training steps (forward, backward, optimizer) of a dense GPT and the MoE GPT with each expert
implementation, at equal backbone and expert size, in one process:

    python -m tools.bench config/bench_cpu.py                       # small shapes, any machine
    OMP_NUM_THREADS=1 python -m tools.bench config/bench_cpu_equal_active.py --moe_top_k=1   # docs/clock.md
    python -m tools.bench config/train_gpt2_moe.py --moe_top_k=1    # GPT-2 124M shape, on a GPU

Each step is train.py's own (train.train_step: the MoE's step hooks, auxiliary losses, clipping, the
non-finite check), on random tokens. Prints one line per variant (median ms/step, split into forward+backward
and the optimizer's part, tokens/s, MFU over active parameters, peak memory) and the MoE/dense ratios. MFU is
against the GPU's bf16 peak on CUDA, and on a CPU against the FLOP/s of a large float32 matmul timed at the
start. Accepts every train.py config key and vocab_size, plus the few below.
"""
import math
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

from model import mlp_hidden_size
from nanomoe.checkpoint import model_state, save_checkpoint
from nanomoe.cli import run_cli
from nanomoe.configurator import parse_args
from nanomoe.data import to_device
from nanomoe.device import autocast_context, cpu_matmul_flops, gpu_peak_flops
from nanomoe.distributed.parallel import setup_processes
from nanomoe.errors import UserError
from nanomoe.factory import build_model, model_keys
from nanomoe.layers.moe_stages import PREFIX, STAGES
from nanomoe.optim import build_optimizer
from nanomoe.settings import Valid, script_keys
from train import RUN_KEYS, train_step

# -----------------------------------------------------------------------------
# bench's own keys; every train.py and model key is one too (vocab_size included: there is no dataset)
bench_variants = "dense,loop,grouped"  # which of dense, loop, grouped to run
bench_warmup: Valid(min=0) = 3  # untimed steps first (compilation, allocator warm-up)
bench_steps: Valid(min=1) = 10  # timed steps; the median is reported
bench_checkpoint = True  # also time an atomic save of the full training checkpoint (model + AdamW state)
bench_equal_active = False  # experts at the dense MLP's active compute: expert_hidden = F / (top_k + shared)
bench_profile = False  # also, per MoE variant, a table of where an MoE layer's time goes (torch.profiler)
bench_sweep = ""  # KEY=V1,V2,...: one line per value, e.g. n_embd=128,256,512,768 or gradient_accumulation_steps=1,8,32
# -----------------------------------------------------------------------------
KEYS = {**RUN_KEYS, **model_keys(), **script_keys(sys.modules[__name__])}
VARIANTS = ("dense", "loop", "grouped")
CPU_PEAK_SIZE = 2048  # the matmul a CPU's MFU is measured against: large enough to run at the BLAS's best
GPU_SIZED_SECONDS = 10 * 60  # a bench on a CPU estimated longer than this gets a note before it starts


def build(variant, cfg):
    """The dense GPT, or the MoE with the variant's expert implementation, from the same settings."""
    torch.manual_seed(cfg.seed)
    if variant == "dense":
        return build_model({**vars(cfg), "n_experts": 0})
    return build_model({**vars(cfg), "moe_impl": variant})


def equal_active(cfg):
    """cfg with bench_equal_active applied: each expert's hidden size F / (moe_top_k + n_shared_experts), so a
    token's routed and shared experts together do the dense MLP's work (F = its hidden size). Rounded to a
    multiple of 8 where it does not divide (the grouped kernel's rows are 16-byte multiples)."""
    if not cfg.bench_equal_active or cfg.n_experts < 1:
        return cfg
    if cfg.expert_hidden is not None:
        raise UserError(f"bench_equal_active=True sets expert_hidden itself, but expert_hidden={cfg.expert_hidden} "
                        f"is given too: drop --expert_hidden, or set --bench_equal_active=False")
    dense_hidden, active = mlp_hidden_size(cfg), cfg.moe_top_k + cfg.n_shared_experts
    hidden = dense_hidden // active if dense_hidden % active == 0 else max(8, round(dense_hidden / active / 8) * 8)
    return SimpleNamespace(**{**vars(cfg), "expert_hidden": hidden})


def make_step(variant, cfg, proc):
    """(model, optimizer, step): the variant's model on proc.device and a function that runs one training step
    of it on fresh random tokens, exactly as train.py would (train_step), and returns the seconds of its
    forward+backward (every micro-step) and of the rest (clipping, the optimizer's update, zero_grad)."""
    model = build(variant, cfg).to(proc.device)
    optimizer = build_optimizer(model, vars(cfg), proc.device_type)
    runs = torch.compile(model) if proc.compile else model
    ctx = autocast_context(proc.device, proc.dtype)
    clock = device_clock(proc)
    scaler = MarkingScaler(proc.device_type, enabled=(proc.dtype == "float16"), clock=clock)
    gen = torch.Generator().manual_seed(cfg.seed)
    shape = (cfg.batch_size, cfg.block_size)

    def step():
        batches = [(to_device(torch.randint(cfg.vocab_size, shape, generator=gen), proc.device),
                    to_device(torch.randint(cfg.vocab_size, shape, generator=gen), proc.device))
                   for _ in range(cfg.gradient_accumulation_steps)]
        t0 = clock()
        train_step(runs, model, optimizer, scaler, batches, ctx, proc, cfg.grad_clip)
        t1 = clock()
        return scaler.mark - t0, t1 - scaler.mark
    return model, optimizer, step


class MarkingScaler(torch.amp.GradScaler):
    """train_step's GradScaler, which also reads the clock when train_step unscales the gradients: the moment
    the last backward has ended and the optimizer's part of the step begins."""

    def __init__(self, *args, clock, **kwargs):
        super().__init__(*args, **kwargs)
        self.clock, self.mark = clock, None

    def unscale_(self, optimizer):
        self.mark = self.clock()
        return super().unscale_(optimizer)


def device_clock(proc):
    """perf_counter after the device has finished its queued work."""
    def clock():
        if proc.device_type == "cuda":
            torch.cuda.synchronize()
        elif proc.device_type == "mps":
            torch.mps.synchronize()
        return time.perf_counter()
    return clock


def run_variants(variants, cfg, proc):
    """Yield, variant by variant: (variant, model, optimizer, step, medians of 'step', 'fwd_bwd' and
    'optimizer' seconds, peak memory in bytes or None). On a GPU each variant runs alone (its own peak memory,
    then freed); elsewhere all are built first and take turns step by step, so a machine shared with other
    work slows them alike and their ratios hold."""
    if proc.device_type != "cuda":
        made = {v: make_step(v, cfg, proc) for v in variants}
        times = time_steps({v: m[2] for v, m in made.items()}, cfg)
        for v in variants:
            yield (v, *made.pop(v), times[v], None)
        return
    for v in variants:
        model, optimizer, step = make_step(v, cfg, proc)
        times = time_steps({v: step}, cfg, after_warmup=lambda: torch.cuda.reset_peak_memory_stats(proc.device))
        yield v, model, optimizer, step, times[v], torch.cuda.max_memory_allocated(proc.device)
        del model, optimizer, step
        torch.cuda.empty_cache()


def time_steps(steps, cfg, after_warmup=None):
    """{variant: medians} of the step functions `steps` (make_step's), after bench_warmup untimed steps each,
    the variants taking turns."""
    for step in steps.values():
        for _ in range(cfg.bench_warmup):
            step()
    if after_warmup:
        after_warmup()
    parts = {v: [] for v in steps}
    for _ in range(cfg.bench_steps):
        for v, step in steps.items():
            parts[v].append(step())
    return {v: {"step": statistics.median(f + o for f, o in p), "fwd_bwd": statistics.median(f for f, _ in p),
                "optimizer": statistics.median(o for _, o in p)} for v, p in parts.items()}


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


def profile_moe(step, proc, steps):
    """Lines of a table: where the MoE layers' time goes over `steps` training steps under torch.profiler,
    per stage (nanomoe/layers/moe_stages.py): each stage's forward ops, and the backward of those ops, found
    by their autograd sequence number. CPU time on a CPU, GPU time on CUDA; ms per step, all MoE layers."""
    from torch.profiler import ProfilerActivity, profile
    on_gpu = proc.device_type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - t0) / steps
    events = prof.events()

    def spent(e):
        return (e.device_time_total if on_gpu else e.cpu_time_total) / 1000 / steps  # ms per step

    forward = dict.fromkeys(STAGES, 0.0)
    backward = dict.fromkeys(STAGES, 0.0)
    ops = []  # (start, thread, sequence number, stage) of every op inside a stage
    for e in events:
        name = e.name[len(PREFIX):] if e.name.startswith(PREFIX) else None
        if name not in STAGES:
            continue
        forward[name] += spent(e)
        todo = list(e.cpu_children)
        while todo:  # the stage's ops, down to the leaves (stages do not nest: a range inside is its own)
            child = todo.pop()
            if child.name.startswith(PREFIX):
                continue
            if child.sequence_nr >= 0:
                ops.append((child.time_range.start, child.thread, child.sequence_nr, name))
            todo.extend(child.cpu_children)
    # an op that creates no autograd node reports the number the next node will take, so a number belongs to
    # the last op (in time) that reports it: the one that created the node
    stage_of = {(thread, seq): name for _, thread, seq, name in sorted(ops)}
    for e in events:  # a backward node carries the sequence number and thread of the forward op it undoes
        if e.name.startswith("autograd::engine::evaluate_function") and e.sequence_nr >= 0:
            name = stage_of.get((e.fwd_thread, e.sequence_nr))
            if name is not None:
                backward[name] += spent(e)
    total = sum(forward.values()) + sum(backward.values())
    lines = [f"  {'stage':40s} {'forward':>9s} {'backward':>9s} {'total':>9s} {'share':>6s}"]
    for name, label in STAGES.items():
        both = forward[name] + backward[name]
        lines.append(f"  {label:40s} {forward[name]:9.2f} {backward[name]:9.2f} {both:9.2f} "
                     f"{100 * both / max(total, 1e-9):5.1f}%")
    lines.append(f"  {'MoE layers, all stages':40s} {sum(forward.values()):9.2f} {sum(backward.values()):9.2f} "
                 f"{total:9.2f}   (of a {wall * 1000:.2f} ms step with the profiler on: {100 * total / 1000 / wall:.0f}%)")
    return lines


def parse_sweep(cfg):
    """bench_sweep 'KEY=V1,V2,...' -> (key, [each point's settings]), each value checked as --KEY=V would be;
    (None, []) when unset."""
    if not cfg.bench_sweep:
        return None, []
    key, sep, raw = cfg.bench_sweep.partition("=")
    key = key.strip()
    values = [v.strip() for v in raw.split(",") if v.strip()]
    if not sep or not values:
        raise UserError(f"bench_sweep={cfg.bench_sweep!r} is not KEY=V1,V2,...; write e.g. "
                        f"--bench_sweep=n_embd=128,256,512,768 or --bench_sweep=gradient_accumulation_steps=1,8,32")
    if key not in KEYS or key.startswith("bench_"):
        raise UserError(f"bench_sweep sweeps {key!r}, which is not a model or train.py key; sweep e.g. n_embd, "
                        f"batch_size or gradient_accumulation_steps")
    if cfg.bench_profile:
        raise UserError("bench_profile=True and bench_sweep each run their own pass; run them one at a time")
    points = [SimpleNamespace(**{**vars(cfg), key: parse_args(KEYS, [f"--{key}={v}"])[key]}) for v in values]
    return key, [equal_active(p) for p in points]


def estimate_cpu_seconds(variants, points, cpu_peak):
    """Seconds the timed and warm-up steps would take on this CPU at its matmul speed (models built on the
    meta device: no memory, no time; a bad shape fails here, before anything runs)."""
    seconds = 0.0
    for cfg in points:
        tokens = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
        for variant in variants:
            with torch.device("meta"):
                model = build(variant, cfg)
            seconds += (cfg.bench_warmup + cfg.bench_steps) * model.flops_per_token() * tokens / cpu_peak
    return seconds


def ratio_lines(results):
    """'ratio: ...', 'ratio fwd+bwd: ...', 'ratio optimizer: ...': each MoE variant over dense."""
    if "dense" not in results:
        return []
    lines = []
    for part, label in (("step", "ratio"), ("fwd_bwd", "ratio fwd+bwd"), ("optimizer", "ratio optimizer")):
        ratios = [f"moe-{v}/dense {results[v][part] / results['dense'][part]:.2f}x" for v in ("loop", "grouped")
                  if v in results]
        if ratios:
            lines.append(f"{label}: " + ", ".join(ratios))
    return lines


def main(argv=None):
    cfg = SimpleNamespace(**parse_args(KEYS, sys.argv[1:] if argv is None else argv))
    variants = [v.strip() for v in cfg.bench_variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise UserError(f"bench_variants has {unknown or 'nothing'}; use a comma-separated list of dense, loop, grouped")
    if cfg.n_experts < 1 and set(variants) - {"dense"}:
        raise UserError("the MoE variants need experts: set --n_experts (e.g. --n_experts=8), or "
                        "--bench_variants=dense")
    sweep_key, points = parse_sweep(cfg)
    cfg = equal_active(cfg)
    proc = setup_processes(cfg)
    if proc.device_type == "cpu":
        if cfg.peak_flops:
            peak = float(cfg.peak_flops)
        else:
            peak = cpu_matmul_flops(CPU_PEAK_SIZE)
            print(f"cpu peak: {peak / 1e9:.1f} GFLOP/s, a {CPU_PEAK_SIZE}x{CPU_PEAK_SIZE} float32 matmul on "
                  f"{torch.get_num_threads()} thread(s) (MFU below is against it)", flush=True)
        seconds = estimate_cpu_seconds(variants, points or [cfg], peak)
        if seconds > GPU_SIZED_SECONDS:
            print(f"note: this config is sized for a GPU: on this CPU the bench would take about "
                  f"{seconds / 3600:.1f} hours (estimated from its matmul speed). For a run of a minute try "
                  f"config/bench_cpu.py", flush=True)
    else:
        peak = gpu_peak_flops(proc.device, cfg.peak_flops)
    name = torch.cuda.get_device_name(proc.device) if proc.device_type == "cuda" else proc.device
    hidden = (f"expert_hidden {cfg.expert_hidden} (equal active: {mlp_hidden_size(cfg)} / "
              f"{cfg.moe_top_k + cfg.n_shared_experts})" if cfg.bench_equal_active else
              f"expert_hidden {cfg.expert_hidden or mlp_hidden_size(cfg)}")
    print(f"device {name}, dtype {proc.dtype}, compile {proc.compile}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); {cfg.n_layer} layers x {cfg.n_embd}, block {cfg.block_size}, "
          f"batch {cfg.batch_size} x {cfg.gradient_accumulation_steps}; MoE: {cfg.n_experts} experts, "
          f"top-{cfg.moe_top_k}, {cfg.n_shared_experts} shared, {hidden}, every {cfg.moe_every} layer(s), "
          f"capacity_factor {cfg.capacity_factor}; "
          + (f"Mamba2 layers {cfg.mamba_layers}; " if cfg.mamba_layers else "") + f"median of {cfg.bench_steps} steps",
          flush=True)
    if points:
        for point in points:
            sweep_point(sweep_key, point, variants, proc)
        return
    tokens = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    results = {}
    for variant, model, optimizer, step, times, mem in run_variants(variants, cfg, proc):
        save = time_checkpoint_save(model, optimizer) if cfg.bench_checkpoint else None
        dt = times["step"]
        mfu = model.estimate_mfu(tokens, dt, peak)
        results[variant] = times
        label = "dense" if variant == "dense" else f"moe-{variant}"
        print(f"{label:12s} {dt * 1000:9.2f} ms/step  {tokens / dt:12,.0f} tok/s  "
              f"fwd+bwd {times['fwd_bwd'] * 1000:.2f} ms  optimizer {times['optimizer'] * 1000:.2f} ms  "
              f"mfu {'n/a' if mfu is None else f'{mfu * 100:5.1f}%'}  "
              f"peak mem {'n/a' if mem is None else f'{mem / 2**30:.2f} GiB'}  "
              f"params {model.get_num_params() / 1e6:.2f}M, active {model.num_active_params() / 1e6:.2f}M"
              + (f"  ckpt save {save[0] * 1000:.0f} ms ({save[1] / 2**20:.1f} MiB)" if save else ""), flush=True)
        if cfg.bench_profile and variant != "dense":
            steps = min(cfg.bench_steps, 3)
            print(f"profile {label}: where the MoE layers' time goes, ms per step ({steps} steps under "
                  f"torch.profiler, {'GPU' if proc.device_type == 'cuda' else 'CPU'} time)")
            print("\n".join(profile_moe(step, proc, steps)), flush=True)
        del model, optimizer, step
    for line in ratio_lines(results):
        print(line)


def sweep_point(key, cfg, variants, proc):
    """One line: each variant's ms/step (forward+backward, optimizer) at this point, and the ratios to dense."""
    results = {v: times for v, _, _, _, times, _ in run_variants(variants, cfg, proc)}
    cells = [f"{'dense' if v == 'dense' else 'moe-' + v} {t['step'] * 1000:.2f} ms (fwd+bwd "
             f"{t['fwd_bwd'] * 1000:.2f}, opt {t['optimizer'] * 1000:.2f})" for v, t in results.items()]
    ratios = [f"moe-{v}/dense step {results[v]['step'] / results['dense']['step']:.2f}x fwd+bwd "
              f"{results[v]['fwd_bwd'] / results['dense']['fwd_bwd']:.2f}x opt "
              f"{results[v]['optimizer'] / results['dense']['optimizer']:.2f}x"
              for v in ("loop", "grouped") if v in results and "dense" in results]
    tokens = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    print(f"sweep {key}={getattr(cfg, key)} ({tokens:,} tok/step): " + ", ".join(cells)
          + ("; " + ", ".join(ratios) if ratios else ""), flush=True)


if __name__ == "__main__":
    run_cli(main)
