"""
The Mixture-of-Experts model (moe_model.py): each MoE layer checked against a direct computation (weighted
sum of expert MLPs, balance loss, z-loss, capacity), the router's precision and gradients, the balancing
modes, and a tiny MoE trained, resumed and sampled through train.py and sample.py.

Layer-level tests run every implementation ('loop', the reference, and 'grouped'), so both are held to the
same direct computations; they run on the GPU with --device=cuda.
"""
import re
import shutil
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_ok, read_metrics, run_script, train_args
from model import MLP
from moe_model import MoE, MoEConfig, MoEGPT, load_stats
from nanomoe.errors import UserError
from nanomoe.optim import configure_optimizers

TINY = dict(block_size=16, vocab_size=32, n_layer=2, n_head=4, n_embd=32, dropout=0.0,
            n_experts=4, moe_top_k=2, expert_hidden=64)
IMPLS = ["loop", "grouped"]


def moe_layer(seed=0, **overrides):
    """One MoE layer with weights large enough that routing is far from uniform and outputs are O(1)."""
    torch.manual_seed(seed)
    layer = MoE(MoEConfig(**{**TINY, **overrides}))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.5)
    return layer


def tiny_moe_gpt(seed=0, **overrides):
    torch.manual_seed(seed)
    return MoEGPT(MoEConfig(**{**TINY, **overrides}))


def add_to_router_logits(layer, bias_E):
    """Shift the router's logits by bias_E (a forward hook), to force routing decisions."""
    return layer.router.register_forward_hook(
        lambda module, inputs, logits: logits + torch.tensor(bias_E, device=logits.device))


def capture_router(layer):
    """A list that receives (router input, router logits) at every forward of layer."""
    seen = []
    layer.router.register_forward_hook(lambda module, inputs, logits: seen.append((inputs[0], logits)))
    return seen


def direct_routing(x_TD, weight_ED, k, renorm=True):
    """Probabilities, top-k experts and routing weights computed from scratch in float64."""
    logits_TE = x_TD.double() @ weight_ED.double().t()
    probs_TE = logits_TE.softmax(-1)
    top_TK = [sorted(range(probs_TE.size(1)), key=lambda e: -probs_TE[t, e].item())[:k] for t in range(len(x_TD))]
    w_TK = [[probs_TE[t, e].item() for e in top] for t, top in enumerate(top_TK)]
    if renorm:
        w_TK = [[w / sum(ws) for w in ws] for ws in w_TK]
    return logits_TE, probs_TE, top_TK, w_TK


# ---------------------------------------------------------------- the MoE layer against direct computation

