# a tiny hybrid for CPUs: the MoE CPU recipe (4 layers x 128, Llama-style, 4 experts top-2) with Mamba2 in
# layers 0-2 and MLA attention in layer 3, the same 3:1 mix as config/train_shakespeare_hybrid.py; trains in
# minutes
# python train.py config/train_shakespeare_hybrid_cpu.py
# the same-shape dense and MoE models: config/train_shakespeare_llama_cpu.py, config/train_shakespeare_moe_cpu.py

include("train_shakespeare_moe_cpu.py")  # same data, backbone, experts and schedule

out_dir = "out-shakespeare-hybrid-cpu"

attn = "mla"  # positions from its d_rope rotary dims (the recipe's pos_emb = "rope")
kv_latent_dim = 64
d_rope = 16

mamba_layers = [0, 1, 2]
mamba2_num_heads = 16  # 16 heads x 16 channels = 128 * 2
mamba2_head_dim = 16
mamba2_state_size = 32
mamba2_chunk_size = 16  # block_size 64 = 4 chunks
mamba2_n_groups = 1
mamba2_conv_kernel = 4
mamba2_expand = 2
