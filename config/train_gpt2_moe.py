# GPT-2 (124M size, Llama-style backbone) with MoE layers: 8 experts, top-2
# In the style of the sijunhe/nanoMoE study: MoE replaces the MLP of every other layer (moe_every = 2),
# balance loss 0.01, router z-loss 0.001; dropless (capacity_factor = 0), so it exports as a Qwen2-MoE.
# prepare: python prepare.py text --input /path/to/corpus --name openwebtext --tokenizer gpt2
# 8 GPUs: torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_moe.py

include("train_gpt2_llama.py")  # the dense twin: data, backbone, schedule; below only what MoE changes

out_dir = "out-gpt2-moe"
wandb_run_name = "gpt2-moe"

n_experts = 8
moe_top_k = 2
moe_every = 2
balance_loss_weight = 0.01
z_loss_weight = 0.001