@pytest.mark.parametrize("impl", IMPLS)
def test_all_experts_gives_router_weighted_sum(impl, device):
    layer = moe_layer(moe_top_k=4, moe_impl=impl).to(device)
    x = torch.randn(2, 6, 32).to(device)
    with torch.no_grad():
        y_TD = layer(x).view(-1, 32)
        x_TD = x.view(-1, 32)
        probs_TE = torch.softmax(x_TD @ layer.router.weight.t(), dim=-1)
        expected = sum(probs_TE[:, [e]] * layer.experts.expert_mlp(e, x_TD) for e in range(4))
    assert probs_TE.max() > 0.5  # the routing is far from uniform: weights matter
    assert torch.allclose(y_TD, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_one_expert_is_the_dense_mlp(impl, mlp, device):
    layer = moe_layer(n_experts=1, moe_top_k=1, expert_hidden=None, mlp=mlp, moe_impl=impl).to(device)
    dense = MLP(layer.config).to(device)
    with torch.no_grad():  # nn.Linear layout: the expert's weights copy straight in
        dense.c_fc.weight.copy_(layer.experts.c_fc[0])
        dense.c_fc.bias.copy_(layer.experts.c_fc_bias[0])
        dense.c_proj.weight.copy_(layer.experts.c_proj[0])
        dense.c_proj.bias.copy_(layer.experts.c_proj_bias[0])
        x = torch.randn(3, 5, 32).to(device)
        assert torch.allclose(layer(x), dense(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_topk_output_balance_and_z_against_direct_computation(impl, k, device):
    layer = moe_layer(moe_top_k=k, moe_impl=impl).to(device)
    x = torch.randn(2, 7, 32).to(device)
    with torch.no_grad():
        y_TD = layer(x).view(-1, 32)
    x_TD = x.view(-1, 32)
    # the default renormalises the chosen weights only when k > 1
    logits_TE, probs_TE, top_TK, w_TK = direct_routing(x_TD, layer.router.weight.detach(), k, renorm=k > 1)
    E, T = 4, len(x_TD)
    with torch.no_grad():
        expected = torch.stack([sum(w * layer.experts.expert_mlp(e, x_TD[t:t + 1])[0]
                                    for e, w in zip(top_TK[t], w_TK[t])) for t in range(T)])
    assert torch.allclose(y_TD, expected.float(), rtol=1e-4, atol=1e-5)

    counts = [sum(top.count(e) for top in top_TK) for e in range(E)]
    f = [c / (T * k) for c in counts]
    P = probs_TE.mean(0).tolist()
    balance = E * sum(fi * pi for fi, pi in zip(f, P))
    z = (torch.logsumexp(logits_TE, dim=-1) ** 2).mean().item()
    assert layer.stats["expert_load"].tolist() == pytest.approx(f)
    assert layer.stats["balance"].item() == pytest.approx(balance, rel=1e-5)
    assert layer.stats["z"].item() == pytest.approx(z, rel=1e-5)
    assert z > 0.5  # logits are not tiny, so a wrong formula would show


def one_hot_tokens(T, D, E):
    """Token t is the unit vector of dimension t mod E: a router weight (E, D) then reads logits off columns."""
    x_TD = torch.zeros(T, D)
    x_TD[torch.arange(T), torch.arange(T) % E] = 1.0
    return x_TD.view(1, T, D)


@pytest.mark.parametrize("k", [1, 2])
def test_balance_is_one_when_routing_is_uniform(k):
    E = 4
    layer = moe_layer(moe_top_k=k)
    # token t prefers expert t mod E (logit 4) and then expert t+1 mod E (logit 2): each expert is the first
    # choice of a quarter of the tokens and the second choice of another quarter, and the mean probability
    # of every expert is the same by symmetry
    w_ED = torch.zeros(E, 32)
    for d in range(E):
        w_ED[d, d] = 4.0
        w_ED[(d + 1) % E, d] = 2.0
    with torch.no_grad():
        layer.router.weight.copy_(w_ED)
        layer(one_hot_tokens(16, 32, E))
    assert layer.stats["expert_load"].tolist() == [0.25] * 4  # f uniform
    assert layer.stats["balance"].item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("k", [1, 2])
def test_balance_is_E_over_k_when_routing_collapses(k):
    # collapsed top-k routing sends every token to the same k experts: f = 1/k on each, and the balance loss
    # reads E/k (4 for top-1, 2 for top-2), not E
    layer = moe_layer(moe_top_k=k)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[2].fill_(1.0)  # expert 2's logit is 50 x (sum of the token's features)
        layer.router.weight[1].fill_(0.5)  # and expert 1 second, far above the others
        x = torch.rand(1, 12, 32) + 1.0  # every token has a feature sum > 32
        layer(x)
    assert layer.stats["expert_load"].tolist() == ([0.0, 0.0, 1.0, 0.0] if k == 1 else [0.0, 0.5, 0.5, 0.0])
    assert layer.stats["balance"].item() == pytest.approx(4.0 / k, rel=1e-4)


def test_balance_averages_layers_instead_of_pooling():
    # two MoE layers, each sending every token to one expert, but not the same one: pooled over layers the
    # counts and probabilities look perfectly balanced (loss 1); averaged per layer the loss is E = 2
    model = tiny_moe_gpt(n_experts=2, moe_top_k=1)
    seen = [capture_router(layer) for layer in model.moe_layers()]
    with torch.no_grad():
        for i, block in enumerate(model.transformer.h):
            block.ln_2.weight.zero_()  # the MoE input is the ln_2 bias for every token: e_0
            block.ln_2.bias.zero_()
            block.ln_2.bias[0] = 1.0
            block.mlp.router.weight.zero_()
            block.mlp.router.weight[i, 0] = 50.0  # layer 0 -> expert 0, layer 1 -> expert 1
        _, _, extra = model(torch.randint(0, 32, (2, 16)))
    assert extra["expert_load"].tolist() == [[1.0, 0.0], [0.0, 1.0]]
    per_layer = [layer.stats["balance"].item() for layer in model.moe_layers()]
    assert per_layer == pytest.approx([2.0, 2.0], rel=1e-6)
    assert extra["balance"].item() == pytest.approx(2.0, rel=1e-6)
    f_pooled = extra["expert_load"].mean(0)
    P_pooled = torch.cat([logits.softmax(-1) for s in seen for _, logits in s]).mean(0)
    assert (2 * (f_pooled * P_pooled).sum()).item() == pytest.approx(1.0, abs=1e-6)


def test_model_losses_combine_per_layer_stats():
    model = tiny_moe_gpt(balance_loss_weight=0.1, z_loss_weight=0.01)
    idx = torch.randint(0, 32, (2, 16))
    with torch.no_grad():
        _, loss, extra = model(idx, idx)
    layers = model.moe_layers()
    balance = sum(layer.stats["balance"] for layer in layers) / len(layers)
    z = sum(layer.stats["z"] for layer in layers) / len(layers)
    assert extra["balance"].item() == pytest.approx(balance.item())
    assert extra["z"].item() == pytest.approx(z.item())
    assert extra["aux_loss"].item() == pytest.approx(0.1 * balance.item() + 0.01 * z.item())
    assert extra["expert_load"].shape == (2, 4) and extra["dropped"].tolist() == [0.0, 0.0]


# ---------------------------------------------------------------- router precision and gradients

@pytest.mark.parametrize("impl", IMPLS)
def test_router_logits_are_float32_under_bf16_autocast(impl, device):
    model = tiny_moe_gpt(moe_impl=impl).to(device)
    seen = [capture_router(layer) for layer in model.moe_layers()]
    with torch.no_grad():
        for layer in model.moe_layers():
            layer.router.weight.normal_(0.0, 1.0)  # logits of order 1: bf16 rounding would be visible
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
            idx = torch.randint(0, 32, (2, 16)).to(device)
            _, loss, extra = model(idx, torch.randint(0, 32, (2, 16)).to(device))
    assert torch.isfinite(loss) and extra["z"].dtype == torch.float32
    for layer, calls in zip(model.moe_layers(), seen):
        (x_TD, logits_TE), = calls
        assert logits_TE.dtype == torch.float32
        reference = F.linear(x_TD.float(), layer.router.weight.float())  # outside autocast
        assert torch.allclose(logits_TE, reference, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(logits_TE, reference.bfloat16().float(), rtol=1e-5, atol=1e-5)


def test_router_gets_gradients_from_cross_entropy_and_from_balance_loss():
    model = tiny_moe_gpt()
    idx = torch.randint(0, 32, (2, 16))
    _, ce, _ = model(idx, idx)
    ce.backward()  # through the routing weights of the chosen experts
    for layer in model.moe_layers():
        assert layer.router.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    _, _, extra = model(idx, idx)
    extra["balance"].backward()  # through the mean softmax probabilities P
    for layer in model.moe_layers():
        assert layer.router.weight.grad.abs().sum() > 0
    assert model.moe_layers()[-1].experts.c_fc.grad is None  # the balance loss is about routing only


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("k", [1, 2])
def test_router_learns_from_cross_entropy_by_default(k, score):
    # renormalised, a single routing weight is p/p = 1 and the CE cannot reach the router: by default
    # (moe_renorm=None) top-1 keeps the raw score as its gate (Switch) and top-k > 1 renormalises
    idx = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(0))
    model = tiny_moe_gpt(moe_top_k=k, router_score=score, balance_loss_weight=0.0, z_loss_weight=0.0)
    _, ce, _ = model(idx, idx)
    ce.backward()
    for layer in model.moe_layers():
        assert layer.router.weight.grad.abs().sum() > 1e-6


def test_top1_with_renorm_is_refused():
    with pytest.raises(UserError, match="moe_renorm=True with moe_top_k=1 .* learn nothing"):
        tiny_moe_gpt(moe_top_k=1, moe_renorm=True)


def test_sigmoid_gates_are_normalised_over_the_chosen_experts():
    layer = moe_layer(moe_top_k=2, router_score="sigmoid")
    x_TD = torch.randn(10, 32)
    logits_TE, probs_TE, expert_TK, weight_TK = layer.route(x_TD)
    scores_TE = logits_TE.sigmoid()
    assert torch.equal(expert_TK, scores_TE.topk(2).indices)
    chosen = scores_TE.gather(-1, expert_TK)
    torch.testing.assert_close(weight_TK, chosen / chosen.sum(-1, keepdim=True))
    torch.testing.assert_close(probs_TE, scores_TE / scores_TE.sum(-1, keepdim=True))  # P for the balance loss


# ---------------------------------------------------------------- balancing: aux-free bias, global-batch loss

def ONE_PROCESS(t):
    """The reduce_mean of one process (distributed/parallel.reduce_mean): a tensor's mean over itself."""
    return t


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_aux_free_bias_changes_choice_but_not_gate_weights(score):
    layer = moe_layer(moe_top_k=2, balance_mode="aux_free", router_score=score)
    x_TD = torch.randn(20, 32)
    logits_TE, _, before_TK, weight_before_TK = layer.route(x_TD)
    with torch.no_grad():
        layer.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))  # expert 3 is now everyone's choice
    logits2_TE, _, expert_TK, weight_TK = layer.route(x_TD)
    assert torch.equal(logits_TE, logits2_TE) and (expert_TK == 3).any(-1).all()
    assert not torch.equal(before_TK, expert_TK)
    # the gates are the unbiased scores of the chosen experts, renormalised over the two
    scores_TE = logits_TE.softmax(-1) if score == "softmax" else logits_TE.sigmoid()
    chosen = scores_TE.gather(-1, expert_TK)
    torch.testing.assert_close(weight_TK, chosen / chosen.sum(-1, keepdim=True))


def test_aux_free_bias_is_a_buffer_the_optimizer_never_sees():
    model = tiny_moe_gpt(balance_mode="aux_free")
    optimizer = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), "cpu")
    biases = [layer.expert_bias for layer in model.moe_layers()]
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not any(id(b) in in_optimizer for b in biases) and not any(b.requires_grad for b in biases)
    assert "transformer.h.0.mlp.expert_bias" in model.state_dict()  # saved in checkpoints
    assert "transformer.h.0.mlp.expert_bias" not in tiny_moe_gpt().state_dict()  # only where it is used


