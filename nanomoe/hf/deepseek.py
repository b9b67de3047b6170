"""
DeepSeek-V3 and DeepSeek-V2 in and out of Hugging Face format: DeepseekV3ForCausalLM and DeepseekV2ForCausalLM,
multi-head latent attention with a DeepSeekMoE. The backbone (embeddings, norms, dense MLPs, stacked experts)
is the Llama layout (llama.py); this file maps MLA, DeepSeek's routing and its configs.

- MLA (nanomoe/layers/mla.py) has DeepSeek's own names: q_proj (no query compression: q_lora_rank=None) or
  q_a_proj, q_a_norm -> q_a_layernorm, q_b_proj; kv_a_proj -> kv_a_proj_with_mqa ([latent | rope key]);
  kv_a_norm -> kv_a_layernorm; kv_b_proj (per head [k_nope | v]); c_proj -> o_proj. Each of our query/key
  heads has head_size = n_embd / n_head dims, the last d_rope of them rotary: qk_nope_head_dim = head_size -
  d_rope, qk_rope_head_dim = d_rope, v_head_dim = head_size (so the softmax scale 1/sqrt(head_size) is ours).
- RoPE: DeepSeek checkpoints keep each rotary pair side by side, (x0, x1), (x2, x3), ... (V3's
  rope_interleave; V2 always); ours are the two halves (x[i], x[i + d/2]). The export writes that layout: the
  rotary rows of each query head and of the rope key are permuted, halves -> pairs (and back on import, which
  also reads V3's rope_interleave=False). transformers' V3 rotates the pairs and returns them as halves, so it
  computes our numbers exactly; V2 returns them as pairs, so its dot products add the same terms in another
  order (float32 rounding).
- norms: the layer norms' eps is rms_norm_eps; transformers gives the MLA latent norms a fixed 1e-6, so an
  export is exact with norm_eps=1e-6 (DeepSeek's own value) only.
- routing, V3: sigmoid scores in float32; our aux-free bias (expert_bias) is e_score_correction_bias, added to
  the scores that choose the top-k and not to the weights; the top-k weights renormalised when norm_topk_prob
  (moe_renorm); group-limited routing off (n_group = topk_group = 1). Imports take a non-zero
  e_score_correction_bias as balance_mode='aux_free'.
  V2: softmax scores, greedy top-k, weights never renormalised (transformers ignores norm_topk_prob), no bias.
  Both: routed_scaling_factor=1.
- shared experts: shared_experts, n_shared_experts * moe_intermediate_size wide and added unscaled, like ours
  (a zero-width one adds exactly 0 when there are none).
- dense layers: the first first_k_dense_replace layers (our first_dense_layers; MoE in every layer after
  them). A dense model of ours with MLA is a DeepseekV3 whose layers are all dense.
"""
import torch

from nanomoe.hf import llama

ARCHITECTURES = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM"}


def hf_config(args, family):
    """The transformers config (as keyword arguments) for model_args `args` (MLA, dense or MoE)."""
    c = llama.backbone_config(args)
    del c["head_dim"]  # DeepSeek's config sets it to the rotary dims, qk_rope_head_dim
    hs, dr = args["n_embd"] // args["n_head"], args["d_rope"]
    c.update(q_lora_rank=args["q_latent_dim"] or None, kv_lora_rank=args["kv_latent_dim"], qk_rope_head_dim=dr,
             qk_nope_head_dim=hs - dr, v_head_dim=hs, attention_bias=False, routed_scaling_factor=1.0,
             intermediate_size=llama.dense_hidden(args))
    if family == "deepseek_v3":
        c.update(rope_interleave=True, num_mtp_layers=0, n_group=1, topk_group=1)
    else:
        c.update(topk_method="greedy", mlp_bias=False)
    moe_layers = moe_layer_indices(args)
    if not moe_layers:  # a dense model: every layer keeps its MLP; the MoE sizes are never used
        return {**c, "first_k_dense_replace": args["n_layer"], "n_routed_experts": 2, "num_experts_per_tok": 1,
                "n_shared_experts": 0, "moe_intermediate_size": 1, "norm_topk_prob": False}
    return {**c, "first_k_dense_replace": moe_layers[0], "n_routed_experts": args["n_experts"],
            "num_experts_per_tok": args["moe_top_k"], "n_shared_experts": args["n_shared_experts"],
            "moe_intermediate_size": args.get("expert_hidden") or llama.dense_hidden(args),
            "norm_topk_prob": llama.renormalises(args)}


