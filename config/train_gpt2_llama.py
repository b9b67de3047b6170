# GPT-2 (124M) size with a Llama-style backbone (RoPE, RMSNorm, SwiGLU, no biases): the dense twin of the
# GPT-2-size MoE recipes
# 8 GPUs: torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_llama.py

include("train_gpt2.py")  # data, size and schedule

out_dir = "out-gpt2-llama"
wandb_run_name = "gpt2-llama-124M"

pos_emb = "rope"
norm = "rmsnorm"
mlp = "swiglu"
bias = False
