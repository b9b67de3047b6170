# a tiny MoE for CPUs: 4 experts, 2 per token, on the Llama-style backbone of train_shakespeare_llama_cpu.py
# (exports as a Mixtral); trains in minutes
# python train.py config/train_shakespeare_moe_cpu.py
# the same-backbone dense model: python train.py config/train_shakespeare_llama_cpu.py

include("train_shakespeare_llama_cpu.py")

out_dir = "out-shakespeare-moe-cpu"
n_experts = 4
moe_top_k = 2  # each expert as wide as the dense MLP: twice its FFN work per token
balance_loss_weight = 0.01
z_loss_weight = 0.001
