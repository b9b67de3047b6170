# GPT-2 (124M size, Llama-style backbone) with MoE in every other layer: 16 experts, top-2 (sijunhe/nanoMoE study)
# 8 GPUs: torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_moe_16_experts_top2.py

include("train_gpt2_moe.py")

out_dir = "out-gpt2-moe-16_experts_top2"
wandb_run_name = "gpt2-moe-16_experts_top2"
n_experts = 16
moe_top_k = 2
