"""
optimizer='muon' (nanomoe/optim.py, docs/muon.md): Muon on the hidden weight matrices, each expert of a stacked
(E, out, in) weight orthogonalised as its own matrix, AdamW on the rest. The reference for every update is
torch's own: torch.optim.Muon on each 2-D matrix and on each expert's 2-D slice, torch.optim.AdamW on the
rest. Bit-exact resume, the non-finite skip and the bad inputs are in test_reliability.py, DDP and expert
parallel in test_distributed.py, with the other runs of their kind.
"""
import re
import shutil
from types import SimpleNamespace

import pytest
import torch

from conftest import assert_ok, assert_user_error, read_metrics, run, run_script, train_args
from nanomoe.checkpoint import load_checkpoint
from nanomoe.configurator import parse_args
from nanomoe.distributed.parallel import setup_processes
from nanomoe.factory import build_model
from nanomoe.optim import LR_RULE, MuonAdamW, configure_optimizers, newton_schulz

TINY = dict(block_size=16, vocab_size=32, n_layer=2, n_head=4, n_embd=32, dropout=0.0)
EVERY_KIND = dict(n_experts=4, moe_top_k=2, n_shared_experts=1, attn="mla", kv_latent_dim=16, d_rope=8,
                  q_latent_dim=16, fgram_max_n=3, fgram_buckets=64, mamba_layers=[0], mamba2_num_heads=4,
                  mamba2_head_dim=16, mamba2_state_size=8, mamba2_chunk_size=8, mamba2_expand=2)
MUON_FLAGS = ["--optimizer=muon", "--muon_lr=0.02", "--n_experts=4", "--moe_top_k=2", "--expert_hidden=48"]


def muon_and_adamw(model, lr=0.02, muon_lr=None, weight_decay=0.1):
    opt = configure_optimizers(model, weight_decay, lr, (0.9, 0.95), "cpu", "muon", muon_lr, 0.95)
    names = {id(p): n for n, p in model.named_parameters()}
    on_muon = {names[id(p)] for g in opt.param_groups if g["muon"] for p in g["params"]}
    return opt, on_muon


def test_muon_takes_the_hidden_matrices_and_each_kind_of_the_rest_stays_on_adamw():
    model = build_model({**TINY, **EVERY_KIND})
    opt, on_muon = muon_and_adamw(model)
    assert isinstance(opt, MuonAdamW)
    # layer 0: Mamba2 in attention's place; layer 1: MLA; both: MoE FFN with a shared expert
    assert on_muon == {
        "transformer.h.0.mamba.in_proj.weight", "transformer.h.0.mamba.c_proj.weight",
        "transformer.h.1.attn.q_a_proj.weight", "transformer.h.1.attn.q_b_proj.weight",
        "transformer.h.1.attn.kv_a_proj.weight", "transformer.h.1.attn.kv_b_proj.weight",
        "transformer.h.1.attn.c_proj.weight",
        *(f"transformer.h.{i}.mlp.{w}" for i in (0, 1) for w in ("experts.c_fc", "experts.c_proj",
                                                                 "shared.c_fc.weight", "shared.c_proj.weight"))}
    # every parameter is in exactly one group; the rest (embeddings and tied head, router, F-gram tables
    # and scales, norms, biases, Mamba2's convolution, A_log, D, dt_bias) on AdamW, decay as before
    all_ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(all_ids) == sorted(id(p) for p in model.parameters())
    adamw = {n for n, _ in model.named_parameters()} - on_muon
    for name in ("transformer.wte.weight", "transformer.h.0.mlp.router.weight", "transformer.fgram.tables.0",
                 "transformer.fgram.scale", "transformer.h.0.mamba.conv1d.weight", "transformer.h.0.mamba.A_log",
                 "transformer.h.0.mamba.D", "transformer.h.0.mamba.dt_bias", "transformer.h.1.attn.kv_a_norm.weight",
                 "transformer.h.0.mlp.experts.c_fc_bias"):
        assert name in adamw, name
    decayed = {id(p) for g in opt.param_groups if not g["muon"] and g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.transformer.wte.weight) in decayed and id(model.transformer.fgram.scale) not in decayed


