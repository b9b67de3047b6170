"""
nanoMoE's library: what train.py, sample.py, prepare.py, the models and tools/ import. Nothing here is run
as a script. By concept:

    settings.py, configurator.py   a setting's declaration (type, range) once; config files and --key=value
    factory.py                     build_model(model_args): an MoEGPT when n_experts > 0, else a GPT
    optim.py                       which parameter gets weight decay, and the optimizer
    checkpoint.py                  checkpoint files, the run's folder and its lock
    runs.py                        a run's checkpoint for readers, whatever its format (file or sharded)
    data.py, tokenizer.py          token files and batches; the tokenizer and its meta.json
    metrics.py                     out_dir/metrics.jsonl
    errors.py, cli.py, files.py    the one-line error contract; atomic writes
    device.py                      device, dtype, autocast, peak FLOP/s
    layers/                        attention helpers and RoPE, MLA, F-gram, Mamba2, grouped experts, the
                                   generation cache
    distributed/                   processes (DDP), FSDP2, expert parallel, sharded checkpoints
    hf/                            Hugging Face formats in and out, one file per family

Imports point one way: model.py and moe_model.py import settings, errors and layers/ only; the rest of the
package may import the models (factory.py does); nothing here imports train.py or tools/.
"""
