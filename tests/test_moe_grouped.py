"""The grouped (fast) MoE path (nanomoe/layers/grouped_experts.py) gives the same numbers as the reference
for-loop, compiles without graph breaks (in bf16 with the grouped kernel too), and reads the same parameters (a
checkpoint from one runs with the other). The tests that take `device` run on the GPU with --device=cuda."""
import pytest
import torch

from moe_model import MoE, MoEConfig, MoEGPT
from nanomoe.checkpoint import load_checkpoint, model_from_checkpoint, model_state, save_checkpoint

TINY = dict(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, n_experts=4)


def twin_models(device="cpu", **kw):
    torch.manual_seed(0)
    loop = MoEGPT(MoEConfig(moe_impl="loop", **{**TINY, **kw}))
    grouped = MoEGPT(MoEConfig(moe_impl="grouped", **{**TINY, **kw}))
    grouped.load_state_dict(loop.state_dict())
    return loop.to(device), grouped.to(device)


def forward_backward(model, idx):
    logits, loss, extra = model(idx, idx)
    (loss + extra["aux_loss"]).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, extra


CASES = {
    "top1": dict(moe_top_k=1),
    "top2": dict(moe_top_k=2),
    "top2-shared-experts": dict(moe_top_k=2, n_shared_experts=1),
    "top1-capacity": dict(moe_top_k=1, capacity_factor=0.5),
    "top2-capacity": dict(moe_top_k=2, capacity_factor=1.0),
    "swiglu-nobias": dict(moe_top_k=2, mlp="swiglu", bias=False),
    "every-other-layer": dict(moe_top_k=2, moe_every=2),
}


@pytest.mark.parametrize("case", CASES)
def test_grouped_equals_loop(case, device):
    loop, grouped = twin_models(device, **CASES[case])
    idx = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(1)).to(device)
    logits_l, grads_l, extra_l = forward_backward(loop, idx)
    logits_g, grads_g, extra_g = forward_backward(grouped, idx)
    torch.testing.assert_close(logits_g, logits_l, rtol=1e-5, atol=1e-5)
    for name in grads_l:  # router and expert gradients included
        torch.testing.assert_close(grads_g[name], grads_l[name], rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(extra_g["expert_load"], extra_l["expert_load"])
    torch.testing.assert_close(extra_g["dropped"], extra_l["dropped"])
    if "capacity" in case:
        assert extra_l["dropped"].max() > 0  # the case really drops tokens


def test_grouped_equals_loop_when_an_expert_gets_no_tokens(device):
    loop, grouped = twin_models(device, moe_top_k=1)
    for model in (loop, grouped):
        for layer in model.moe_layers():
            with torch.no_grad():
                layer.router.weight[3] = -1.0  # with positive inputs its logit is far below the others
    x = torch.rand(2, 16, 32).to(device) + 0.5
    layer_l, layer_g = loop.moe_layers()[0], grouped.moe_layers()[0]
    out_l, out_g = layer_l(x), layer_g(x)
    assert layer_l.stats["expert_load"][3] == 0
    torch.testing.assert_close(out_g, out_l, rtol=1e-5, atol=1e-5)
    out_l.square().sum().backward()
    out_g.square().sum().backward()
    for (name, p_l), p_g in zip(layer_l.named_parameters(), layer_g.parameters()):
        assert p_l.grad is not None and p_g.grad is not None, name
        torch.testing.assert_close(p_g.grad, p_l.grad, rtol=1e-5, atol=1e-5, msg=name)
    assert layer_g.experts.c_fc.grad[3].abs().sum() == 0  # present, and zero: no token reached it


@pytest.mark.slow  # torch.compile's first trace takes seconds
@pytest.mark.parametrize("routing", [{}, dict(router_score="sigmoid", balance_mode="aux_free", qk_norm=True)])
def test_compile_fullgraph_grouped_forward_backward(routing):
    # aot_eager traces the whole graph (Dynamo + AOTAutograd, so any graph break fails fullgraph=True)
    # without the minute-long C++ code generation of the default backend on a CPU
    torch.manual_seed(0)
    model = MoEGPT(MoEConfig(moe_impl="grouped", moe_top_k=2, capacity_factor=1.25, **TINY, **routing))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    idx = torch.randint(0, 64, (2, 16))
    if routing.get("balance_mode") == "aux_free":  # biases that moved once, as after train.py's first step
        model.end_step(torch.rand(2, 4).softmax(-1), torch.tensor(False), lambda t: t)
    logits, loss, extra = compiled(idx, idx)
    (loss + extra["aux_loss"]).backward()
    assert all(p.grad is not None for p in model.parameters())
    eager_logits, _, _ = model(idx, idx)
    torch.testing.assert_close(logits, eager_logits, rtol=1e-5, atol=1e-5)


def test_checkpoint_from_one_implementation_runs_with_the_other(tmp_path):
    torch.manual_seed(0)
    model = MoEGPT(MoEConfig(moe_impl="loop", moe_top_k=2, **TINY)).eval()
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(model_state(model), path)
    idx = torch.randint(0, 64, (2, 16))
    expected, _, _ = model(idx, idx)
    other = model_from_checkpoint(load_checkpoint(path), {"moe_impl": "grouped"}).eval()
    assert isinstance(other.moe_layers()[0], MoE) and other.config.moe_impl == "grouped"
    got, _, _ = other(idx, idx)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_auto_uses_the_loop_where_no_grouped_kernel_runs(device):
    torch.manual_seed(0)
    model = MoEGPT(MoEConfig(moe_impl="auto", **{**TINY, "n_embd": 30}))
    # float32 rows of 30 * 4 bytes: torch._grouped_mm wants multiples of 16 bytes, so the loop
    assert not model.moe_layers()[0].use_grouped(torch.zeros(4, 30, device=device))
    model = MoEGPT(MoEConfig(moe_impl="auto", **TINY))
    assert model.moe_layers()[0].use_grouped(torch.zeros(4, 32, device=device))  # float32: the grouped kernel runs


def test_grouped_kernel_in_float32_matches_the_loop(monkeypatch):
    # in float32 on the CPU, torch._grouped_mm runs one matmul per expert, the same matmuls as the loop: the
    # same bits (without biases, which the loop adds inside F.linear), and E times fewer FLOPs than the fallback
    calls = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    loop, grouped = twin_models(moe_top_k=2, bias=False)
    idx = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(1))
    logits_l, grads_l, _ = forward_backward(loop, idx)
    logits_g, grads_g, _ = forward_backward(grouped, idx)
    assert calls  # the grouped model ran the grouped GEMM kernel, not the masked fallback
    torch.testing.assert_close(logits_g, logits_l, rtol=0, atol=0)
    for name in grads_l:
        torch.testing.assert_close(grads_g[name], grads_l[name], rtol=0, atol=0, msg=name)


