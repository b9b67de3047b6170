# a hybrid baby model on tiny shakespeare characters: Mamba2 layers, MLA attention and MoE feed-forwards
# python prepare.py shakespeare_char && python train.py config/train_shakespeare_hybrid.py
#
# Sized like the Rust trainer guide's hybrid example: 8 layers, six of them Mamba2 (SSD) and two (3 and 7)
# MLA attention; every layer's FFN is the MoE recipe's 8 experts, top-2. The Mamba2 layers' inner width is
# n_embd * expand = 384 * 2 = 768 = 48 heads x 16 channels, each channel with a state of 64 numbers.

include("train_shakespeare_moe_mla.py")  # the character recipe + 8 experts top-2 + MLA with RoPE

out_dir = "out-shakespeare-hybrid"
wandb_run_name = "mini-hybrid"

n_layer = 8
mamba_layers = [0, 1, 2, 4, 5, 6]
mamba2_num_heads = 48
mamba2_head_dim = 16
mamba2_state_size = 64
mamba2_chunk_size = 64  # block_size 256 = 4 chunks
mamba2_n_groups = 1
mamba2_conv_kernel = 4
mamba2_expand = 2