def test_expert_biases_get_no_weight_decay():
    model = tiny_moe_gpt()
    optimizer = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), "cpu")
    no_decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    for layer in model.moe_layers():
        assert id(layer.experts.c_fc_bias) in no_decay and id(layer.experts.c_proj_bias) in no_decay
        assert id(layer.experts.c_fc) not in no_decay and id(layer.router.weight) not in no_decay


def test_aux_free_update_moves_load_toward_balance():
    # a router that sends most tokens to expert 0: each step the bias rises for the underloaded experts and
    # falls for the overloaded ones by exactly bias_update_rate, until the load evens out
    model = tiny_moe_gpt(balance_mode="aux_free", bias_update_rate=0.005, moe_top_k=1)
    for layer in model.moe_layers():
        add_to_router_logits(layer, [0.3, 0.0, 0.0, 0.0])
    idx = torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(0))
    cvs = []
    for step in range(20):
        with torch.no_grad():
            _, _, extra = model(idx, idx)
        load = extra["expert_load"]
        cvs.append(load_stats(load)["load_cv"].item())
        before = [layer.expert_bias.clone() for layer in model.moe_layers()]
        model.end_step(load, torch.tensor(False), ONE_PROCESS)
        for b0, layer, f_E in zip(before, model.moe_layers(), load):
            expected = b0 + 0.005 * torch.sign(f_E.mean() - f_E)
            torch.testing.assert_close(layer.expert_bias, expected)
    assert cvs[0] > 1.5 and max(cvs[-5:]) < 0.3, cvs  # from most tokens on expert 0 to within ~20% of even
    # a skipped optimizer step leaves the bias as it was
    before = [layer.expert_bias.clone() for layer in model.moe_layers()]
    model.end_step(load, torch.tensor(True), ONE_PROCESS)
    assert all(torch.equal(b, layer.expert_bias) for b, layer in zip(before, model.moe_layers()))