def torch_reference_step(ref, grads, muon_names, lr, muon_lr, state):
    """One step of torch's own optimizers on the reference model's parameters: torch.optim.Muon on each hidden
    2-D matrix and on each expert's 2-D slice of a stacked weight (a Parameter of its own, written back), and
    torch.optim.AdamW on the rest. state holds the optimizers across steps."""
    params = dict(ref.named_parameters())
    if not state:
        state["slices"] = {n: [torch.nn.Parameter(params[n][e].detach().clone()) for e in range(params[n].size(0))]
                           for n in muon_names if params[n].ndim == 3}
        matrices = [params[n] for n in muon_names if params[n].ndim == 2]
        matrices += [s for slices in state["slices"].values() for s in slices]
        state["muon"] = torch.optim.Muon(matrices, lr=muon_lr, weight_decay=0.1, momentum=0.95,
                                         adjust_lr_fn=LR_RULE)
        rest = [p for n, p in params.items() if n not in muon_names]
        decay = [p for p in rest if p.ndim >= 2]  # this tiny model's rest: embeddings, router (decay), norms
        state["adamw"] = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                            {"params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0}],
                                           lr=lr, betas=(0.9, 0.95))
    for n, p in params.items():
        p.grad = grads[n].clone()
    for n, slices in state["slices"].items():
        for e, s in enumerate(slices):
            s.grad = grads[n][e].clone()
    state["muon"].step()
    state["adamw"].step()
    with torch.no_grad():
        for n, slices in state["slices"].items():
            params[n].copy_(torch.stack([s.detach() for s in slices]))


def test_each_expert_gets_exactly_torch_muons_update_of_its_own_matrix():
    """Three steps of MuonAdamW on an MoE model (experts' c_fc tall (E, 2F, D) under SwiGLU, c_proj wide) equal
    torch.optim.Muon applied to every hidden matrix and to each expert's slice on its own, with
    torch.optim.AdamW on the rest: parameters after each step, and the momentum of each expert."""
    cfg = {**TINY, "n_experts": 4, "moe_top_k": 2, "expert_hidden": 24, "mlp": "swiglu", "bias": False}
    torch.manual_seed(0)
    model, ref = build_model(cfg), build_model(cfg)
    ref.load_state_dict(model.state_dict())
    opt, muon_names = muon_and_adamw(model, lr=1e-3, muon_lr=0.02)
    assert "transformer.h.0.mlp.experts.c_fc" in muon_names
    state = {}
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
        # one expert's gradient 1000x smaller: its own orthogonalisation still gives it a full-size update
        grads["transformer.h.0.mlp.experts.c_proj"][1] *= 1e-3
        for n, p in model.named_parameters():
            p.grad = grads[n].clone()
        opt.step()
        torch_reference_step(ref, grads, muon_names, 1e-3, 0.02, state)
        for (n, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=lambda m: f"{n}: {m}")
    c_proj = model.transformer.h[0].mlp.experts.c_proj
    for e, s in enumerate(state["slices"]["transformer.h.0.mlp.experts.c_proj"]):
        torch.testing.assert_close(opt.state[c_proj]["momentum_buffer"][e], state["muon"].state[s]["momentum_buffer"],
                                   rtol=0, atol=1e-6)


def test_each_expert_is_orthogonalised_on_its_own_not_as_one_flattened_stack():
    """The batched Newton-Schulz gives each expert singular values near 1 (Muon's approximation: about
    0.5..1.5) even when one expert's gradient is 1000x smaller; one orthogonalisation of the flattened stack
    leaves that expert's update far smaller than the others' (here about 90x: 5 Newton-Schulz steps amplify
    small singular values, but not by 1000)."""
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(4, 16, 48, generator=gen)
    G[2] *= 1e-3
    coefficients = (3.4445, -4.775, 2.0315)
    for e, O in enumerate(newton_schulz(G, coefficients, 5, 1e-7).float()):
        s = torch.linalg.svdvals(O)
        assert s.min() > 0.5 and s.max() < 1.5, (e, s)
    flat = newton_schulz(G.reshape(1, 64, 48), coefficients, 5, 1e-7).float().reshape(4, 16, 48)
    assert flat[2].norm() < 0.05 * flat[0].norm()


@pytest.fixture(scope="module")
def muon_run(shakespeare_data, tmp_path_factory):
    """An MoE trained 8 steps with Muon, 2 micro-steps per step, clipped, warmup and cosine decay."""
    out = tmp_path_factory.mktemp("muon") / "out"
    r = run_script(train_args(shakespeare_data, out, *MUON_FLAGS, "--max_iters=8", "--eval_interval=8",
                              "--gradient_accumulation_steps=2", "--grad_clip=0.5", "--warmup_iters=2",
                              "--lr_decay_iters=8", "--min_lr=3e-4", "--log_interval=1"), cwd=out.parent)
    return out, r


