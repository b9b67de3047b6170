"""
The routing study: dense vs Mixture-of-Experts GPTs at equal active parameters per token, trained one after
another by train.py on the same data, steps and schedule, then compared on val loss (docs/study.md).

    python -m tools.study                                   # CPU scale, both char corpora -> docs/study_*
    python -m tools.study --corpora shakespeare_char --variants dense,top2x8-aux --seeds 1
    python -m tools.study --scale gpu --work out-study-gpu  # the same study at GPU size (6 x 384, 5000 steps)

Every variant's FFN does the same work per token: the dense MLP has hidden size F = 4 * n_embd, and an MoE
layer runs k experts of hidden F/k (plus its shared experts), so the active parameters per token are equal
up to the router's E x n_embd. The variants (VARIANTS below): dense; top-2 of 8 experts of F/2 under each
balancing mode (aux micro, aux global, aux-free, none); top-1 of 8 full-size experts (Switch); fine-grained
top-3 of 16 experts of F/4 + 1 shared expert of F/4 (DeepSeekMoE). Each run is seeded (--seed); after one
seed of every variant, the dense model and the best MoE variant get the extra seeds (--seeds, default 3), so
the table shows their seed-to-seed spread.

Corpora: shakespeare_char (tiny-shakespeare, char) and pystdlib_char / pystdlib_gpt2 (the Python standard
library's *.py source, without site-packages, capped at --max_chars, char or GPT-2 BPE), prepared by
prepare.py when missing. Runs go to --work/<corpus>/<variant>-s<seed>/ and a finished run is not run again,
so an interrupted study continues where it stopped. Wall times are this machine's, measured one run after
another: on a shared or busy machine they are noisy, compare them only within one study.
"""
import json
import os
import statistics
import subprocess
import sys
import sysconfig

from nanomoe.cli import ArgumentParser, pyplot, run_cli
from nanomoe.errors import UserError
from nanomoe.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # train.py and prepare.py are run from here
NEEDS_MATPLOTLIB = "tools.study needs matplotlib for its plots"

# the model and run at each scale: everything but the FFN is shared by all variants
SCALES = {
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=16, gradient_accumulation_steps=2,
                max_iters=250, eval_interval=50, eval_iters=20, learning_rate=1e-3, warmup_iters=25,
                lr_decay_iters=250, min_lr=1e-4, beta2=0.99, device="cpu", compile=False, dtype="float32"),
    "gpu": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, gradient_accumulation_steps=1,
                max_iters=5000, eval_interval=250, eval_iters=200, learning_rate=1e-3, warmup_iters=100,
                lr_decay_iters=5000, min_lr=1e-4, beta2=0.99),
}
COMMON = dict(bias=False, dropout=0.0, log_interval=1, always_save_checkpoint=False)


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
DEFAULT_VARIANTS = "dense,top2x8-aux,top2x8-global,top2x8-auxfree,top2x8-none,top1x8-switch,top3x16+1-fine"
CORPORA = ("shakespeare_char", "pystdlib_char", "pystdlib_gpt2")


