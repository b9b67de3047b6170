# GPT-2 (124M size, Llama-style backbone) with MoE in every other layer: 8 experts, top-1 Switch routing (sijunhe/nanoMoE study)
# 8 GPUs: torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_moe_8_experts.py

include("train_gpt2_moe.py")

out_dir = "out-gpt2-moe-8_experts"
wandb_run_name = "gpt2-moe-8_experts"
n_experts = 8
moe_top_k = 1
# top-1 keeps the raw router probability as the gate (Switch): moe_renorm's default renormalises only when k > 1
