# small shapes for tools.bench on a CPU: python -m tools.bench config/bench_cpu.py
device = "cpu"
compile = False
n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
batch_size = 8
gradient_accumulation_steps = 1
vocab_size = 512
n_experts = 8
moe_top_k = 2
bench_warmup = 2
bench_steps = 10
