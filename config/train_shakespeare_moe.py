# the flagship: a Mixture-of-Experts baby GPT on tiny shakespeare characters
# python prepare.py shakespeare_char && python train.py config/train_shakespeare_moe.py
#
# Same backbone and schedule as train_shakespeare_char.py. Each layer's MLP becomes 8 experts, 2 per token,
# each expert half the dense MLP's width: the active compute per token equals the dense model's while the
# FFN holds 4x the parameters.

out_dir = "out-shakespeare-moe"
eval_interval = 250
eval_iters = 200
log_interval = 10
always_save_checkpoint = False

wandb_project = "shakespeare-char"
wandb_run_name = "mini-moe"

dataset = "shakespeare_char"
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2
bias = False

n_experts = 8
moe_top_k = 2
expert_hidden = 768  # 2 experts x 768 = the dense MLP's 1536 hidden units per token
balance_loss_weight = 0.01
z_loss_weight = 0.001

learning_rate = 1e-3
max_iters = 5000
lr_decay_iters = 5000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100
