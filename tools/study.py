"""
The routing study: dense vs Mixture-of-Experts GPTs at equal active compute per token, trained by train.py on
the same data, steps, schedule and seeds, compared on val loss at equal tokens and on the clock
(docs/study.md, written by this tool).

    python -m tools.study --force                            # CPU scale, both char corpora -> docs/study.md
    python -m tools.study --corpora shakespeare_char --variants dense,top2x8-aux --seeds 1 --docs out-docs
    python -m tools.study --optimizers adamw --jobs 1 --docs out-docs   # AdamW only, one run at a time

Every variant's FFN does the same work per token: the dense SwiGLU MLP has hidden size F, and an MoE layer runs
k experts of hidden F/k (shared experts counted), so the active compute per token is equal up to the router's
E x n_embd. Everything else is the CPU recipe of config/train_shakespeare_llama_cpu.py: a Llama-style
backbone (RoPE, RMSNorm, SwiGLU, no biases), 4 layers x 128, 2,000 steps of 12 x 64 tokens.

Two rounds, so that no figure in the table is the seed the winner was picked on:
  1. selection: every variant with seed 1337; the best MoE variant is the one with the lowest final val loss;
  2. comparison: dense and the best MoE (each with every optimizer of --optimizers) on fresh seeds
     1338 .. 1337 + --seeds. The table reports these only.
The target is dense-AdamW's final val loss (the mean over the comparison seeds). For each run, the training
tokens and training wall time at which its val loss first reaches the target (linear between evals) is its
"time to target"; the ratios divide it by the whole run of dense-AdamW with the same seed.

Runs go to --work/<corpus>/<variant>-s<seed>/. --jobs 2 trains two runs side by side, in the order
dense, MoE, dense, MoE ... of each round, so a busy machine slows both arms alike. A finished run is read back,
not run again; an interrupted one continues from its last checkpoint (train.py --init_from=resume, bit-exact),
so an interrupted study continues where it stopped. Wall time is the sum of the logged step times: evals,
start-up and checkpoint writes do not count.
"""
import json
import os
import statistics
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

from nanomoe.cli import ArgumentParser, pyplot, run_cli
from nanomoe.errors import UserError
from nanomoe.files import atomic_write
from nanomoe.metrics import read_metrics
from model import mlp_hidden_size

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # train.py and prepare.py are run from here
NEEDS_MATPLOTLIB = "tools.study needs matplotlib for its plots"

# the model and run at each scale: everything but the FFN is shared by all variants
SCALES = {
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, gradient_accumulation_steps=1,
                max_iters=2000, eval_interval=100, eval_iters=20, learning_rate=1e-3, warmup_iters=100,
                lr_decay_iters=2000, min_lr=1e-4, beta2=0.99, device="cpu", compile=False, dtype="float32"),
    "gpu": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, gradient_accumulation_steps=1,
                max_iters=5000, eval_interval=250, eval_iters=200, learning_rate=1e-3, warmup_iters=100,
                lr_decay_iters=5000, min_lr=1e-4, beta2=0.99),
}
COMMON = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, dropout=0.0, log_interval=1,
              always_save_checkpoint=False)
SEED = 1337  # the selection round's seed; the comparison takes the next ones


