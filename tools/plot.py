"""
Plot training runs from their out_dir/metrics.jsonl (written by train.py), several runs on one chart:

    python -m tools.plot out-shakespeare-char out-shakespeare-moe      # -> runs.png, runs_experts.png
    python -m tools.plot out-a out-b -o compare.png --x tokens         # -> compare.png, compare_experts.png

An image that already exists is replaced only with --force; -o without an extension writes a .png.

Two files come out:
- runs.png: cross-entropy of every run (thin line: train loss of each logged step; dashed: train loss at
  evals; solid with dots: val loss at evals), and, if any run is an MoE, its balance loss and router z-loss
  from the logged steps. x is the iteration or (--x tokens) the number of training tokens seen.
- runs_experts.png, for MoE runs only, one row per run: a heatmap of the expert load at the last eval
  (MoE layers x experts; colour = share of the layer's routing assignments that went to the expert, 1/E is
  perfectly balanced) and the load imbalance of each layer over the evals (max load x E: 1 = balanced,
  E/k = every token goes to the same k experts).
metrics.jsonl may be read while a run writes it: an unfinished last line is skipped.
"""
import os

from nanomoe.cli import ArgumentParser, pyplot, run_cli
from nanomoe.errors import UserError
from nanomoe.files import atomic_write, check_writable_folder
from nanomoe.metrics import read_metrics


def parse_args(argv):
    p = ArgumentParser(prog="python -m tools.plot",
                       description="Plot loss curves and expert load of training runs (their metrics.jsonl).")
    p.add_argument("runs", nargs="+", help="out_dir folders of runs (each holds a metrics.jsonl)")
    p.add_argument("-o", "--output", default="runs.png",
                   help="loss curves image (default runs.png); expert load goes to <name>_experts.png")
    p.add_argument("--x", choices=("iter", "tokens"), default="iter", help="x axis: iter (default) or tokens")
    p.add_argument("--force", action="store_true", help="replace image files that already exist")
    return p.parse_args(argv)


def run_labels(dirs):
    """Folder names as legend labels; full paths where two runs share a name."""
    names = [os.path.basename(os.path.normpath(d)) for d in dirs]
    return [n if names.count(n) == 1 else os.path.normpath(d) for n, d in zip(names, dirs)]


def series(records, kind, key, x):
    """(xs, ys) of records of type kind that have key."""
    rows = [r for r in records if r.get("type") == kind and r.get(key) is not None]
    return [r.get(x, 0) for r in rows], [r[key] for r in rows]


def expert_loads(records):
    """[(iter, x-record, loads (MoE layers x experts))] over time: val load at evals, else the logged steps'."""
    for kind, key in (("eval", "val_expert_load"), ("train", "expert_load")):
        rows = [r for r in records if r.get("type") == kind and r.get(key)]
        if rows:
            return [(r, r[key]) for r in rows], ("val at eval" if kind == "eval" else "train step")
    return [], None


def save(plt, fig, path):
    """fig written to path all or nothing (a full disk leaves no truncated image; atomic_write says so)."""
    fig.tight_layout()
    try:
        with atomic_write(path) as f:
            fig.savefig(f, dpi=110, format=os.path.splitext(path)[1][1:].lower())
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)


def output_paths(plt, output):
    """The two image paths for -o: a name without an extension gets .png (and the name printed is the name
    written); a format matplotlib cannot write, or a folder that cannot take the files, is refused first."""
    if not output or output.endswith(os.sep) or os.path.isdir(output):
        raise UserError(f"-o {output!r} is not a file name: name the image, e.g. -o runs.png")
    stem, ext = os.path.splitext(output)
    if not ext:
        stem, ext = output, ".png"
    formats = plt.gcf().canvas.get_supported_filetypes()
    plt.close("all")
    if ext[1:].lower() not in formats:
        raise UserError(f"-o {output}: matplotlib cannot write '{ext}' images; use one of "
                        f"{', '.join('.' + f for f in sorted(formats))}")
    check_writable_folder(os.path.dirname(output) or ".", "the folder of -o", "-o")
    if not os.path.isdir(os.path.dirname(output) or "."):
        raise UserError(f"-o {output}: the folder {os.path.dirname(output)} does not exist; create it first")
    return stem + ext, f"{stem}_experts{ext}"