def moe_layer_indices(args):
    if args.get("n_experts", 0) <= 0:
        return []
    every, first = args["moe_every"], args.get("first_dense_layers", 0)
    return [i for i in range(first, args["n_layer"]) if (i + 1) % every == 0]


def family_problems(args, family):
    """What DeepSeek-V3 / V2 need of model_args `args` beyond the features formats.py compares."""
    name = ARCHITECTURES[family]
    problems = llama.backbone_problems(args, name)
    if llama.norm_eps(args) != 1e-6:
        problems.append(f"{name} normalises the MLA latents with eps 1e-6, this model has "
                        f"norm_eps={llama.norm_eps(args)} (train with norm_eps=1e-6, DeepSeek's value)")
    moe_layers = moe_layer_indices(args)
    if moe_layers and moe_layers != list(range(moe_layers[0], args["n_layer"])):
        problems.append(f"{name} has MoE in every layer after its first dense ones, this model has MoE in "
                        f"layers {moe_layers} (moe_every={args['moe_every']}; use first_dense_layers)")
    if moe_layers and family == "deepseek_v3" and args["n_experts"] < 2:
        problems.append(f"{name} routes among at least 2 experts, this model has n_experts=1")
    if moe_layers and family == "deepseek_v2" and llama.renormalises(args):
        problems.append(f"{name} weighs experts by their softmax scores as they are, this model renormalises "
                        f"its top-{args['moe_top_k']} weights (moe_renorm=False, or deepseek_v3 with sigmoid scores)")
    return problems


# ---- ours -> transformers

def to_hf_state(sd, args, family):
    """Our state dict (model_args `args`) -> DeepseekV3ForCausalLM's or DeepseekV2ForCausalLM's."""
    out = llama.to_hf_state(sd, args, family)  # embeddings, norms, dense MLPs, routers and experts
    perm_q, perm_k = rope_rows(args, interleave=True)
    for i in range(args["n_layer"]):
        ours, hf = f"transformer.h.{i}.attn.", f"model.layers.{i}.self_attn."
        for a, b in MLA_NAMES:
            if ours + a in sd:
                out[hf + b] = sd[ours + a]
        q = "q_b_proj.weight" if args["q_latent_dim"] else "q_proj.weight"
        out[hf + q] = out[hf + q][perm_q]
        out[hf + "kv_a_proj_with_mqa.weight"] = out[hf + "kv_a_proj_with_mqa.weight"][perm_k]
        m, mlp = f"transformer.h.{i}.mlp.", f"model.layers.{i}.mlp."
        if m + "router.weight" not in sd:
            continue
        if family == "deepseek_v3":
            bias = sd.get(m + "expert_bias")
            out[mlp + "gate.e_score_correction_bias"] = bias if bias is not None else \
                sd[m + "router.weight"].new_zeros(args["n_experts"])
        if m + "shared.c_fc.weight" in sd:
            out.update(llama.mlp_to_hf(sd, m + "shared.", mlp + "shared_experts."))
        else:
            out.update(llama.zero_width_mlp(sd[m + "router.weight"], mlp + "shared_experts."))
    return out


# (ours, DeepSeek's) MLA parameter names
MLA_NAMES = (("q_proj.weight", "q_proj.weight"), ("q_a_proj.weight", "q_a_proj.weight"),
             ("q_a_norm.weight", "q_a_layernorm.weight"), ("q_b_proj.weight", "q_b_proj.weight"),
             ("kv_a_proj.weight", "kv_a_proj_with_mqa.weight"), ("kv_a_norm.weight", "kv_a_layernorm.weight"),
             ("kv_b_proj.weight", "kv_b_proj.weight"), ("c_proj.weight", "o_proj.weight"))


