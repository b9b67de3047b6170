# a tiny MoE for CPUs (~2.4M parameters, ~1.3M active): 4 experts, 2 per token, trains in minutes
# python train.py config/train_shakespeare_moe_cpu.py
# the same-shape dense model: python train.py config/train_shakespeare_char_cpu.py

include("train_shakespeare_char_cpu.py")  # same data, backbone and schedule as the dense CPU recipe

out_dir = "out-shakespeare-moe-cpu"
n_experts = 4
moe_top_k = 2
balance_loss_weight = 0.01
z_loss_weight = 0.001