def test_grouped_kernel_under_bf16_autocast_matches_the_loop(monkeypatch, device):
    # the same torch._grouped_mm call that runs on a GPU also runs on the CPU in bf16: check it is really
    # taken, and that it agrees with the loop to bf16 precision (outputs and gradients)
    calls = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    loop, grouped = twin_models(device, moe_top_k=2, capacity_factor=1.0)
    idx = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(1)).to(device)
    results = []
    for model in (loop, grouped):
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
            results.append(forward_backward(model, idx))
    assert calls  # the grouped model ran the grouped GEMM kernel
    torch.testing.assert_close(results[1][0].float(), results[0][0].float(), rtol=2e-2, atol=2e-2)
    for name in results[0][1]:
        g_loop, g_grouped = results[0][1][name], results[1][1][name]
        assert (g_grouped - g_loop).norm() <= 0.05 * g_loop.norm() + 1e-6, name


@pytest.mark.slow  # torch.compile's first trace takes seconds
def test_compiled_bf16_layer_runs_the_grouped_kernel_like_eager(device):
    """The path a GPU trains on: the MoE layer under bf16 autocast, compiled whole (fullgraph: a graph break
    fails) with torch._grouped_mm in its graph. 13 tokens, top-2 over 4 experts: per-expert row counts that
    are not multiples of 8, and expert 3 gets no token, then (the inputs' sign flipped) most of them, without a
    recompile. Outputs and gradients equal eager's, and the empty expert's gradient is exactly zero. On CUDA
    (--device=cuda) Inductor compiles it; on the CPU aot_eager traces the same graph without generating C++."""
    torch.manual_seed(0)
    layer = MoE(MoEConfig(moe_impl="auto", moe_top_k=2, capacity_factor=0.0, **TINY)).to(device)
    with torch.no_grad():
        layer.router.weight[3] = -1.0  # positive inputs: its logit is far below the others'
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("inductor" if device.startswith("cuda") else "aot_eager")(
            gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend=recording_backend)
    x = torch.rand(1, 13, 32, generator=torch.Generator().manual_seed(1)).to(device) + 0.5
    with torch._dynamo.config.patch(error_on_recompile=True):
        for inputs, empty in ((x, True), (-x, False)):
            results = []
            for run in (compiled, layer):
                layer.zero_grad(set_to_none=True)
                with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
                    y = run(inputs)
                y.float().square().sum().backward()
                results.append((y.detach(), {n: p.grad.clone() for n, p in layer.named_parameters()},
                                layer.stats["expert_load"] * 13 * 2))
            (y_c, grads_c, rows_c), (y_e, grads_e, rows_e) = results
            torch.testing.assert_close(rows_c, rows_e)
            assert (rows_e[3] == 0) == empty and any(int(r) % 8 for r in rows_e), rows_e
            torch.testing.assert_close(y_c, y_e, rtol=1e-2, atol=1e-2)
            for name in grads_e:
                g_c, g_e = grads_c[name], grads_e[name]
                assert (g_c - g_e).norm() <= 0.02 * g_e.norm() + 1e-6, name
            if empty:
                assert torch.all(grads_c["experts.c_fc"][3] == 0) and torch.all(grads_c["experts.c_proj"][3] == 0)
    assert len(graphs) == 1  # one graph, traced once: routing changes no shape
    assert any(node.target is torch._grouped_mm for node in graphs[0].graph.nodes)
