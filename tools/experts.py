"""
What the experts of a trained MoE learned, and whether its router settled: a Markdown report with pictures.

    python -m tools.experts out-shakespeare-moe-cpu                               # -> out-shakespeare-moe-cpu/experts/
    python -m tools.experts out-shakespeare-moe-cpu out-shakespeare-llama-cpu     # adds: the two runs, token by token

It reads the run's latest checkpoint (ckpt.pt, or a sharded run's ckpt.dcp) and its dataset, routes the
validation split through the model without gradients (each MoE layer's own route(), recorded as it runs; a
progress line on a terminal), and writes OUT_DIR/experts/report.md with these figures:

1. load.png: each expert's share of the layer's top-k assignments on val (the table adds train batches, dead
   experts, the coefficient of variation and max/min: moe_model.load_stats).
2. specialisation.png: per layer and expert, the share of each kind of token (newline, indentation, space,
   letters, digits, punctuation) routed to it, beside the tokens most over-represented among its tokens; the
   report's table adds three examples in context.
3. coactivation.png (top-k > 1): how often experts i and j are chosen for the same token; routing entropy.
4. saturation.png: a run trained with --save_every keeps ckpt-<iter>.pt copies; for each, the share of its
   top-k choices on the same val tokens that already equal the final model's (OLMoE's router saturation).
5. compare.png (a second run given): the per-token val loss of the two runs by kind of predicted token.

OUT_DIR/experts is replaced only with --force. Bad input (a dense run, a missing or damaged checkpoint, data of
another tokenizer, an unknown layer, an existing report) is one error line, and nothing is written.
"""
import io
import math
import os
import shutil
import sys
import time
from contextlib import contextmanager
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from moe_model import load_stats
from nanomoe.checkpoint import kept_checkpoints, latest_checkpoint, load_checkpoint, model_from_checkpoint
from nanomoe.cli import ArgumentParser, Progress, duration, pyplot, run_cli
from nanomoe.data import TokenData, describe_tokenizer
from nanomoe.device import autocast_context, pick_device, pick_dtype
from nanomoe.errors import UserError
from nanomoe.files import disk_full_message, is_disk_full, temp_path
from nanomoe.runs import read_checkpoint
from nanomoe.tokenizer import Tokenizer

CLASSES = ("newline", "indentation", "space", "lowercase", "uppercase", "digit", "punctuation")
MIN_COUNT = 30  # a token seen fewer times on val is not ranked: its shares would be noise
SATURATION_TOKENS = 65536  # val tokens each kept copy routes (the first ones of the split)
BATCH_TOKENS = 8192  # tokens per forward pass


def parse_args(argv):
    p = ArgumentParser(prog="python -m tools.experts",
                       description="Report what the experts of a trained MoE run learned (OUT_DIR/experts/).")
    p.add_argument("out_dir", help="the MoE run's folder (ckpt.pt or ckpt.dcp, and ckpt-<iter>.pt copies)")
    p.add_argument("other", nargs="?", help="a second run (dense or MoE) to compare with, token by token")
    p.add_argument("--layers", type=layer_list,
                   help="the MoE layers to report, as block indices: --layers=0,3 (default: all)")
    p.add_argument("--data_root", help="where the dataset lives (default: the run's data_root)")
    p.add_argument("--dataset", help="the dataset to route (default: the run's; its tokenizer must be the run's)")
    p.add_argument("--max_tokens", type=positive, help="route at most this many val tokens (default: the whole split)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--force", action="store_true", help="replace an existing OUT_DIR/experts")
    return p.parse_args(argv)


def layer_list(text):  # argparse's error names the type by its function's name: "invalid layer_list value"
    return [int(i) for i in text.split(",")]


def positive(text):
    if not text.isdigit() or int(text) < 1:
        raise ValueError(text)  # argparse names the option and the value
    return int(text)


