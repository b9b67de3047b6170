"""
Qwen3 and Qwen3-MoE in and out of Hugging Face format: Qwen3ForCausalLM (dense) and Qwen3MoeForCausalLM. Their
weights are the Llama layout (llama.py maps them, q_norm and k_norm included); this file knows their configs.

- QK-norm: Qwen3 RMS-normalises each head's queries and keys over the head's dims, with a gain per dim
  (self_attn.q_norm, self_attn.k_norm) and eps rms_norm_eps, before RoPE: our qk_norm=True. Both families
  always have it, so a model without qk_norm goes to Llama, Mixtral or Qwen2-MoE instead.
- Qwen3-MoE routes like Qwen2-MoE (softmax in float32, top-k, renormalised when norm_topk_prob: our
  moe_renorm) with the same MoE layer rule (decoder_sparse_step, mlp_only_layers: our moe_every and
  first_dense_layers), and has no shared experts.
- Qwen3's attention_bias puts biases on q/k/v/o only, and its MLPs have none; our bias=True has both, so only
  bias=False maps (Qwen3 models are trained without biases).
- OLMoE (OlmoeForCausalLM) also normalises queries and keys, but over all heads at once (one RMSNorm over
  the whole q and k projections), which is not our per-head qk_norm: it is neither read nor written here.
"""
from nanomoe.hf import llama

ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


def hf_config(args, family):
    """The transformers config (as keyword arguments) for model_args `args` in `family` (qwen3 | qwen3_moe)."""
    c = {**llama.backbone_config(args), "intermediate_size": llama.dense_hidden(args), "attention_bias": False,
         "use_sliding_window": False}
    if family == "qwen3":
        return c
    return {**c, **llama.qwen_moe_layers(args), "num_experts": args["n_experts"],
            "num_experts_per_tok": args["moe_top_k"], "norm_topk_prob": llama.renormalises(args),
            "moe_intermediate_size": args.get("expert_hidden") or llama.dense_hidden(args),
            "router_aux_loss_coef": args["balance_loss_weight"]}


def family_problems(args, family):
    """What `family` needs of model_args `args` beyond the features formats.py compares: the backbone."""
    return llama.backbone_problems(args, ARCHITECTURES[family])


def model_args_from_hf(c, source):
    """Our model_args for a transformers config `c` of model_type qwen3 | qwen3_moe; a UserError naming every
    setting we cannot reproduce exactly."""
    problems = []
    args = llama.backbone_args(c, problems)
    if args["bias"]:
        problems.append("attention_bias=True (q/k/v/o biases without MLP biases; our bias=True has both)")
    if c.use_sliding_window or any(t != "full_attention" for t in getattr(c, "layer_types", None) or []):
        problems.append(f"sliding-window attention (use_sliding_window={c.use_sliding_window}; only full attention)")
    args["qk_norm"] = True
    if c.model_type == "qwen3_moe":
        args.update(llama.qwen_moe_args(c, problems))
    return llama.finish_args(args, c, c.model_type, source, problems)


to_hf_state = llama.to_hf_state
from_hf_state = llama.from_hf_state
