"""
Llama-family weights in and out of Hugging Face format: LlamaForCausalLM (dense), MixtralForCausalLM and
Qwen2MoeForCausalLM (MoE). formats.py picks the family and writes the folder; this file knows the layouts.

Our RoPE + RMSNorm + SwiGLU GPT is a Llama, weight for weight:
- RoPE: model.apply_rope rotates the pairs (x[i], x[i + hs/2]) (the two halves of a head), which is exactly
  transformers' rotate_half layout, with the same inverse frequencies: q/k weights copy without permuting.
- attention: our c_attn is [q | k | v] (n_head, n_kv_head, n_kv_head heads) -> q_proj, k_proj, v_proj;
  grouped-query attention repeats each kv head for n_head / n_kv_head consecutive query heads, like repeat_kv.
- RMSNorm eps is 1e-5 (ours, fixed); the output head is tied to the embedding (tie_word_embeddings=True).
- SwiGLU: our c_fc is [gate | up] -> gate_proj, up_proj; c_proj -> down_proj. An MoE layer's stacked expert
  weights are transformers' own in-memory layout (experts.gate_up_proj (E, 2F, D), experts.down_proj
  (E, D, F)); save_pretrained writes them per expert, as Mixtral and Qwen2-MoE checkpoints have them.
- routing: softmax over experts in float32, top-k, renormalised when moe_renorm (Mixtral always renormalises;
  Qwen2-MoE's norm_topk_prob says whether).
- shared experts (Qwen2-MoE only): Qwen2-MoE scales its shared expert by sigmoid(shared_expert_gate(x)); ours
  has no gate. A zero gate gives sigmoid(0) = 0.5 for every token, so we write the gate as zeros and the shared
  down_proj times 2: 0.5 * (2 W) h is exactly W h in floating point (scaling by a power of two is exact).
  Reading back, a zero gate halves down_proj again; a Qwen2-MoE whose gate is not zero has no exact
  equivalent here and is refused.
- MoE in every moe_every-th layer is Qwen2-MoE's decoder_sparse_step (the same (i + 1) % step == 0 rule);
  Mixtral has no dense layers. Without shared experts, Qwen2-MoE gets shared_expert_intermediate_size=0: its
  shared branch then adds exactly 0.
"""
import torch

from model import GPTConfig, mlp_hidden_size
from moe_model import MoEConfig
from nanomoe.errors import UserError

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}
RMS_EPS = 1e-5  # model.make_norm's


def hf_config(args, family):
    """The transformers config (as keyword arguments) for model_args `args` in `family` (llama | mixtral |
    qwen2_moe; family_problems(args, family) is empty)."""
    D, H = args["n_embd"], args["n_head"]
    c = dict(vocab_size=args["vocab_size"], hidden_size=D, num_hidden_layers=args["n_layer"],
             num_attention_heads=H, num_key_value_heads=args.get("n_kv_head") or H, head_dim=D // H,
             hidden_act="silu", max_position_embeddings=args["block_size"], rms_norm_eps=RMS_EPS,
             rope_parameters={"rope_type": "default", "rope_theta": float(args["rope_theta"])},
             tie_word_embeddings=True, attention_dropout=0.0,
             # GPT-2's <|endoftext|> where the vocabulary has it (a char vocabulary has no special tokens)
             bos_token_id=50256 if args["vocab_size"] > 50256 else None,
             eos_token_id=50256 if args["vocab_size"] > 50256 else None)
    dense_hidden = mlp_hidden_size(GPTConfig.from_dict(args))
    if family == "llama":
        return {**c, "intermediate_size": dense_hidden, "attention_bias": args["bias"],
                         "mlp_bias": args["bias"]}
    expert_hidden = args.get("expert_hidden") or dense_hidden
    moe = dict(num_experts_per_tok=args["moe_top_k"], router_aux_loss_coef=args["balance_loss_weight"])
    if family == "mixtral":
        return {**c, **moe, "num_local_experts": args["n_experts"], "intermediate_size": expert_hidden,
                           "router_jitter_noise": 0.0, "sliding_window": None}
    return {**c, **moe, "num_experts": args["n_experts"], "moe_intermediate_size": expert_hidden,
                         "shared_expert_intermediate_size": args["n_shared_experts"] * expert_hidden,
                         "intermediate_size": dense_hidden, "decoder_sparse_step": args["moe_every"],
                         "mlp_only_layers": [], "norm_topk_prob": renormalises(args), "qkv_bias": False,
                         "use_sliding_window": False}


