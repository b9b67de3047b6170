# the flagship: a Mixture-of-Experts baby GPT on tiny shakespeare characters
# python prepare.py shakespeare_char && python train.py config/train_shakespeare_moe.py
#
# The backbone, data and schedule of train_shakespeare_llama.py (RoPE, RMSNorm, SwiGLU, no biases: exports as
# a Mixtral). Each layer's MLP becomes 8 experts, 2 per token, each expert half the dense MLP's width: the
# active compute per token equals the dense twin's while the FFN holds 4x the parameters.

include("train_shakespeare_llama.py")

out_dir = "out-shakespeare-moe"
wandb_run_name = "mini-moe"

n_experts = 8
moe_top_k = 2
expert_hidden = 512  # 2 experts x 512 = the dense SwiGLU MLP's 1024 hidden units per token
balance_loss_weight = 0.01
z_loss_weight = 0.001