def plot_curves(plt, runs, x, path):
    moe = any(any("balance" in r for r in recs) for _, recs in runs)
    ncols = 3 if moe else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6.5 * ncols, 4.5), squeeze=False)
    ax = axes[0][0]
    for i, (label, recs) in enumerate(runs):
        color = f"C{i % 10}"
        ax.plot(*series(recs, "train", "loss", x), color=color, alpha=0.35, linewidth=1)
        ax.plot(*series(recs, "eval", "train_loss", x), color=color, linestyle="--", linewidth=1.2)
        ax.plot(*series(recs, "eval", "val_loss", x), color=color, marker=".", linewidth=2, label=label)
    ax.set_title("cross-entropy (solid: val, dashed: train at eval, thin: train steps)", fontsize=9)
    ax.set_ylabel("loss")
    if moe:
        for ax, key, title in ((axes[0][1], "balance", "balance loss (1 = balanced)"),
                               (axes[0][2], "z", "router z-loss")):
            for i, (label, recs) in enumerate(runs):
                xs, ys = series(recs, "train", key, x)
                if xs:
                    ax.plot(xs, ys, color=f"C{i % 10}", label=label)
            ax.set_title(title, fontsize=9)
    for ax in axes[0]:
        ax.set_xlabel("iteration" if x == "iter" else "tokens")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    save(plt, fig, path)


def plot_experts(plt, moe_runs, x, path):
    fig, axes = plt.subplots(len(moe_runs), 2, figsize=(13, 4.2 * len(moe_runs)), squeeze=False)
    for row, (label, loads, source) in enumerate(moe_runs):
        last_record, last = loads[-1]
        n_layers, n_experts = len(last), len(last[0])
        ax = axes[row][0]
        im = ax.imshow(last, aspect="auto", cmap="viridis", vmin=0)
        ax.set_title(f"{label}: expert load at iter {last_record['iter']} ({source}); 1/E = {1 / n_experts:.3f}",
                     fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.set_xticks(range(n_experts))
        ax.set_yticks(range(n_layers))
        if n_layers * n_experts <= 256:  # small enough to print every share
            for li in range(n_layers):
                for e in range(n_experts):
                    dark = last[li][e] < 0.6 * max(map(max, last))  # white text on the dark cells
                    ax.text(e, li, f"{last[li][e]:.2f}", ha="center", va="center", fontsize=7,
                            color="w" if dark else "k")
        fig.colorbar(im, ax=ax, label="share of tokens (top-k assignments)")
        ax = axes[row][1]
        xs = [r.get(x, 0) for r, _ in loads]
        for li in range(n_layers):
            ax.plot(xs, [max(load[li]) * len(load[li]) if li < len(load) else None for _, load in loads],
                    marker=".", label=f"MoE layer {li}")
        ax.axhline(1.0, color="k", linewidth=0.8, linestyle=":")
        ax.set_title(f"{label}: load imbalance, max load x E (1 = balanced, {n_experts} = one expert)", fontsize=9)
        ax.set_xlabel("iteration" if x == "iter" else "tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    save(plt, fig, path)


def main(argv=None):
    args = parse_args(argv)
    plt = pyplot("tools.plot needs matplotlib")
    runs = list(zip(run_labels(args.runs), [read_metrics(d) for d in args.runs]))
    moe_runs = []
    for label, recs in runs:
        loads, source = expert_loads(recs)
        if loads:
            moe_runs.append((label, loads, source))
    output, experts_path = output_paths(plt, args.output)
    existing = [p for p in [output] + ([experts_path] if moe_runs else []) if os.path.exists(p)]
    if existing and not args.force:
        raise UserError(f"{' and '.join(existing)} already {'exist' if len(existing) > 1 else 'exists'}; choose "
                        f"another -o, or add --force to replace")
    plot_curves(plt, runs, args.x, output)
    print(f"wrote {output}")
    if moe_runs:
        plot_experts(plt, moe_runs, args.x, experts_path)
        print(f"wrote {experts_path}")


if __name__ == "__main__":
    run_cli(main)