def main(argv):
    args = parse_args(argv)
    plt = pyplot("tools.experts draws its figures with matplotlib")
    target = os.path.join(args.out_dir, "experts")
    if os.path.exists(target) and not args.force:
        raise UserError(f"{target} already exists; add --force to replace it")
    if os.path.isdir(args.out_dir) and not os.access(args.out_dir, os.W_OK):
        raise UserError(f"{args.out_dir} is not writable, so the report cannot go to {target}")
    t_start = time.time()
    device = pick_device(args.device)
    ctx = autocast_context(device, pick_dtype("auto", device))
    run = open_run(args.out_dir, device)
    if not run.ckpt["model_args"].get("n_experts"):
        raise UserError(f"{args.out_dir} holds a dense model (n_experts=0): it has no router to report on; give an "
                        f"MoE run first (a dense run can come second, to compare with)")
    layers = pick_layers(run.model, args.layers)
    other = open_run(args.other, device) if args.other else None
    if other and other.ckpt["tokenizer"] != run.ckpt["tokenizer"]:
        raise UserError(f"{args.other} was trained with the {describe_tokenizer(other.ckpt['tokenizer'])} tokenizer "
                        f"and {args.out_dir} with the {describe_tokenizer(run.ckpt['tokenizer'])} one: their "
                        f"per-token losses do not compare; give two runs on the same data")
    data = open_data(run, args)
    block = min(m.model.config.block_size for m in (run, other) if m)
    val = val_stream(data, block, args.max_tokens)

    routed = route(run.model, val, block, layers, ctx, "val")
    E, K = run.model.config.n_experts, run.model.config.moe_top_k
    report = SimpleNamespace(
        run=run, layers=layers, names=[f"layer {i}" for i in layers], E=E, K=K, block=block, stream=val,
        n=len(routed.loss), dataset=os.path.basename(data.dir), routed=routed,
        val_load=torch.stack([torch.bincount(c.flatten(), minlength=E) / c.numel() for c in routed.choices.unbind(1)]),
        train_load=train_load(run, data, layers, ctx, len(routed.loss)),
        pieces=pieces_of(run.tok, run.model.config.vocab_size), kinds=token_classes(val, run.tok),
        saturation=saturation(run, val, block, layers, ctx, routed),
        other=other and SimpleNamespace(name=other.name, loss=route(other.model, val, block, [], ctx,
                                                                    f"val with {other.name}").loss))
    report.route_seconds = time.time() - t_start
    write_report(report, plt, target)
    print(f"routed {report.n:,} val tokens through {len(layers)} MoE layer(s)"
          f"{f' and {len(report.saturation) - 1} kept checkpoint(s)' if report.saturation else ''}; wrote "
          f"{target}/report.md ({duration(time.time() - t_start)})")


# -----------------------------------------------------------------------------
# the run: its model, checkpoint entries, tokenizer and data

def read_run(out_dir):
    """(model, entries) of a run's latest checkpoint: ckpt.pt, or the sharded ckpt.dcp read in this process
    (weights only, whatever the number of processes that wrote it)."""
    ckpt = read_checkpoint(out_dir, needs=("tokenizer",))
    return model_from_checkpoint(ckpt), ckpt


def open_run(out_dir, device):
    if not os.path.isdir(out_dir):
        raise UserError(f"run folder {out_dir} not found (give the out_dir of a training run)")
    model, ckpt = read_run(out_dir)
    ckpt.pop("model", None), ckpt.pop("optimizer", None)  # the weights are in the model now
    return SimpleNamespace(name=os.path.basename(os.path.normpath(out_dir)), out_dir=out_dir,
                           model=model.to(device).eval(), ckpt=ckpt, tok=Tokenizer.from_meta(ckpt["tokenizer"]),
                           device=device)


def pick_layers(model, wanted):
    """The block indices of the MoE layers to report: all, or those --layers names (each must be one)."""
    moe = [i for i, block in enumerate(model.transformer.h) if block.mlp in model.moe_layers()]
    for i in wanted or []:
        if i not in moe:
            raise UserError(f"unknown layer index {i} in --layers: this model's MoE layers are "
                            f"{', '.join(map(str, moe))} (block indices, from 0)")
    return sorted(set(wanted)) if wanted else moe


