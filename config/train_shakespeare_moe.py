# the flagship: a Mixture-of-Experts baby GPT on tiny shakespeare characters
# python prepare.py shakespeare_char && python train.py config/train_shakespeare_moe.py
#
# Same backbone and schedule as train_shakespeare_char.py. Each layer's MLP becomes 8 experts, 2 per token,
# each expert half the dense MLP's width: the active compute per token equals the dense model's while the
# FFN holds 4x the parameters.

include("train_shakespeare_char.py")

out_dir = "out-shakespeare-moe"
wandb_run_name = "mini-moe"

n_experts = 8
moe_top_k = 2
expert_hidden = 768  # 2 experts x 768 = the dense MLP's 1536 hidden units per token
balance_loss_weight = 0.01
z_loss_weight = 0.001