def rope_rows(args, interleave):
    """Row orders of the query projection (all heads) and of kv_a_proj that turn our rotary halves into
    DeepSeek's side-by-side pairs (interleave=True: pairs[j] = halves[perm[j]]) and back (False)."""
    hs, dr, nh, L = args["n_embd"] // args["n_head"], args["d_rope"], args["n_head"], args["kv_latent_dim"]
    perm = torch.arange(dr).view(2, dr // 2).t().reshape(-1)  # 0, d/2, 1, d/2 + 1, ...
    if not interleave:
        perm = perm.argsort()
    per_head = torch.cat([torch.arange(hs - dr), hs - dr + perm])
    return (torch.cat([h * hs + per_head for h in range(nh)]),
            torch.cat([torch.arange(L), L + perm]))


# ---- transformers -> ours

def model_args_from_hf(c, source):
    """Our model_args for a DeepseekV3Config or DeepseekV2Config `c`; a UserError naming every setting we
    cannot reproduce."""
    problems = []
    args = llama.backbone_args(c, problems)
    hs = c.hidden_size // c.num_attention_heads
    if c.qk_nope_head_dim + c.qk_rope_head_dim != hs or c.v_head_dim != hs or c.hidden_size % c.num_attention_heads:
        problems.append(f"qk_nope_head_dim + qk_rope_head_dim = {c.qk_nope_head_dim} + {c.qk_rope_head_dim} and "
                        f"v_head_dim={c.v_head_dim} (ours are both hidden_size / num_attention_heads = {hs})")
    if c.rms_norm_eps != 1e-6:
        problems.append(f"rms_norm_eps={c.rms_norm_eps} with MLA latent norms of eps 1e-6 (one norm_eps for all)")
    if c.num_key_value_heads != c.num_attention_heads:
        problems.append(f"num_key_value_heads={c.num_key_value_heads} (MLA here has one per head)")
    if getattr(c, "mlp_bias", False):
        problems.append("mlp_bias=True (biases in the MLPs only)")
    args.update(n_kv_head=None, attn="mla", q_latent_dim=c.q_lora_rank or 0, kv_latent_dim=c.kv_lora_rank,
                d_rope=c.qk_rope_head_dim)
    if c.num_hidden_layers > c.first_k_dense_replace:
        v3 = c.model_type == "deepseek_v3"
        if v3 and c.n_group not in (None, 1) and c.topk_group != c.n_group:
            problems.append(f"group-limited routing (n_group={c.n_group}, topk_group={c.topk_group})")
        if not v3 and c.topk_method != "greedy":
            problems.append(f"topk_method={c.topk_method!r} (only 'greedy')")
        if not v3 and c.norm_topk_prob:
            problems.append("norm_topk_prob=True, which transformers' DeepseekV2 does not apply (it weighs "
                            "experts by their scores as they are)")
        if c.routed_scaling_factor != 1.0:
            problems.append(f"routed_scaling_factor={c.routed_scaling_factor} (ours weighs experts by their "
                            f"scores as they are)")
        args.update(n_experts=c.n_routed_experts, moe_top_k=c.num_experts_per_tok, moe_every=1,
                    first_dense_layers=c.first_k_dense_replace, moe_renorm=bool(v3 and c.norm_topk_prob),
                    expert_hidden=c.moe_intermediate_size, n_shared_experts=c.n_shared_experts,
                    router_score="sigmoid" if v3 else "softmax")
    return llama.finish_args(args, c, c.model_type, source, problems)


def from_hf_state(hf_sd, args, source, c):
    """DeepSeek's state dict (config `c`) -> ours (model_args `args` from model_args_from_hf; a non-zero
    e_score_correction_bias makes it balance_mode='aux_free'). Takes DeepSeek's own tensors out of hf_sd,
    then llama.from_hf_state the rest."""
    sd = {}
    interleaved = getattr(c, "rope_interleave", True)  # V2 has no choice: pairs
    perm_q, perm_k = rope_rows(args, interleave=False) if interleaved else (slice(None), slice(None))
    aux_free = False
    for i in range(args["n_layer"]):
        ours, hf = f"transformer.h.{i}.attn.", f"model.layers.{i}.self_attn."
        for a, b in MLA_NAMES:
            if hf + b in hf_sd:
                sd[ours + a] = hf_sd.pop(hf + b)
        q = ours + ("q_b_proj.weight" if args["q_latent_dim"] else "q_proj.weight")
        sd[q], sd[ours + "kv_a_proj.weight"] = sd[q][perm_q], sd[ours + "kv_a_proj.weight"][perm_k]
        m, mlp = f"transformer.h.{i}.mlp.", f"model.layers.{i}.mlp."
        if mlp + "gate.e_score_correction_bias" in hf_sd:
            sd[m + "expert_bias"] = hf_sd.pop(mlp + "gate.e_score_correction_bias")
            aux_free |= bool(sd[m + "expert_bias"].any())
        if mlp + "shared_experts.gate_proj.weight" in hf_sd:
            shared = llama.mlp_from_hf(hf_sd, mlp + "shared_experts.", m + "shared.")
            if args["n_shared_experts"]:
                sd.update(shared)
    if aux_free:
        args["balance_mode"] = "aux_free"
    else:  # no bias moved: the default balance loss (an export of a model trained without the bias)
        sd = {k: v for k, v in sd.items() if not k.endswith(".expert_bias")}
    return {**sd, **llama.from_hf_state(hf_sd, args, source, c)}
