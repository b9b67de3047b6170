"""
Making a model from settings, in one place: build_model for a training config or a checkpoint's model_args,
model_keys for every model setting (config keys of train.py and tools/), and check_same_model for a run whose
weights come from elsewhere (a checkpoint, a Hugging Face folder).
"""
from model import GPT, GPTConfig
from moe_model import MoEConfig, MoEGPT
from nanomoe.errors import UserError
from nanomoe.settings import dataclass_keys


def build_model(model_args):
    """An MoEGPT when n_experts > 0, else a dense GPT. Keys that are not model settings are ignored."""
    if model_args.get("n_experts", 0) > 0:
        return MoEGPT(MoEConfig.from_dict(model_args))
    return GPT(GPTConfig.from_dict(model_args))


def model_keys(skip=()):
    """{name: Key} of every model setting, dense and MoE (MoEConfig's fields include GPTConfig's)."""
    return dataclass_keys(MoEConfig, skip)


def check_same_model(saved_args, wanted, explicit, source, crop=False):
    """The model comes from saved weights (a checkpoint, a Hugging Face folder): a model setting the run gives
    explicitly (in `explicit`) that differs from the saved one does not fit them, unless it is a runtime
    setting. Settings the saved model does not have (MoE settings of a dense GPT-2) are not compared. With
    crop, block_size may be smaller (the caller crops); it is never larger."""
    keys = model_keys()
    if "block_size" in explicit and wanted["block_size"] > saved_args["block_size"]:
        raise UserError(f"block_size={wanted['block_size']} is larger than the {source}'s "
                        f"{saved_args['block_size']} (use --block_size={saved_args['block_size']} or less)")
    differ = [f"{k}: config {wanted[k]!r} vs {source} {saved_args[k]!r}" for k in keys
              if k in explicit and k in saved_args and not keys[k].runtime and wanted[k] != saved_args[k]
              and not (crop and k == "block_size")]
    if differ:
        raise UserError(f"the {source} has another model shape ({'; '.join(differ)}); remove those settings "
                        f"to use the {source}'s")