def test_a_muon_run_prints_its_groups_learns_and_saves_muons_state(muon_run):
    out, r = muon_run
    assert_ok(r)
    # 2 layers: attention c_attn and c_proj (4 matrices), 2 expert stacks of 4 experts each (16 matrices)
    assert "optimizer: muon 8 tensors" in r.stdout and "(4 matrices + 16 expert matrices in 4 stacks); adamw" \
        in r.stdout, r.stdout
    evals = [m for m in read_metrics(out) if m["type"] == "eval"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3
    ckpt = load_checkpoint(out / "ckpt.pt")
    groups = ckpt["optimizer"]["param_groups"]
    assert [g["muon"] for g in groups] == [True, False, False]
    # the last step's rate on the decaying schedule: AdamW's as logged, Muon's the same fraction of muon_lr
    last_lr = [m for m in read_metrics(out) if m["type"] == "train"][-1]["lr"]
    assert groups[1]["lr"] == last_lr < 3e-3 and groups[0]["lr"] == pytest.approx(0.02 * last_lr / 3e-3)
    assert groups[0]["adjust_lr_fn"] == "match_rms_adamw"
    buffers = [s["momentum_buffer"] for s in ckpt["optimizer"]["state"].values() if "momentum_buffer" in s]
    assert sorted(tuple(b.shape) for b in buffers if b.ndim == 3) == [(4, 32, 48)] * 2 + [(4, 48, 32)] * 2


def test_a_muon_checkpoint_resumes_with_muon_and_not_with_adamw(muon_run, shakespeare_data, tmp_path):
    out, r = muon_run
    assert_ok(r)
    shutil.copytree(out, tmp_path / "out")
    args = train_args(shakespeare_data, tmp_path / "out", *MUON_FLAGS[2:], "--max_iters=10", "--eval_interval=8",
                      "--gradient_accumulation_steps=2", "--init_from=resume")
    assert_user_error(run_script([*args, "--optimizer=adamw"], cwd=tmp_path),
                      "optimizer='muon'", "cannot resume with optimizer='adamw'")
    r = run_script(args, cwd=tmp_path)  # no --optimizer: the checkpoint's
    assert_ok(r)
    assert "optimizer: muon" in r.stdout and load_checkpoint(tmp_path / "out" / "ckpt.pt")["iter_num"] == 10


def test_bench_times_the_muon_step(tmp_path):
    """tools.bench takes train.py's keys: --optimizer=muon times train_step with MuonAdamW's update in it."""
    from tools import bench
    args = ["--device=cpu", "--compile=False", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16",
            "--batch_size=2", "--vocab_size=64", "--n_experts=4", "--moe_top_k=2", "--gradient_accumulation_steps=1",
            "--bench_warmup=1", "--bench_steps=2", "--optimizer=muon"]
    cfg = SimpleNamespace(**parse_args(bench.KEYS, args))
    model, optimizer, step = bench.make_step("grouped", cfg, setup_processes(cfg))
    c_fc = model.transformer.h[0].mlp.experts.c_fc
    before = c_fc.detach().clone()
    step()
    assert isinstance(optimizer, MuonAdamW) and optimizer.state[c_fc]["momentum_buffer"].shape == c_fc.shape
    assert not torch.equal(before, c_fc)
    r = run_script(["tools.bench", *args], cwd=tmp_path)
    assert_ok(r)
    assert re.search(r"^moe-grouped\s+[\d.]+ ms/step", r.stdout, re.M), r.stdout


@pytest.mark.slow
def test_fsdp_with_muon_is_refused_in_one_line(shakespeare_data, tmp_path):
    """What each rank of a torchrun --fsdp=True run says (torchrun sets these variables): FSDP splits each
    matrix over the processes, and Muon needs it whole."""
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    r = run(train_args(shakespeare_data, tmp_path / "out", "--optimizer=muon", "--fsdp=True",
                       "--gradient_accumulation_steps=2"), cwd=tmp_path,
            env=env, check=False)
    assert_user_error(r, "optimizer='muon'", "fsdp=True", "--fsdp=False")
    assert not (tmp_path / "out").exists()
