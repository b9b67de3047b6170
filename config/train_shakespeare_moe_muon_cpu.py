# the study's CPU MoE (top-2 of 8 experts of half the dense MLP's hidden size, aux balancing) on the Llama-style
# backbone of train_shakespeare_llama_cpu.py, trained with Muon: every expert orthogonalised as its own matrix
# (docs/muon.md); muon_lr from the sweep there. Trains in minutes on a CPU:
# python train.py config/train_shakespeare_moe_muon_cpu.py
# the same model with AdamW: add --optimizer=adamw

include("train_shakespeare_llama_cpu.py")

out_dir = "out-shakespeare-moe-muon-cpu"
n_experts = 8
moe_top_k = 2
expert_hidden = 192  # F/2 with F = 384, the dense SwiGLU's hidden: the study's top2x8-aux (equal active compute)
balance_mode = "aux"
balance_loss_weight = 0.01  # (the defaults, as in the study)
z_loss_weight = 0.001

optimizer = "muon"
muon_lr = 0.005  # the best of the 500-step sweep in docs/muon.md (learning_rate stays AdamW's 1e-3)
