# GPT-2 (124M backbone) with MoE layers: 4 experts, top-1 Switch routing
# In the style of the sijunhe/nanoMoE study: MoE replaces the MLP of every other layer (moe_every = 2),
# balance loss 0.01, router z-loss 0.001, capacity factor 1.25 (tokens past capacity are dropped).
# prepare: python prepare.py text --input /path/to/corpus --name openwebtext --tokenizer gpt2
# 8 GPUs: torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_moe_4_experts.py

out_dir = "out-gpt2-moe_4_experts"
wandb_project = "owt"
wandb_run_name = "gpt2-moe_4_experts"

dataset = "openwebtext"
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8

n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = False

n_experts = 4
moe_top_k = 1
# top-1 keeps the raw router probability as the gate (Switch): renormalised, it would always be 1.0 and
# the router would get no gradient from the cross-entropy
moe_renorm = False
moe_every = 2
capacity_factor = 1.25
balance_loss_weight = 0.01
z_loss_weight = 0.001

max_iters = 600000
lr_decay_iters = 600000
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 2000

eval_interval = 1000
eval_iters = 200
log_interval = 10
weight_decay = 1e-1