def fits_mixtral(args):
    """An MoE that Mixtral represents: experts in every layer, renormalised top-k, no shared experts."""
    return args["n_shared_experts"] == 0 and args["moe_every"] == 1 and renormalises(args)


def renormalises(args):
    """Whether the MoE of model_args `args` renormalises its top-k weights (moe_renorm=None: when k > 1)."""
    return MoEConfig.from_dict(args).renormalises()


def family_problems(args, family):
    """Why model_args `args` has no exact equivalent in `family` ('llama' | 'mixtral' | 'qwen2_moe'); [] if
    it has one. Settings every format lacks (capacity, MLA, ...) are formats.py's."""
    name = ARCHITECTURES[family]
    problems = []
    for key, want, what in (("pos_emb", "rope", "RoPE"), ("norm", "rmsnorm", "RMSNorm"),
                            ("mlp", "swiglu", "a SwiGLU MLP")):
        if args[key] != want:
            problems.append(f"{name} needs {key}={want!r} ({what}), this model has {key}={args[key]!r}")
    moe = args.get("n_experts", 0) > 0
    if family == "llama" and moe:
        problems.append(f"LlamaForCausalLM has no experts, this model has n_experts={args['n_experts']} "
                        f"(use --format=mixtral or --format=qwen2_moe)")
    if family != "llama":
        if not moe:
            problems.append(f"{name} is an MoE format, this model is dense (use --format=llama)")
        elif args["bias"]:
            problems.append(f"{name} has no biases, this model has bias=True")
    if family == "mixtral" and moe:
        for key, value, why in (("n_shared_experts", 0, "shared experts"), ("moe_every", 1, "dense layers")):
            if args[key] != value:
                problems.append(f"MixtralForCausalLM has no {why} ({key}={args[key]!r}; use --format=qwen2_moe)")
        if not renormalises(args):
            problems.append(f"MixtralForCausalLM has no top-k weights that are not renormalised (moe_renorm="
                            f"{args['moe_renorm']!r} with moe_top_k={args['moe_top_k']}; use --format=qwen2_moe)")
    return problems


# ---- ours -> transformers (in-memory parameter names of the transformers model)

def to_hf_state(sd, args, family):
    """Our state dict (model_args `args`) -> the transformers model's in `family`."""
    H, D = args["n_head"], args["n_embd"]
    hs, kv = D // H, args.get("n_kv_head") or H
    out = {"model.embed_tokens.weight": sd["transformer.wte.weight"], "lm_head.weight": sd["lm_head.weight"],
           "model.norm.weight": sd["transformer.ln_f.weight"]}
    for i in range(args["n_layer"]):
        ours, hf = f"transformer.h.{i}.", f"model.layers.{i}."
        out[hf + "input_layernorm.weight"] = sd[ours + "ln_1.weight"]
        out[hf + "post_attention_layernorm.weight"] = sd[ours + "ln_2.weight"]
        for leaf in ("weight", "bias"):
            if ours + "attn.c_attn." + leaf in sd:
                q, k, v = sd[ours + "attn.c_attn." + leaf].split([H * hs, kv * hs, kv * hs])
                out.update({hf + f"self_attn.{n}_proj.{leaf}": t for n, t in zip("qkv", (q, k, v))})
                out[hf + "self_attn.o_proj." + leaf] = sd[ours + "attn.c_proj." + leaf]
        m = ours + "mlp."
        if m + "router.weight" not in sd:  # a dense layer
            for leaf in ("weight", "bias"):
                if m + "c_fc." + leaf in sd:
                    gate, up = sd[m + "c_fc." + leaf].chunk(2)
                    out.update({hf + "mlp.gate_proj." + leaf: gate, hf + "mlp.up_proj." + leaf: up,
                                hf + "mlp.down_proj." + leaf: sd[m + "c_proj." + leaf]})
            continue
        out[hf + "mlp.gate.weight"] = sd[m + "router.weight"]
        out[hf + "mlp.experts.gate_up_proj"] = sd[m + "experts.c_fc"]
        out[hf + "mlp.experts.down_proj"] = sd[m + "experts.c_proj"]
        if family == "qwen2_moe":
            if m + "shared.c_fc.weight" in sd:
                gate, up = sd[m + "shared.c_fc.weight"].chunk(2)
                down = sd[m + "shared.c_proj.weight"] * 2  # times the gate's constant 0.5: exact
            else:  # no shared experts: a zero-width shared expert adds exactly 0
                gate = up = sd[m + "router.weight"].new_zeros(0, D)
                down = sd[m + "router.weight"].new_zeros(D, 0)
            out.update({hf + "mlp.shared_expert.gate_proj.weight": gate, hf + "mlp.shared_expert.up_proj.weight": up,
                        hf + "mlp.shared_expert.down_proj.weight": down,
                        hf + "mlp.shared_expert_gate.weight": sd[m + "router.weight"].new_zeros(1, D)})
    return out


