# the MoE character recipe (8 experts, top-2) with MLA attention: both changes together
# python prepare.py shakespeare_char && python train.py config/train_shakespeare_moe_mla.py

include("train_shakespeare_moe.py")
include("train_shakespeare_mla.py")  # re-reads the shared base recipe, then sets MLA; the MoE keys stay

out_dir = "out-shakespeare-moe-mla"
wandb_run_name = "mini-moe-mla"
