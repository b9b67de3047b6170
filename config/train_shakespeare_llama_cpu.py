# the CPU recipe with a Llama-style backbone (RoPE, RMSNorm, SwiGLU, no biases): the dense twin of the MoE CPU
# recipe, for comparisons of like with like; trains in minutes on a laptop CPU
# python train.py config/train_shakespeare_llama_cpu.py

include("train_shakespeare_char_cpu.py")  # same data, size and schedule

out_dir = "out-shakespeare-llama-cpu"

pos_emb = "rope"
norm = "rmsnorm"
mlp = "swiglu"  # hidden 64 * ceil(8 * 128 / 3 / 64) = 384
bias = False