@pytest.mark.parametrize("k", [1, 2])
def test_global_balance_loss_equals_loss_on_the_concatenated_batch(k):
    # three micro-steps with balance_scope='global' give the gradient of one step on the three micro-batches
    # concatenated (where 'micro' is the whole batch): f is counted over the step, P stays per micro-batch
    settings = dict(moe_top_k=k, balance_loss_weight=1.0, z_loss_weight=0.01, n_experts=8)
    micro, per_micro = tiny_moe_gpt(**settings), tiny_moe_gpt(**settings)
    model = tiny_moe_gpt(**settings, balance_scope="global")
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 32, (2, 16), generator=gen),) * 2 for _ in range(3)]
    model.start_step(batches, nullcontext(), ONE_PROCESS)
    for x, y in batches:
        _, loss, extra = model(x, y)
        ((loss + extra["aux_loss"]) / len(batches)).backward()
    x_all, y_all = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
    _, loss, extra = micro(x_all, y_all)
    (loss + extra["aux_loss"]).backward()
    for (name, p), q in zip(micro.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-7, msg=lambda m: f"{name}: {m}")
    # per micro-batch counts would give another gradient: the test can tell the two apart
    for x, y in batches:
        _, loss, extra = per_micro(x, y)
        ((loss + extra["aux_loss"]) / len(batches)).backward()
    router = "transformer.h.0.mlp.router.weight"
    assert not torch.allclose(per_micro.get_parameter(router).grad, micro.get_parameter(router).grad,
                              rtol=1e-4, atol=1e-7)
    model.end_step(extra["expert_load"], torch.tensor(False), ONE_PROCESS)
    assert all(layer.global_load is None for layer in model.moe_layers())  # the next step counts anew


