# the baby GPT with a Llama-style backbone (RoPE, RMSNorm, SwiGLU, no biases): the dense twin of the MoE recipe
# python prepare.py shakespeare_char && python train.py config/train_shakespeare_llama.py
#
# Same data, size and schedule as nanoGPT's train_shakespeare_char.py; only the backbone differs, so that it
# compares like with like against train_shakespeare_moe.py and exports as a Llama (python -m tools.export).

include("train_shakespeare_char.py")

out_dir = "out-shakespeare-llama"
wandb_run_name = "mini-llama"

pos_emb = "rope"
norm = "rmsnorm"
mlp = "swiglu"  # hidden 64 * ceil(8 * 384 / 3 / 64) = 1024: the parameters of GELU's 4x
bias = False
