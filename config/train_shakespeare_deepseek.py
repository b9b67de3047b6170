# the MoE + MLA character recipe the way DeepSeek-V3 has it, so it exports exactly as a DeepseekV3ForCausalLM:
# sigmoid expert scores with the aux-free bias instead of the balance loss, one shared expert, a dense first
# layer and norm eps 1e-6 (transformers' DeepSeek-V3 normalises the MLA latents with a fixed 1e-6)
# python prepare.py shakespeare_char && python train.py config/train_shakespeare_deepseek.py
# python -m tools.export --out_dir=out-shakespeare-deepseek            # -> out-shakespeare-deepseek/hf

include("train_shakespeare_moe_mla.py")

out_dir = "out-shakespeare-deepseek"
wandb_run_name = "mini-deepseek"

router_score = "sigmoid"
balance_mode = "aux_free"
n_shared_experts = 1
first_dense_layers = 1
norm_eps = 1e-6