def open_data(run, args):
    config = run.ckpt.get("config", {})
    dataset = args.dataset or config.get("dataset")
    if dataset is None:
        raise UserError(f"{run.out_dir}'s checkpoint does not name its dataset; give --dataset (and --data_root)")
    data = TokenData(args.data_root or config.get("data_root", "data"), dataset, run.model.config.block_size)
    if data.tokenizer_meta() != run.ckpt["tokenizer"]:
        raise UserError(f"{run.out_dir} was trained with the {describe_tokenizer(run.ckpt['tokenizer'])} tokenizer "
                        f"but dataset {data.dir} has the {describe_tokenizer(data.tokenizer_meta())} one: its token "
                        f"ids mean other things to this model; give the run's dataset (--dataset, --data_root)")
    return data


def val_stream(data, block, max_tokens):
    """The val split's first whole blocks of `block` tokens (at most max_tokens) and the target after them."""
    tokens = data.memmap("val")
    n = (len(tokens) - 1) // block * block
    if max_tokens is not None:
        n = min(n, max(block, max_tokens // block * block))
    return torch.from_numpy(tokens[:n + 1].astype("int64"))


# -----------------------------------------------------------------------------
# routing: the model's own route() of each MoE layer, recorded while the model runs

@contextmanager
def recording_routes(layers):
    """While open, routes[i] holds what MoE layer i's route() returned in the last forward pass: (logits,
    probs, chosen experts, routing weights). The layer's own method runs; we only keep its answer."""
    routes = {}
    for i, layer in layers.items():
        def recorded(x_TD, i=i, route=layer.route):
            routes[i] = route(x_TD)
            return routes[i]
        layer.route = recorded  # an instance attribute: it shadows the method until deleted
    try:
        yield routes
    finally:
        for layer in layers.values():
            del layer.route


@torch.no_grad()
def route(model, stream, block, layers, ctx, what):
    """Run the model over stream (n + 1 tokens, n a multiple of block) in blocks of `block` tokens. -> the
    per-token next-token loss (n,), and for each of `layers`: the chosen experts (n, L, K) and the entropy of
    the router's distribution in nats (n, L)."""
    x_NT, y_NT = stream[:-1].view(-1, block), stream[1:].view(-1, block)
    n, device = x_NT.numel(), next(model.parameters()).device
    moe = {i: model.transformer.h[i].mlp for i in layers}
    K = model.config.moe_top_k if layers else 0
    choices = torch.zeros(n, len(layers), K, dtype=torch.int16)
    entropy, loss = torch.zeros(n, len(layers)), torch.zeros(n)
    progress, batch = Progress(), max(1, BATCH_TOKENS // block)
    with recording_routes(moe) as routes:
        for b in range(0, len(x_NT), batch):
            x, y = x_NT[b:b + batch].to(device), y_NT[b:b + batch].to(device)
            rows = slice(b * block, b * block + x.numel())
            with ctx:
                logits, _, _ = model(x, y)
            loss[rows] = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").cpu()
            for j, i in enumerate(layers):
                _, probs_TE, expert_TK, _ = routes[i]
                choices[rows, j] = expert_TK.cpu().to(torch.int16)
                entropy[rows, j] = torch.special.entr(probs_TE.float()).sum(-1).cpu()
            progress.update(f"routing {what}: {rows.stop:,}/{n:,} tokens ({100 * rows.stop // n}%)")
    progress.done()
    return SimpleNamespace(choices=choices.long(), entropy=entropy, loss=loss)


@torch.no_grad()
def train_load(run, data, layers, ctx, n_tokens):
    """Each layer's expert load (L, E) on random train batches of about n_tokens tokens: the MoE layers' own
    stats, as train.py's evaluation reads them."""
    gen = torch.Generator().manual_seed(run.ckpt.get("config", {}).get("seed", 1337) + 999)
    batch, progress = max(1, BATCH_TOKENS // data.block_size), Progress()
    loads, n = [], max(1, round(n_tokens / (batch * data.block_size)))
    for b in range(n):
        x, _ = data.get_batch("train", batch, gen, run.device)
        with ctx:
            run.model(x)
        loads.append(torch.stack([run.model.transformer.h[i].mlp.stats["expert_load"].float().cpu() for i in layers]))
        progress.update(f"routing train batches: {b + 1}/{n}")
    progress.done()
    return torch.stack(loads).mean(0)


def saturation(run, stream, block, layers, ctx, routed):
    """[(iter, share (L,))]: for each copy kept by --save_every (older than the final model), the share of its
    top-k choices on the first val tokens that the final model also makes for them; the final model: 1.0."""
    final_iter = run.ckpt.get("iter_num")
    kept = [(it, path) for it, path in kept_checkpoints(run.out_dir) if final_iter is None or it < final_iter]
    if not kept:
        return []
    n = min(len(routed.loss), SATURATION_TOKENS // block * block or block)
    E = run.model.config.n_experts
    final = F.one_hot(routed.choices[:n], E).sum(-2)  # (n, L, E): 1 where the final model chose the expert
    curve = []
    for it, path in kept:
        ckpt = load_checkpoint(path)
        shape = ("n_layer", "n_experts", "moe_top_k", "moe_every")
        if any(ckpt["model_args"].get(k) != run.ckpt["model_args"].get(k) for k in shape):
            raise UserError(f"{path} holds another model than {run.out_dir}'s final checkpoint (its {', '.join(shape)} "
                            f"differ): move it out of the run folder")
        model = model_from_checkpoint(ckpt).to(run.device).eval()
        chosen = route(model, stream[:n + 1], block, layers, ctx, f"val with ckpt-{it}.pt").choices
        same = (F.one_hot(chosen, E).sum(-2) * final).sum(-1).float() / chosen.size(-1)  # (n, L)
        curve.append((it, same.mean(0)))
    return curve + [(final_iter, torch.ones(len(layers)))]


# -----------------------------------------------------------------------------
# tokens and their kinds

def pieces_of(tok, vocab_size):
    """The text of every token id (ids past the tokenizer's vocabulary, a padded GPT-2 head's, read U+FFFD)."""
    return [tok.decode([i]) for i in range(vocab_size)]


def token_classes(stream, tok):
    """The kind (an index into CLASSES) of each token of stream. Whitespace is indentation when only whitespace
    stands between it and the start of its line; otherwise a token is the kind of its first visible character."""
    kind_of = {}
    out, line_start = torch.empty(len(stream), dtype=torch.long), True
    for t, i in enumerate(stream.tolist()):
        if i not in kind_of:
            piece = tok.decode([i])
            visible = piece.strip()
            first = visible[:1]
            kind_of[i] = ("newline" if "\n" in piece else "space" if not visible else "lowercase" if first.islower()
                          else "uppercase" if first.isupper() else "digit" if first.isdigit() else "punctuation")
        kind = kind_of[i]
        if kind == "space" and line_start:
            kind = "indentation"
        out[t] = CLASSES.index(kind)
        line_start = kind in ("newline", "indentation")
    return out


def show(piece):
    """A token as people can see it: newline ⏎, space ␣, tab ⇥."""
    return piece.replace("\n", "⏎").replace(" ", "␣").replace("\t", "⇥") or "∅"


# -----------------------------------------------------------------------------
# counting

def routed_share(labels, choices, n_labels, E):
    """How each label (a token id or a kind, (n,)) was routed at one layer (choices (n, K)): -> count (V,) of
    its occurrences and share (V, E) of them that went to each expert (a row sums to K)."""
    count = torch.bincount(labels, minlength=n_labels).float()
    chosen = torch.zeros(n_labels, E)
    chosen.index_put_((labels.repeat_interleave(choices.size(1)), choices.flatten()), torch.ones(choices.numel()),
                      accumulate=True)
    return count, chosen / count.clamp(min=1).unsqueeze(1)


def top_tokens(share_VE, count_V, expert, expert_share, n=5):
    """The n tokens (seen at least MIN_COUNT times) most over-represented among an expert's tokens: those
    whose share of the expert's tokens exceeds their share of all tokens by the most. That is count x (share
    routed to the expert / the expert's share of all tokens - 1): a frequent token the expert nearly always
    takes comes before a rare one it always takes, as it says more about what the expert does."""
    excess = count_V * (share_VE[:, expert] / expert_share - 1)
    ids = torch.nonzero((count_V >= MIN_COUNT) & (excess > 0)).flatten()
    return ids[excess[ids].argsort(descending=True, stable=True)][:n].tolist()


def fixed_by_token(tokens, choices):
    """The share of tokens whose top-k set is the one their token id gets most often: 1 when a layer routes
    by the token alone (a lookup table), lower the more the context decides."""
    sets = torch.cat([tokens.unsqueeze(1), choices.sort(dim=1).values], dim=1)  # (n, 1 + K): token, its set
    unique, count = torch.unique(sets, dim=0, return_counts=True)
    most = torch.zeros(int(tokens.max()) + 1, dtype=count.dtype).scatter_reduce(0, unique[:, 0], count, "amax")
    return most.sum().item() / len(tokens)


def in_context(ids, tok, p, width=16):
    """The text around position p of ids (a list), the token itself in ⟦ ⟧."""
    before = tok.decode(ids[max(0, p - width):p])[-width:]
    after = tok.decode(ids[p + 1:p + 1 + width])[:width]
    return show(before) + "⟦" + show(tok.decode([ids[p]])) + "⟧" + show(after)


# -----------------------------------------------------------------------------
# the report: one function per section, each -> its Markdown lines (and its figure in the folder)

def write_report(r, plt, target):
    """Everything into a fresh folder beside the target, renamed into place at the end: a failure at any
    moment leaves the old report (or none), never half of one."""
    tmp = temp_path(target)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        lines = header_lines(r)
        for section in (load_lines, specialisation_lines, coactivation_lines, saturation_lines, compare_lines):
            lines += section(r, plt, tmp)
        with open(os.path.join(tmp, "report.md"), "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        old = temp_path(target + "-old")
        if os.path.exists(target):
            os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            raise UserError(disk_full_message(target)) from None
        raise


def table(header, rows):
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""]


def code(text):
    """A Markdown code span that survives a table cell."""
    return "`" + text.replace("`", "ˋ").replace("|", "\\|") + "`"


def figure(plt, fig, folder, name):
    """Save fig as folder/name in 256 colours (the charts look the same at a third of the bytes, so reports can
    be committed to docs/); -> the Markdown lines that show it."""
    from PIL import Image  # matplotlib's own dependency
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    Image.open(buffer).convert("RGB").quantize(256).save(os.path.join(folder, name), optimize=True)
    return [f"![{name[:-4]}]({name})", ""]


def header_lines(r):
    cfg, ck = r.run.model.config, r.run.ckpt
    return [f"# What the experts learn: {r.run.name}", "",
            f"`{latest_checkpoint(r.run.out_dir)}` at iteration {ck.get('iter_num', '?')}: {cfg.n_layer} layers "
            f"({len(r.layers)} MoE layers reported), {cfg.n_experts} experts, top-{cfg.moe_top_k}, "
            f"`router_score={cfg.router_score!r}`, `balance_mode={cfg.balance_mode!r}`. Routed: {r.n:,} val tokens of "
            f"`{r.dataset}` (the split's first {r.n // r.block:,} blocks of {r.block} tokens), mean val loss "
            f"{r.routed.loss.mean():.4f}, in {duration(r.route_seconds)} on {r.run.device}. The choices are the "
            f"router's top-k (before any capacity limit); layers are block indices. Written by "
            f"`python -m tools.experts`.", ""]


def load_lines(r, plt, folder):
    E, K, L = r.E, r.K, len(r.layers)
    fig, ax = plt.subplots(figsize=(1.2 * E + 2.8, 0.55 * L + 1.6))
    im = ax.imshow((r.val_load * E).numpy(), cmap="RdBu_r", vmin=0, vmax=2, aspect="auto")
    for li in range(L):
        for e in range(E):
            ax.text(e, li, f"{r.val_load[li, e]:.3f}", ha="center", va="center", fontsize=9)
    ax.set_xticks(range(E), [f"expert {e}" for e in range(E)])
    ax.set_yticks(range(L), r.names)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(f"{r.run.name}: share of each layer's top-{K} assignments on val (even = {1 / E:.3f})", fontsize=10)
    fig.colorbar(im, ax=ax, label="load × E (1 = even)")
    rows = []
    for split, load in (("val", r.val_load), ("train", r.train_load)):
        for li in range(L):
            s = load_stats(load[li:li + 1])
            dead = [str(e) for e in range(E) if load[li, e] * E * 4 < 1]  # load_stats' rule: under 1/(4E)
            spread = f"{s['load_max'] / s['load_min']:.2f}" if s["load_min"] > 0 else "∞"
            rows.append([r.names[li], split, *(f"{x:.3f}" for x in load[li]), f"{s['load_cv']:.3f}", spread,
                         ", ".join(dead) or "none"])
    return ["## 1. Load", "",
            f"Each expert's share of its layer's top-{K} assignments (1/E = {1 / E:.3f} is even), on val and on random "
            f"train batches of about as many tokens. CV is the spread of a layer's loads relative to even (0 = even), "
            f"max/min its extremes, and an expert is dead below a quarter of even (as train.py logs them).", "",
            *figure(plt, fig, folder, "load.png"),
            *table(["layer", "split", *(f"e{e}" for e in range(E)), "CV", "max/min", "dead"], rows)]


def specialisation_lines(r, plt, folder):
    E, K = r.E, r.K
    inputs, kinds = r.stream[:-1], r.kinds[:-1]
    present = [c for c in range(len(CLASSES)) if (kinds == c).any()]
    ids = inputs.tolist()
    over, labels, tops, md = [], [], [], []
    for li, layer in enumerate(r.layers):
        choices = r.routed.choices[:, li]
        count_V, share_VE = routed_share(inputs, choices, len(r.pieces), E)
        _, share_CE = routed_share(kinds, choices, len(CLASSES), E)
        rows = []
        for e in range(E):
            of_all = r.val_load[li, e] * K  # the share of all tokens that have this expert among their k
            top = top_tokens(share_VE, count_V, e, of_all)
            over.append((share_CE[present, e] / of_all).tolist())
            labels.append(f"layer {layer} e{e} ({of_all:.0%})")
            tops.append("  ".join(show(r.pieces[v]) for v in top) or "-")
            snippets = []
            for j, v in enumerate((top * 3)[:3]):  # one example of each of the top three (or more of fewer)
                where = torch.nonzero((inputs == v) & (choices == e).any(-1)).flatten()
                snippets.append(in_context(ids, r.run.tok, where[len(where) * (2 * (j // len(top)) + 1) // 6].item()))
            kinds_above = [f"{CLASSES[c]} {share_CE[c, e]:.0%}" for c in present if share_CE[c, e] > 1.2 * of_all]
            rows.append([f"e{e}", f"{of_all:.0%}", " ".join(f"{code(show(r.pieces[v]))} {share_VE[v, e]:.0%}"
                                                             for v in top) or "-",
                         ", ".join(kinds_above) or "-", "<br>".join(code(s) for s in snippets) or "-"])
        md += [f"**Layer {layer}**", ""] + table(["expert", "of all tokens", "most over-represented tokens (share "
                                                  "of their occurrences)", "kinds above 1.2 × its share",
                                                  "in context"], rows)
    values = torch.tensor(over)
    log_values = values.clamp(1 / 3, 3).log2()  # colour: 1/3 ... 3 on a log scale, 1 (no preference) white
    fig, ax = plt.subplots(figsize=(0.9 * len(present) + 7, 0.3 * len(labels) + 2))
    im = ax.imshow(log_values.numpy(), cmap="RdBu_r", vmin=-math.log2(3), vmax=math.log2(3), aspect="auto")
    for row in range(len(labels)):
        for c in range(len(present)):
            ax.text(c, row, f"{values[row, c]:.1f}", ha="center", va="center", fontsize=7,
                    color="w" if abs(log_values[row, c]) > 1 else "k")
        if row and row % E == 0:
            ax.axhline(row - 0.5, color="k", linewidth=1.2)
    ax.set_xticks(range(len(present)), [CLASSES[c] for c in present], rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("kind of token at the position")
    ax.set_ylabel("layer, expert (its share of all tokens)")
    right = ax.secondary_yaxis("right")
    right.set_yticks(range(len(labels)), tops, fontsize=9)
    right.set_ylabel("its most over-represented tokens")
    ax.set_title(f"{r.run.name}: which tokens each expert takes\n(share of a kind routed to the expert ÷ the "
                 f"expert's share of all tokens; 1 = no preference)", fontsize=10)
    bar = fig.colorbar(im, ax=ax, pad=0.16, fraction=0.04)
    bar.set_ticks([math.log2(x) for x in (1 / 3, 1 / 2, 1, 2, 3)], labels=["1/3", "1/2", "1", "2", "3"])
    bar.set_label("share of the kind ÷ share of all tokens")
    return ["## 2. Specialisation", "",
            f"Per layer and expert: the kinds of token it takes more (red) or less (blue) often than its share of all "
            f"tokens, and the tokens most over-represented among its tokens (seen at least {MIN_COUNT} times on val; "
            f"the percentage is the share of the token's occurrences routed to the expert, against its share of all "
            f"tokens, which is {K} × its load). The examples show a token ⟦in context⟧: ⏎ is a newline, ␣ a "
            f"space. Indentation is whitespace with only whitespace before it on its line.", "",
            *figure(plt, fig, folder, "specialisation.png"), *md]


def coactivation_lines(r, plt, folder):
    E, K, L = r.E, r.K, len(r.layers)
    entropy = r.routed.entropy.mean(0)
    share_of_max = entropy / math.log(E)
    out = ["## 3. Co-activation and routing entropy", ""]
    if K > 1:
        cols = min(L, 4)
        rows_ = (L + cols - 1) // cols
        fig, axes = plt.subplots(rows_, cols, figsize=(3.3 * cols, 3.4 * rows_ + 0.5), squeeze=False)
        for li in range(L):
            m_NE = F.one_hot(r.routed.choices[:, li], E).sum(1).float()  # 1 where the expert is among the token's k
            both = m_NE.T @ m_NE / r.n
            ax = axes[li // cols][li % cols]
            ax.imshow(both.numpy(), cmap="viridis", vmin=0, vmax=1)
            for i in range(E):
                for j in range(E):
                    ax.text(j, i, f"{both[i, j]:.2f}", ha="center", va="center", fontsize=8,
                            color="k" if both[i, j] > 0.5 else "w")
            ax.set_title(f"layer {r.layers[li]} (entropy {share_of_max[li]:.2f} of max)", fontsize=9)
            ax.set_xlabel("expert j")
            ax.set_ylabel("expert i")
            ax.set_xticks(range(E))
            ax.set_yticks(range(E))
        for ax in axes.flat[L:]:
            ax.axis("off")
        fig.suptitle(f"{r.run.name}: share of val tokens whose top-{K} holds both i and j (diagonal: i)", fontsize=10)
        out += [f"How often two experts serve the same token: the share of val tokens whose top-{K} holds both (at "
                f"even load and independent choices about {K / E:.2f} × {(K - 1) / (E - 1):.2f} = "
                f"{K * (K - 1) / E / (E - 1):.2f} for every pair; the diagonal is each expert's share of all tokens).",
                "", *figure(plt, fig, folder, "coactivation.png")]
    else:
        out += ["Top-1 routing: each token has one expert, so no two experts are ever chosen together.", ""]
    return out + ["The routing entropy is the entropy of the router's distribution over the experts, averaged over "
                  "val tokens, also as a share of its maximum log E (1: the router cannot tell the experts apart; "
                  "0: each token is certain of one expert).", "",
                  "The last column is the share of val tokens whose top-k set is the one their token gets most "
                  "often: 100% would be a router that looks only at the token, a lookup table; the rest is decided "
                  "by the context.", "",
                  *table(["layer", "entropy (nats)", "share of max", "top-k set fixed by the token"],
                         [[r.names[li], f"{entropy[li]:.3f}", f"{share_of_max[li]:.3f}",
                           f"{fixed_by_token(r.stream[:-1], r.routed.choices[:, li]):.1%}"] for li in range(L)])]


def saturation_lines(r, plt, folder):
    E, K = r.E, r.K
    out = ["## 4. Routing over training (router saturation)", ""]
    if not r.saturation:
        return out + [f"{r.run.out_dir} holds no earlier checkpoints: train with `--save_every=N` to keep a copy every "
                      f"N iterations (`keep_checkpoints` bounds how many), and this section shows how soon the router "
                      f"settles.", ""]
    its = [it for it, _ in r.saturation]
    shares = torch.stack([s for _, s in r.saturation])  # (checkpoints, L)
    tokens = min(r.n, SATURATION_TOKENS // r.block * r.block or r.block)
    fig, ax = plt.subplots(figsize=(7, 4))
    for li, name in enumerate(r.names):
        ax.plot(its, (shares[:, li] * 100).tolist(), marker="o", label=name)
    ax.axhline(K / E * 100, color="k", linestyle=":", linewidth=1, label=f"chance ({K}/{E})")
    ax.set_ylim(0, 102)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("training iteration of the checkpoint")
    ax.set_ylabel("top-k choices equal to the final model's (%)")
    ax.set_title(f"{r.run.name}: router saturation on {tokens:,} val tokens", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return out + [f"For each checkpoint kept by `--save_every`, the share of its top-{K} choices on the first "
                  f"{tokens:,} val tokens that the final model (iteration {its[-1]}) also makes (OLMoE's router "
                  f"saturation; random choices would share {K / E:.0%}).", "",
                  *figure(plt, fig, folder, "saturation.png"),
                  *table(["iteration", *r.names], [[it, *(f"{x:.1%}" for x in s)] for it, s in r.saturation])]


def compare_lines(r, plt, folder):
    """The two runs' per-token val loss, by the kind of token predicted and by token."""
    if r.other is None:
        return []
    a, b, targets, kinds = r.routed.loss, r.other.loss, r.stream[1:], r.kinds[1:]
    rows, ticks, diffs = [], [], []
    for c, kind in enumerate(CLASSES):
        m = kinds == c
        if m.any():
            diffs.append((a[m] - b[m]).mean().item())
            ticks.append(f"{kind}\n({int(m.sum()):,})")
            rows.append([kind, f"{int(m.sum()):,}", f"{a[m].mean():.4f}", f"{b[m].mean():.4f}", f"{diffs[-1]:+.4f}"])
    rows.append(["all", f"{r.n:,}", f"{a.mean():.4f}", f"{b.mean():.4f}", f"{(a - b).mean():+.4f}"])
    fig, ax = plt.subplots(figsize=(7.5, 4))
    ax.bar(range(len(ticks)), diffs, color=["C2" if d < 0 else "C3" for d in diffs])
    ax.axhline((a - b).mean(), color="k", linestyle=":", linewidth=1, label=f"all tokens: {(a - b).mean():+.4f}")
    ax.axhline(0, color="k", linewidth=0.8)
    ax.set_xticks(range(len(ticks)), ticks, fontsize=8)
    ax.set_xlabel("kind of the predicted token (how many on val)")
    ax.set_ylabel("mean loss difference (nats)")
    ax.set_title(f"val loss per token, {r.run.name} minus {r.other.name}\n(below 0: {r.run.name} predicts it "
                 f"better)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    # the tokens on which the runs differ most in total (occurrences x mean difference)
    count = torch.bincount(targets, minlength=len(r.pieces)).float()
    total = torch.zeros(len(r.pieces)).index_add_(0, targets, a - b)
    seen = torch.nonzero(count >= MIN_COUNT).flatten()
    order = seen[total[seen].argsort()].tolist()

    def token_rows(ids):
        return [[code(show(r.pieces[v])), f"{int(count[v]):,}", f"{total[v] / count[v]:+.3f}", f"{total[v]:+.1f}"]
                for v in ids]
    gains, losses = [v for v in order[:8] if total[v] < 0], [v for v in order[::-1][:8] if total[v] > 0]
    return [f"## 5. {r.run.name} vs {r.other.name}", "",
            f"The next-token loss of both runs on the same {r.n:,} val tokens (blocks of {r.block}), by the kind of "
            f"token predicted; below 0, {r.run.name} predicts it better.", "",
            *figure(plt, fig, folder, "compare.png"),
            *table(["predicted", "tokens", r.run.name, r.other.name, "difference"], rows),
            f"The predicted tokens (seen at least {MIN_COUNT} times) on which {r.run.name} gains most in total, and "
            f"those on which it loses most:", "",
            *table(["gains on", "count", "mean difference", "total"], token_rows(gains)),
            *(table(["loses on", "count", "mean difference", "total"], token_rows(losses)) if losses else
              [f"{r.run.name} loses on no token in total.", ""])]


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