def test_balancing_combinations_that_cannot_work_are_refused():
    with pytest.raises(UserError, match="balance_scope='global' .* balance_mode='aux'"):
        tiny_moe_gpt(balance_scope="global", balance_mode="aux_free")
    with pytest.raises(UserError, match="dropout=0 and router_jitter=0"):
        tiny_moe_gpt(balance_scope="global", dropout=0.1)


def test_load_stats():
    load = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.5, 0.3, 0.15, 0.05]])
    s = load_stats(load)
    assert s["load_max"].item() == pytest.approx(2.0) and s["load_min"].item() == pytest.approx(0.2)
    cv1 = (load[1] * 4).std(unbiased=False).item()
    assert s["load_cv"].item() == pytest.approx(cv1 / 2)  # layer 0 is perfectly balanced: CV 0
    assert s["dead_experts"].item() == pytest.approx(1 / 8)  # 0.05 < 1/(4E) = 0.0625


@pytest.mark.parametrize("impl", IMPLS)
def test_every_parameter_has_a_gradient_when_an_expert_gets_no_token(impl, device):
    model = tiny_moe_gpt(moe_impl=impl, n_shared_experts=1).to(device)
    for layer in model.moe_layers():
        add_to_router_logits(layer, [0.0, 0.0, 0.0, -1e4])  # expert 3 is never among the top 2
    idx = torch.randint(0, 32, (2, 16)).to(device)
    _, loss, extra = model(idx, idx)
    assert extra["expert_load"][:, 3].tolist() == [0.0, 0.0]
    (loss + extra["aux_loss"]).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert missing == []  # DDP requires a gradient for every parameter on every step
    for layer in model.moe_layers():
        assert torch.all(layer.experts.c_fc.grad[3] == 0) and layer.experts.c_fc.grad[:3].abs().sum() > 0


# ---------------------------------------------------------------- capacity

def test_capacity_serves_top1_before_top2():
    layer = moe_layer(n_experts=2, moe_top_k=2, capacity_factor=0.5)  # capacity ceil(2*4/2*0.5) = 2
    expert_TK = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1]])
    # in token order, tokens 0 and 1 would fill both experts with their first and second choices and
    # tokens 2 and 3 would lose even their first choice; top-1 first keeps every first choice
    assert layer.capacity_mask(expert_TK).tolist() == [[True, False]] * 4


