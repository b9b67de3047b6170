# GPT-2 (124M) on a large GPT-2-tokenized corpus; ~0.5M tokens per step
# prepare: python prepare.py text --input /path/to/corpus --name openwebtext --tokenizer gpt2
# 8 GPUs: torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py

out_dir = "out-gpt2"
wandb_project = "owt"
wandb_run_name = "gpt2-124M"

dataset = "openwebtext"
# 12 batch size * 1024 block size * 5 gradaccum * 8 GPUs = 491,520 tokens per step
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8

n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = False

# this makes total number of tokens be 300B
max_iters = 600000
lr_decay_iters = 600000
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 2000

eval_interval = 1000
eval_iters = 200
log_interval = 10
weight_decay = 1e-1
