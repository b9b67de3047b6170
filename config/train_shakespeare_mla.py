# the GPU character recipe with multi-head latent attention (MLA, DeepSeek-V2) instead of multi-head attention
# python prepare.py shakespeare_char && python train.py config/train_shakespeare_mla.py
#
# Keys and values come from one 128-wide latent per token (twice the head size of 64), plus a 32-dim rotary
# key shared by all heads: the KV cache keeps 160 numbers per token and layer instead of MHA's 2 x 384 = 768.
# Positions come only from the rotary part, as in DeepSeek-V2 (no learned position table).

include("train_shakespeare_char.py")

out_dir = "out-shakespeare-mla"
wandb_run_name = "mini-gpt-mla"

attn = "mla"
kv_latent_dim = 128
q_latent_dim = 0  # the queries are not cached: compressing them saves only training memory
d_rope = 32
pos_emb = "rope"