@pytest.mark.parametrize("impl", IMPLS)
def test_capacity_limits_tokens_per_expert(impl, device):
    layer = moe_layer(capacity_factor=1.0, moe_impl=impl).to(device)  # capacity ceil(2*12/4) = 6
    add_to_router_logits(layer, [3.0, 1.5, 0.0, 0.0])  # experts 0 and 1 are over-subscribed
    x = torch.randn(1, 12, 32).to(device)
    with torch.no_grad():
        y_TD = layer(x).view(-1, 32)
    x_TD = x.view(-1, 32)
    logits_TE = x_TD @ layer.router.weight.t() + torch.tensor([3.0, 1.5, 0.0, 0.0], device=device)
    w_TK, expert_TK = logits_TE.softmax(-1).topk(2, dim=-1)
    w_TK = w_TK / w_TK.sum(-1, keepdim=True)  # renormalised before any drop
    keep_TK = layer.capacity_mask(expert_TK)
    for e in range(4):
        wanted = (expert_TK == e).sum().item()
        served = ((expert_TK == e) & keep_TK).sum().item()
        assert served == min(wanted, 6)  # never over capacity, nothing dropped below it
    assert not keep_TK.all()
    assert layer.stats["dropped"].item() == pytest.approx(1 - keep_TK.float().mean().item())
    with torch.no_grad():
        none = torch.zeros(32, device=device)
        expected = torch.stack([sum(w_TK[t, j] * layer.experts.expert_mlp(expert_TK[t, j].item(), x_TD[t:t + 1])[0]
                                    for j in range(2) if keep_TK[t, j]) if keep_TK[t].any() else none
                                for t in range(12)])
    assert torch.allclose(y_TD, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_fully_dropped_token_passes_through(impl, device):
    layer = moe_layer(n_experts=2, moe_top_k=1, capacity_factor=0.25, moe_impl=impl).to(device)  # capacity 1
    add_to_router_logits(layer, [100.0, 0.0])  # every token wants expert 0
    with torch.no_grad():
        y = layer(torch.randn(1, 8, 32).to(device))[0]
    assert y[0].abs().sum() > 0  # the first token is served
    assert torch.equal(y[1:], torch.zeros(7, 32, device=device))  # the others add nothing: the block's residual is unchanged
    assert layer.stats["dropped"].item() == pytest.approx(7 / 8)


# ---------------------------------------------------------------- parameter counts

def test_num_active_params_counts_k_of_E_experts():
    D, F_, L = 32, 64, 2
    per_expert = F_ * D + F_ + D * F_ + D  # c_fc and c_proj with biases
    moe = tiny_moe_gpt(n_experts=4, moe_top_k=2)
    two_experts = tiny_moe_gpt(n_experts=2, moe_top_k=2)
    assert moe.get_num_params() == two_experts.get_num_params() + L * (2 * per_expert + 2 * D)  # + router rows
    # a token uses 2 of the 4 experts: as many weights as the 2-expert model, plus the bigger router
    assert moe.num_active_params() == two_experts.get_num_params() + L * 2 * D
    assert moe.num_active_params() == moe.get_num_params() - L * 2 * per_expert

    every_other = tiny_moe_gpt(n_experts=4, moe_top_k=1, moe_every=2)
    assert len(every_other.moe_layers()) == 1 and isinstance(every_other.transformer.h[0].mlp, MLP)
    assert every_other.num_active_params() == every_other.get_num_params() - 3 * per_expert


# ---------------------------------------------------------------- CLI end to end

MOE_FLAGS = ["--n_experts=4", "--moe_top_k=2", "--expert_hidden=64", "--log_interval=5", "--eval_interval=15"]


def moe_train_args(data_root, out_dir, *extra):
    return train_args(data_root, out_dir, *MOE_FLAGS, *extra)


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory, shakespeare_data):
    work = tmp_path_factory.mktemp("moe")
    out = work / "out"
    r = run_script(moe_train_args(shakespeare_data, out, "--max_iters=30", "--lr_decay_iters=30"), cwd=work)
    assert_ok(r)
    return work, out, r