# ---- transformers -> ours

def model_args_from_hf(c, source):
    """Our model_args for a transformers config `c` of model_type llama | mixtral | qwen2_moe; a UserError
    naming every setting we cannot reproduce exactly."""
    family = c.model_type
    problems = []
    H, D = c.num_attention_heads, c.hidden_size
    rope = getattr(c, "rope_parameters", None) or {"rope_type": "default", "rope_theta": getattr(c, "rope_theta", 1e4)}
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope_type={rope.get('rope_type')!r} (only the default RoPE)")
    if getattr(c, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={c.hidden_act!r} (only silu: SwiGLU)")
    if abs(c.rms_norm_eps - RMS_EPS) > 1e-12:
        problems.append(f"rms_norm_eps={c.rms_norm_eps} (only {RMS_EPS})")
    if (getattr(c, "head_dim", None) or D // H) != D // H or D % H:
        problems.append(f"head_dim={c.head_dim} (only hidden_size / num_attention_heads = {D // H})")
    if getattr(c, "sliding_window", None) and (family != "qwen2_moe" or c.use_sliding_window):
        problems.append(f"sliding_window={c.sliding_window} (only full attention)")
    if family == "llama" and c.attention_bias != c.mlp_bias:
        problems.append(f"attention_bias={c.attention_bias} with mlp_bias={c.mlp_bias} (one bias setting for both)")
    args = dict(vocab_size=c.vocab_size, n_layer=c.num_hidden_layers, n_head=H, n_embd=D, dropout=0.0,
                n_kv_head=None if c.num_key_value_heads == H else c.num_key_value_heads,
                block_size=c.max_position_embeddings, pos_emb="rope", rope_theta=float(rope.get("rope_theta", 1e4)),
                norm="rmsnorm", mlp="swiglu", bias=bool(getattr(c, "attention_bias", False)))
    dense_hidden = mlp_hidden_size(GPTConfig.from_dict(args))
    has_dense_layers = family == "llama" or (family == "qwen2_moe" and c.decoder_sparse_step > 1)
    if has_dense_layers and c.intermediate_size != dense_hidden:
        problems.append(f"intermediate_size={c.intermediate_size} in its dense layers (our dense SwiGLU MLP has "
                        f"64 * ceil(8 * hidden_size / 3 / 64) = {dense_hidden})")
    if family == "mixtral":
        args.update(n_experts=c.num_local_experts, moe_top_k=c.num_experts_per_tok, moe_every=1, moe_renorm=True,
                    expert_hidden=c.intermediate_size, n_shared_experts=0)
    elif family == "qwen2_moe":
        F_, shared = c.moe_intermediate_size, c.shared_expert_intermediate_size
        if c.mlp_only_layers:
            problems.append(f"mlp_only_layers={c.mlp_only_layers} (only decoder_sparse_step chooses dense layers)")
        if shared % F_:
            problems.append(f"shared_expert_intermediate_size={shared} (only a multiple of moe_intermediate_size "
                            f"{F_}: n_shared_experts experts of that size)")
        args.update(n_experts=c.num_experts, moe_top_k=c.num_experts_per_tok, moe_every=c.decoder_sparse_step,
                    moe_renorm=bool(c.norm_topk_prob), expert_hidden=F_, n_shared_experts=shared // F_)
    if args.get("moe_renorm") and args["moe_top_k"] == 1:
        problems.append("one expert per token with its weight renormalised to 1.0 (the router would get no "
                        "gradient from the loss; our top-1 MoE weights the expert by its probability)")
    elif "moe_renorm" in args and args["moe_renorm"] == (args["moe_top_k"] > 1):
        args["moe_renorm"] = None  # our default says the same: renormalise when k > 1
    if problems:
        raise UserError(f"'{source}' has {family} settings this repository's model cannot reproduce exactly: "
                        f"{'; '.join(problems)}")
    if args.get("expert_hidden") == dense_hidden:
        args["expert_hidden"] = None  # the default: what sparse upcycling and our configs write
    return args


def from_hf_state(hf_sd, args, source):
    """The transformers model's state dict -> ours (model_args `args` from model_args_from_hf)."""
    def take(name):
        return hf_sd.pop(name)

    sd = {"transformer.wte.weight": take("model.embed_tokens.weight"),
          "transformer.ln_f.weight": take("model.norm.weight")}
    head = hf_sd.pop("lm_head.weight", sd["transformer.wte.weight"])
    if head.shape != sd["transformer.wte.weight"].shape or not torch.equal(head, sd["transformer.wte.weight"]):
        raise UserError(f"'{source}' has an output head that is not tied to the token embedding "
                        f"(tie_word_embeddings=False); this repository's GPT ties them")
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    for i in range(args["n_layer"]):
        ours, hf = f"transformer.h.{i}.", f"model.layers.{i}."
        sd[ours + "ln_1.weight"] = take(hf + "input_layernorm.weight")
        sd[ours + "ln_2.weight"] = take(hf + "post_attention_layernorm.weight")
        for leaf in ("weight", "bias"):
            qkv = [hf_sd.pop(hf + f"self_attn.{n}_proj.{leaf}", None) for n in "qkv"]
            if qkv[0] is None:
                continue
            if leaf == "bias" and not args["bias"]:  # Qwen2-MoE's qkv_bias: exact only when all zero
                if any(t.any() for t in qkv):
                    raise UserError(f"'{source}' has non-zero q/k/v biases (qkv_bias) and no other biases; "
                                    f"this repository's attention has biases only with bias=True everywhere")
                continue
            sd[ours + "attn.c_attn." + leaf] = torch.cat(qkv)
            sd[ours + "attn.c_proj." + leaf] = take(hf + "self_attn.o_proj." + leaf)
        m = ours + "mlp."
        if hf + "mlp.gate.weight" not in hf_sd:  # a dense layer
            for leaf in ("weight", "bias"):
                if hf + "mlp.gate_proj." + leaf in hf_sd:
                    sd[m + "c_fc." + leaf] = torch.cat([take(hf + "mlp.gate_proj." + leaf),
                                                        take(hf + "mlp.up_proj." + leaf)])
                    sd[m + "c_proj." + leaf] = take(hf + "mlp.down_proj." + leaf)
            continue
        sd[m + "router.weight"] = take(hf + "mlp.gate.weight")
        sd[m + "experts.c_fc"] = take(hf + "mlp.experts.gate_up_proj")
        sd[m + "experts.c_proj"] = take(hf + "mlp.experts.down_proj")
        if hf + "mlp.shared_expert_gate.weight" in hf_sd:
            if take(hf + "mlp.shared_expert_gate.weight").any():
                raise UserError(f"'{source}' gates its shared expert with sigmoid(shared_expert_gate(x)), a "
                                f"per-token scale this repository's shared experts do not have (exact only when "
                                f"the gate weights are zero: a constant 0.5, which our export writes)")
            gate, up = take(hf + "mlp.shared_expert.gate_proj.weight"), take(hf + "mlp.shared_expert.up_proj.weight")
            down = take(hf + "mlp.shared_expert.down_proj.weight") / 2  # the zero gate's 0.5, folded in: exact
            if args["n_shared_experts"]:
                sd[m + "shared.c_fc.weight"], sd[m + "shared.c_proj.weight"] = torch.cat([gate, up]), down
    hf_sd.pop("model.rotary_emb.inv_freq", None)
    if hf_sd:
        raise UserError(f"'{source}' has weights this repository's model has no place for: "
                        f"{', '.join(sorted(hf_sd)[:5])}")
    return sd
