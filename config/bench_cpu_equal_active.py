# tools.bench at the shapes of the MoE-on-the-clock targets (docs/clock.md), on a CPU in float32 with one
# thread: 2 layers x 512, 8 experts at equal active compute, 8 x 128 tokens per micro-step
#   OMP_NUM_THREADS=1 python -m tools.bench config/bench_cpu_equal_active.py --moe_top_k=1
device = "cpu"
dtype = "float32"
compile = False
n_layer = 2
n_head = 8
n_embd = 512
block_size = 128
batch_size = 8
gradient_accumulation_steps = 1
vocab_size = 512
n_experts = 8
moe_top_k = 2
bench_equal_active = True
bench_warmup = 2
bench_steps = 10
bench_checkpoint = False