def moe(E, k, hidden_div, **extra):
    """An MoE variant: E experts, top-k, each expert of hidden size F / hidden_div."""
    return lambda F: dict(n_experts=E, moe_top_k=k, expert_hidden=F // hidden_div, **extra)


VARIANTS = {
    "dense": lambda F: {},
    "top2x8-aux": moe(8, 2, 2, balance_mode="aux", balance_scope="micro"),
    "top2x8-global": moe(8, 2, 2, balance_mode="aux", balance_scope="global"),
    "top2x8-auxfree": moe(8, 2, 2, balance_mode="aux_free"),
    "top2x8-none": moe(8, 2, 2, balance_mode="none"),
    "top1x8-switch": moe(8, 1, 1, balance_mode="aux"),
    "top3x16+1-fine": moe(16, 3, 4, n_shared_experts=1, balance_mode="aux"),
    "top2x8-auxfree-sigmoid": moe(8, 2, 2, balance_mode="aux_free", router_score="sigmoid"),
}
DEFAULT_VARIANTS = "dense,top2x8-aux,top2x8-auxfree,top3x16+1-fine"
CORPORA = ("shakespeare_char", "pystdlib_char", "pystdlib_gpt2")
OPTIMIZERS = ("adamw", "muon")


def parse_args(argv):
    p = ArgumentParser(prog="python -m tools.study",
                       description="Train dense and MoE variants at equal active compute; plot and tabulate.")
    p.add_argument("--scale", choices=tuple(SCALES), default="cpu", help="model and run size (default cpu)")
    p.add_argument("--corpora", default="shakespeare_char,pystdlib_char",
                   help=f"comma list of {', '.join(CORPORA)} (default: the two char corpora)")
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help=f"comma list of {', '.join(VARIANTS)} (default: {DEFAULT_VARIANTS})")
    p.add_argument("--seeds", type=int, default=3, help="fresh seeds of the comparison round (default 3)")
    p.add_argument("--optimizers", default="adamw,muon",
                   help="comma list of adamw, muon: the comparison round trains dense and the best MoE with each "
                   "(default adamw,muon)")
    p.add_argument("--muon_lr", type=float, default=0.005,
                   help="muon_lr of the Muon arms (default 0.005, tuned in docs/muon.md)")
    p.add_argument("--jobs", type=int, default=2, help="runs trained side by side (default 2)")
    p.add_argument("--max_iters", type=int, help="override the scale's optimizer steps")
    p.add_argument("--eval_iters", type=int, help="override the scale's eval batches per split (fewer: quicker, "
                   "noisier curves)")
    p.add_argument("--max_chars", type=int, default=5_000_000, help="pystdlib: characters kept (default 5M)")
    p.add_argument("--data_root", default="data", help="where datasets are (prepared there when missing)")
    p.add_argument("--shakespeare_input", help="tiny-shakespeare input.txt to prepare from (default: download)")
    p.add_argument("--work", default="out-study", help="folder for the runs (default out-study)")
    p.add_argument("--docs", default="docs", help="where study.md and its plots go (default docs)")
    p.add_argument("--force", action="store_true", help="replace a study.md or plots that already exist")
    args = p.parse_args(argv)
    args.corpora = args.corpora.split(",")
    args.variants = args.variants.split(",")
    args.optimizers = args.optimizers.split(",")
    for name, known in (("corpora", CORPORA), ("variants", VARIANTS), ("optimizers", OPTIMIZERS)):
        bad = [v for v in getattr(args, name) if v not in known]
        if bad:
            raise UserError(f"unknown {name} {', '.join(bad)} (known: {', '.join(known)})")
    if "adamw" not in args.optimizers:
        raise UserError("--optimizers must include adamw: the target is dense-AdamW's final val loss")
    for name in ("seeds", "jobs", "max_iters", "eval_iters"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if not 0 < args.muon_lr < float("inf"):
        raise UserError(f"--muon_lr must be a positive finite number, got {args.muon_lr}")
    if os.path.exists(args.docs) and not os.path.isdir(args.docs):
        raise UserError(f"--docs {args.docs} is a file, not a folder: choose another --docs")
    existing = [p for p in outputs(args) if os.path.exists(p)]
    if existing and not args.force:
        raise UserError(f"{existing[0]} already exists: add --force to replace it, or choose another --docs")
    return args


def outputs(args):
    return [os.path.join(args.docs, "study.md")] + [plot_path(args, c) for c in args.corpora]


def plot_path(args, corpus):
    return os.path.join(args.docs, f"study_{args.scale}_{corpus}.png")


def prepare(corpus, args):
    """Prepare the corpus under data_root unless it is there."""
    if os.path.isfile(os.path.join(args.data_root, corpus, "meta.json")):
        return
    cmd = [sys.executable, os.path.join(REPO, "prepare.py")]
    if corpus == "shakespeare_char":
        cmd += ["shakespeare_char"] + (["--input", args.shakespeare_input] if args.shakespeare_input else [])
    else:
        cmd += ["text", "--input", sysconfig.get_paths()["stdlib"], "--name", corpus, "--glob", "*.py",
                "--exclude", "site-packages", "--max_chars", str(args.max_chars),
                "--tokenizer", corpus.rsplit("_", 1)[1]]
    r = subprocess.run(cmd + ["--data_root", args.data_root], capture_output=True, text=True)
    if r.returncode:
        raise UserError(f"preparing {corpus} failed: {(r.stderr or r.stdout).strip().splitlines()[-1]}")


def dense_hidden(settings):
    return mlp_hidden_size(SimpleNamespace(mlp=settings["mlp"], n_embd=settings["n_embd"]))


def arm_name(variant, optimizer):
    return variant if optimizer == "adamw" else f"{variant}+{optimizer}"


def train_flags(corpus, variant, optimizer, seed, args):
    settings = {**SCALES[args.scale], **COMMON}
    if args.max_iters:
        settings.update(max_iters=args.max_iters, lr_decay_iters=args.max_iters,
                        warmup_iters=min(settings["warmup_iters"], args.max_iters // 10),
                        eval_interval=max(1, args.max_iters // 10))
    if args.eval_iters:
        settings.update(eval_iters=args.eval_iters)
    settings.update(VARIANTS[variant](dense_hidden(settings)))
    if optimizer != "adamw":
        settings.update(optimizer=optimizer, muon_lr=args.muon_lr)
    settings.update(dataset=corpus, data_root=args.data_root, seed=seed,
                    out_dir=os.path.join(args.work, corpus, f"{arm_name(variant, optimizer)}-s{seed}"))
    return settings


def finished(out_dir, max_iters):
    return os.path.isfile(os.path.join(out_dir, "metrics.jsonl")) and any(
        r.get("type") == "eval" and r["iter"] == max_iters for r in read_metrics(out_dir))


def train(corpus, variant, optimizer, seed, args):
    """Run train.py for one arm and seed unless it has finished (continuing it if it was interrupted after a
    checkpoint); -> its summary."""
    s = train_flags(corpus, variant, optimizer, seed, args)
    out = s["out_dir"]
    if not finished(out, s["max_iters"]):
        if os.path.isfile(os.path.join(out, "ckpt.pt")):
            s["init_from"] = "resume"
        elif os.path.isdir(out):  # stopped before its first checkpoint: nothing to keep
            for name in os.listdir(out):
                os.remove(os.path.join(out, name))
        print(f"== {corpus} {arm_name(variant, optimizer)} seed {seed}"
              + (" (continued)" if "init_from" in s else ""), flush=True)
        cmd = [sys.executable, os.path.join(REPO, "train.py")] + [f"--{k}={v}" for k, v in s.items()]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # one thread: steadier
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
        if r.returncode:
            raise UserError(f"{arm_name(variant, optimizer)} seed {seed} on {corpus} failed:\n"
                            f"{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return summarize(read_metrics(out), arm_name(variant, optimizer), seed)


def train_all(runs, args):
    """Train (variant, optimizer, seed) runs of one corpus, --jobs at a time in the given order."""
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        return list(pool.map(lambda r: train(*r, args), runs))


def summarize(records, arm, seed):
    """Curves and the table's numbers of one run. Wall time is training time only (the sum of the logged
    step times up to each eval), so evals, startup and the machine's other work between steps do not count."""
    steps = {r["iter"]: r["ms_per_iter"] / 1000 for r in records if r["type"] == "train"}
    evals = list({r["iter"]: r for r in records if r["type"] == "eval"}.values())  # a continued run repeats some
    wall = [sum(t for i, t in steps.items() if i < e["iter"]) for e in evals]
    last = evals[-1]
    return {"variant": arm, "seed": seed, "iters": [e["iter"] for e in evals], "tokens": [e["tokens"] for e in evals],
            "wall": wall,
            "val": [e["val_loss"] for e in evals], "final_val": last["val_loss"],
            "final_tokens": last["tokens"], "train_s": wall[-1],
            "load_cv": last.get("val_load_cv"), "dead": last.get("val_dead_experts")}


def time_to_target(run, target):
    """(steps, seconds) at which the val curve first reaches target, linear between evals; None if never."""
    points = list(zip(run["iters"], run["wall"], run["val"]))
    for (i0, w0, v0), (i1, w1, v1) in zip(points, points[1:]):
        if v1 <= target:
            f = min(max(1.0 if v0 == v1 else (v0 - target) / (v0 - v1), 0.0), 1.0)
            return i0 + f * (i1 - i0), w0 + f * (w1 - w0)
    return None


def run_corpus(corpus, args):
    """The selection round, then the comparison on fresh seeds; -> (selection runs, comparison runs, best)."""
    prepare(corpus, args)
    selection = train_all([(corpus, v, "adamw", SEED) for v in args.variants], args)
    moes = [r for r in selection if r["variant"] != "dense"]
    best = min(moes, key=lambda r: r["final_val"])["variant"] if moes else None
    arms = [(v, o) for o in args.optimizers for v in ("dense", best) if v in args.variants]
    seeds = range(SEED + 1, SEED + 1 + args.seeds)
    comparison = train_all([(corpus, v, o, s) for s in seeds for v, o in arms], args)
    return selection, comparison, best


def spread(values, fmt="{:.4f}"):
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ({fmt.format(min(values))} – {fmt.format(max(values))})"


def selection_table(runs, best):
    rows = [f"| variant (seed {SEED}) | final val loss | train time (s) | load CV | dead experts |", "|---|---|---|---|---|"]
    for r in runs:
        name = f"**{r['variant']}**" if r["variant"] == best else r["variant"]
        moe_cells = "- | -" if r["load_cv"] is None else f"{r['load_cv']:.3f} | {r['dead']:.3f}"
        rows.append(f"| {name} | {r['final_val']:.4f} | {r['train_s']:.0f} | {moe_cells} |")
    return "\n".join(rows)


def comparison_table(runs):
    """One row per arm over the comparison seeds: mean (min – max). Steps and time to target are divided by the
    whole run of dense-AdamW with the same seed, which trained beside the MoE under the same load."""
    dense = {r["seed"]: r for r in runs if r["variant"] == "dense"}
    target = statistics.mean(r["final_val"] for r in dense.values()) if dense else None
    seeds = sorted({r["seed"] for r in runs})
    rows = [f"| arm (seeds {seeds[0]}–{seeds[-1]}) | final val loss | train time (s) | reached target | "
            "steps to target | steps / dense steps | time to target (s) | time / dense time |",
            "|---|---|---|---|---|---|---|---|"]
    for arm in dict.fromkeys(r["variant"] for r in runs):
        rs = [r for r in runs if r["variant"] == arm]
        hits = [(r["seed"], *h) for r in rs if dense and (h := time_to_target(r, target))]
        cells = ["-"] * 4
        if hits:
            cells = [spread([h[1] for h in hits], "{:,.0f}"),
                     spread([h[1] / dense[h[0]]["iters"][-1] for h in hits], "{:.2f}x"),
                     spread([h[2] for h in hits], "{:.0f}"),
                     spread([h[2] / dense[h[0]]["train_s"] for h in hits], "{:.2f}x")]
        rows.append(f"| {arm} | {spread([r['final_val'] for r in rs])} | {spread([r['train_s'] for r in rs], '{:.0f}')} | "
                    f"{len(hits)} of {len(rs)} | " + " | ".join(cells) + " |")
    return target, "\n".join(rows)


def plot(runs, corpus, path):
    plt = pyplot(NEEDS_MATPLOTLIB)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    arms = list(dict.fromkeys(r["variant"] for r in runs))
    colors = dict(zip(arms, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3))
    for r in runs:
        first = r["seed"] == min(x["seed"] for x in runs if x["variant"] == r["variant"])
        style = dict(color=colors[r["variant"]], marker=".", lw=1.0, label=r["variant"] if first else None)
        axes[0].plot(r["tokens"], r["val"], **style)
        axes[1].plot(r["wall"], r["val"], **style)
    for ax, xlabel in zip(axes, ("training tokens", "training wall time on this machine (s)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("val loss (cross-entropy)")
        vals = [v for r in runs for v in r["val"][2:]]
        ax.set_ylim(min(vals) - 0.05, max(vals) + 0.05) if vals else None
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{corpus}: dense vs the best MoE at equal active compute (comparison seeds, one line each)")
    fig.tight_layout()
    with atomic_write(path) as f:  # a full disk leaves the old image, not a truncated one
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)


def page(sections, args):
    s = train_flags(next(iter(sections)), "dense", "adamw", SEED, args)
    F = dense_hidden(s)
    tokens = s["batch_size"] * s["block_size"] * s["gradient_accumulation_steps"]
    lines = [
        "# Routing study: MoE vs dense at equal active compute, per token and on the clock",
        "",
        "Written by `" + " ".join(["python -m tools.study"] + args.command) + "` (the whole page and its plots; "
        "add --force to replace them; the method is in the tool's docstring).",
        "",
        f"Scale `{args.scale}`: {s['n_layer']} layers x {s['n_embd']}, {s['n_head']} heads, RoPE, RMSNorm, SwiGLU "
        f"(dense hidden F = {F}), no biases; {s['max_iters']:,} steps of {tokens:,} tokens; AdamW lr {s['learning_rate']} "
        f"cosine to {s['min_lr']}; eval every {s['eval_interval']} steps on {s['eval_iters']} batches. Every MoE variant runs k experts of hidden F/k, so the FFN "
        f"work per token equals dense's. Runs trained {args.jobs} at a time, one thread each"
        + (", side by side, dense and MoE runs alternating" if args.jobs > 1 else "") + ".",
        "",
        "Selection round: every variant on seed 1337; the best MoE (lowest final val loss, in bold) goes on. "
        "Comparison: dense and the best MoE on fresh seeds: mean (min – max) over the seeds, the columns of the "
        "target over the seeds that reached it. Wall times follow the machine's load: compare them within one "
        "round, not across rounds or pages. Target: dense-AdamW's mean final val loss. Steps and time to target: where a run's val loss "
        "first reaches the target (linear between evals), divided by the whole run of dense-AdamW with the same "
        "seed (its steps, its training time).",
    ]
    for corpus, (selection, comparison, best, target) in sections.items():
        lines += ["", f"## {corpus}", ""]
        if corpus.startswith("pystdlib"):
            lines += ["The Python standard library's *.py files in path order; the val split is the last 10 % "
                      "(mostly `encodings/` codec tables), a shift from the train split.", ""]
        lines += [selection_table(selection, best), ""]
        if comparison:
            lines += [f"Target: {target:.4f}." if target else "No dense arm: no target.", "",
                      comparison_table(comparison)[1], ""]
        lines += [f"![{corpus}]({os.path.basename(plot_path(args, corpus))})"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.command = [str(a) for a in argv if str(a) != "--force"]
    pyplot(NEEDS_MATPLOTLIB)  # now, not after hours of training
    os.makedirs(args.docs, exist_ok=True)
    sections = {}
    for corpus in args.corpora:
        selection, comparison, best = run_corpus(corpus, args)
        target, table = comparison_table(comparison) if comparison else (None, "")
        sections[corpus] = (selection, comparison, best, target)
        plot(comparison or selection, corpus, plot_path(args, corpus))
        with atomic_write(os.path.join(args.work, corpus, "summary.json"), "w") as f:
            json.dump({"selection": selection, "comparison": comparison, "best": best, "target": target}, f)
        print(f"{corpus}: best MoE {best}\n{selection_table(selection, best)}\n{table}", flush=True)
    with atomic_write(os.path.join(args.docs, "study.md"), "w", encoding="utf-8") as f:
        f.write(page(sections, args))
    print(f"wrote {os.path.join(args.docs, 'study.md')}")


if __name__ == "__main__":
    run_cli(main)