def parse_args(argv):
    p = ArgumentParser(prog="python -m tools.study",
                       description="Train dense and MoE variants at equal active parameters; plot and tabulate.")
    p.add_argument("--scale", choices=tuple(SCALES), default="cpu", help="model and run size (default cpu)")
    p.add_argument("--corpora", default="shakespeare_char,pystdlib_char",
                   help=f"comma list of {', '.join(CORPORA)} (default: the two char corpora)")
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help=f"comma list of {', '.join(VARIANTS)} (default: all but the sigmoid one)")
    p.add_argument("--seeds", type=int, default=3, help="seeds for dense and the best MoE (default 3)")
    p.add_argument("--max_iters", type=int, help="override the scale's optimizer steps")
    p.add_argument("--eval_iters", type=int, help="override the scale's eval batches per split (fewer: quicker, "
                   "noisier curves)")
    p.add_argument("--max_chars", type=int, default=5_000_000, help="pystdlib: characters kept (default 5M)")
    p.add_argument("--data_root", default="data", help="where datasets are (prepared there when missing)")
    p.add_argument("--shakespeare_input", help="tiny-shakespeare input.txt to prepare from (default: download)")
    p.add_argument("--work", default="out-study", help="folder for the runs (default out-study)")
    p.add_argument("--docs", default="docs", help="where the plots and table go (default docs)")
    args = p.parse_args(argv)
    args.corpora = args.corpora.split(",")
    args.variants = args.variants.split(",")
    for name, known in (("corpora", CORPORA), ("variants", VARIANTS)):
        bad = [v for v in getattr(args, name) if v not in known]
        if bad:
            raise UserError(f"unknown {name} {', '.join(bad)} (known: {', '.join(known)})")
    for name in ("seeds", "max_iters", "eval_iters"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    return args


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
    subprocess.run(cmd + ["--data_root", args.data_root], check=True)


def train_flags(corpus, variant, seed, args):
    settings = {**SCALES[args.scale], **COMMON}
    if args.max_iters:
        settings.update(max_iters=args.max_iters, lr_decay_iters=args.max_iters,
                        eval_interval=max(1, args.max_iters // 5))
    if args.eval_iters:
        settings.update(eval_iters=args.eval_iters)
    settings.update(VARIANTS[variant](4 * settings["n_embd"]))
    settings.update(dataset=corpus, data_root=args.data_root, seed=seed,
                    out_dir=os.path.join(args.work, corpus, f"{variant}-s{seed}"))
    return settings


def finished(out_dir, max_iters):
    return os.path.isfile(os.path.join(out_dir, "metrics.jsonl")) and any(
        r.get("type") == "eval" and r["iter"] == max_iters for r in read_metrics(out_dir))


def train(corpus, variant, seed, args):
    """Run train.py for one variant and seed (unless already finished); -> its summary."""
    s = train_flags(corpus, variant, seed, args)
    out = s["out_dir"]
    if not finished(out, s["max_iters"]):
        if os.path.isdir(out):  # an interrupted run: start it again
            for name in os.listdir(out):
                os.remove(os.path.join(out, name))
        print(f"== {corpus} {variant} seed {seed}", flush=True)
        cmd = [sys.executable, os.path.join(REPO, "train.py")] + [f"--{k}={v}" for k, v in s.items()]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # one thread: steadier
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode:
            raise UserError(f"{variant} on {corpus} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return summarize(read_metrics(out), variant, seed)


def summarize(records, variant, seed):
    """Curves and the table's numbers of one run. Wall time is training time only (the sum of the logged
    step times up to each eval), so evals, startup and the machine's other work between steps do not count."""
    steps = {r["iter"]: r["ms_per_iter"] / 1000 for r in records if r["type"] == "train"}
    evals = [r for r in records if r["type"] == "eval"]
    wall = [sum(t for i, t in steps.items() if i < e["iter"]) for e in evals]
    last = evals[-1]
    return {"variant": variant, "seed": seed, "tokens": [e["tokens"] for e in evals], "wall": wall,
            "val": [e["val_loss"] for e in evals], "best_val": min(e["val_loss"] for e in evals),
            "final_tokens": last["tokens"], "train_s": wall[-1],
            "load_cv": last.get("val_load_cv"), "dead": last.get("val_dead_experts"),
            "load_max": last.get("val_load_max"), "load_min": last.get("val_load_min"),
            "balance": last.get("val_balance")}


def run_corpus(corpus, args):
    prepare(corpus, args)
    runs = [train(corpus, v, 1337, args) for v in args.variants]
    moes = [r for r in runs if r["variant"] != "dense"]
    best = min(moes, key=lambda r: r["best_val"])["variant"] if moes else None
    for v in [v for v in ("dense", best) if v in args.variants]:
        runs += [train(corpus, v, 1337 + i, args) for i in range(1, args.seeds)]
    return runs, best


def table(runs, best):
    """The markdown table: one row per variant, mean and spread over its seeds."""
    rows = ["| variant | seeds | best val loss | tokens | train time (s) | load CV | dead experts | max / min load |",
            "|---|---|---|---|---|---|---|---|"]
    for variant in dict.fromkeys(r["variant"] for r in runs):
        rs = [r for r in runs if r["variant"] == variant]
        vals = [r["best_val"] for r in rs]
        spread = f" ± {statistics.stdev(vals):.4f} (min {min(vals):.4f}, max {max(vals):.4f})" if len(rs) > 1 else ""
        r0 = rs[0]
        moe_cells = ("-", "-", "-") if r0["load_cv"] is None else (
            f"{r0['load_cv']:.3f}", f"{r0['dead']:.3f}", f"{r0['load_max']:.2f} / {r0['load_min']:.2f}")
        name = f"**{variant}**" if variant == best else variant
        rows.append(f"| {name} | {len(rs)} | {statistics.mean(vals):.4f}{spread} | {r0['final_tokens']:,} | "
                    f"{statistics.mean(r['train_s'] for r in rs):.0f} | " + " | ".join(moe_cells) + " |")
    return "\n".join(rows)


def plot(runs, corpus, path):
    plt = pyplot(NEEDS_MATPLOTLIB)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = dict(zip(dict.fromkeys(r["variant"] for r in runs), plt.rcParams["axes.prop_cycle"].by_key()["color"]
                      * 3))
    for r in runs:
        label = r["variant"] if r["seed"] == 1337 else None
        style = dict(color=colors[r["variant"]], marker=".", lw=1.5 if r["seed"] == 1337 else 0.7, label=label)
        axes[0].plot(r["tokens"], r["val"], **style)
        axes[1].plot(r["wall"], r["val"], **style)
    for ax, xlabel in zip(axes, ("training tokens", "training wall time on this machine (s)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("val loss (cross-entropy)")
        vals = [v for r in runs for v in r["val"][1:]]
        ax.set_ylim(min(vals) - 0.05, max(vals) + 0.05) if vals else None
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{corpus}: dense vs MoE at equal active parameters per token (thin lines: extra seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    pyplot(NEEDS_MATPLOTLIB)  # now, not after an hour of training
    os.makedirs(args.docs, exist_ok=True)
    for corpus in args.corpora:
        runs, best = run_corpus(corpus, args)
        png = os.path.join(args.docs, f"study_{args.scale}_{corpus}.png")
        plot(runs, corpus, png)
        md = os.path.join(args.docs, f"study_{args.scale}_{corpus}.md")
        with open(md, "w") as f:
            f.write(table(runs, best) + "\n")
        with open(os.path.join(args.work, corpus, "summary.json"), "w") as f:
            json.dump(runs, f)
        print(f"{corpus}: best MoE {best}; wrote {png} and {md}\n{table(runs, best)}", flush=True)


if __name__ == "__main__":
    run_cli(main)