def test_moe_training_logs_each_loss_and_saves_moe_checkpoint(moe_run):
    work, out, r = moe_run
    assert "model: MoEGPT," in r.stdout
    assert re.search(r"^iter 25/30: loss [\d.]+, balance [\d.]+, z [\d.]+, lr", r.stdout, re.M), r.stdout
    train = [m for m in read_metrics(out) if m["type"] == "train"]
    assert [m["iter"] for m in train] == list(range(0, 30, 5))
    assert train[-1]["loss"] < train[0]["loss"] - 0.5, [m["loss"] for m in train]
    for m in train:
        assert 1.0 <= m["balance"] <= 4.0 and m["z"] > 0  # balance lies between balanced and collapsed
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 30
    assert (ckpt["model_args"]["n_experts"], ckpt["model_args"]["moe_top_k"]) == (4, 2)
    assert ckpt["model"]["transformer.h.1.mlp.experts.c_fc"].shape == (4, 64, 32)
    # each eval records the per-layer expert load of both splits
    evals = [m for m in read_metrics(out) if m["type"] == "eval"]
    assert [m["iter"] for m in evals] == [0, 15, 30]
    for m in evals:
        for split in ("train", "val"):
            load = m[f"{split}_expert_load"]
            assert len(load) == 2 and all(len(row) == 4 for row in load)  # (MoE layers, experts)
            assert all(sum(row) == pytest.approx(1.0) for row in load)
            assert m[f"{split}_balance"] >= 1.0


def test_moe_resume_and_sample(moe_run, shakespeare_data):
    work, out, _ = moe_run
    resumed = work / "resumed"
    shutil.copytree(out, resumed)
    assert_ok(run_script(moe_train_args(shakespeare_data, resumed, "--max_iters=40", "--lr_decay_iters=30",
                                        "--init_from=resume"), cwd=work))
    assert [m["iter"] for m in read_metrics(resumed) if m["type"] == "train"][-2:] == [30, 35]
    assert torch.load(resumed / "ckpt.pt", weights_only=True)["iter_num"] == 40

    (work / "prompt.txt").write_text("ab", encoding="utf-8")
    r = run_script(["sample.py", f"--out_dir={resumed}", "--device=cpu", "--start=FILE:prompt.txt",
                    "--num_samples=2", "--max_new_tokens=30", "--stream=True"], cwd=work)
    assert_ok(r)
    samples = r.stdout.split("\n---------------\n")
    assert samples[-1] == "" and [len(s) for s in samples[:2]] == [32, 32]
    assert all(s.startswith("ab") for s in samples[:2])


def test_aux_free_bias_of_an_expert_at_exactly_the_mean_load_does_not_move():
    """Counts 34, 62, 6 of 102 top-1 choices over 3 experts: expert 0 is at the mean load exactly. The sign of
    the float fractions (34/102 against their rounded mean) moved its bias; the whole counts leave it."""
    model = tiny_moe_gpt(balance_mode="aux_free", bias_update_rate=0.01, moe_top_k=1, n_experts=3)
    layers = model.moe_layers()
    counts = torch.tensor([34, 62, 6])
    fractions = counts.float() / 102
    assert torch.sign(fractions.mean() - fractions)[0] != 0  # what the old comparison saw
    for layer in layers:
        layer.step_counts = counts.clone()  # what the step's forward passes counted (MoE.forward)
    model.end_step(torch.stack([fractions] * len(layers)), torch.tensor(False), ONE_PROCESS)
    for layer in layers:
        assert layer.expert_bias.tolist() == pytest.approx([0.0, -0.01, 0.01])
        assert layer.step_counts is None  # the next step counts anew


def test_aux_free_counts_come_from_the_training_forward_passes_only():
    model = tiny_moe_gpt(balance_mode="aux_free", bias_update_rate=0.01, moe_top_k=2)
    idx = torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(0))
    model.eval()
    model(idx, idx)  # evaluation: not part of any step
    assert all(layer.step_counts is None for layer in model.moe_layers())
    model.train()
    _, _, first = model(idx[:2], idx[:2])
    _, _, second = model(idx[2:], idx[2:])
    for i, layer in enumerate(model.moe_layers()):  # two micro-steps of 2 x 16 tokens, 2 choices each
        assert layer.step_counts.sum() == 2 * 2 * 16 * 2
        torch.testing.assert_close(layer.step_counts.double() / 128, (first["expert_load"][i] +
                                                                      second["expert_load"][i]).double() / 2)
