# tools.bench at the shapes of the MoE-on-the-clock targets (docs/clock.md), on a CPU in float32 with one
# thread: 2 layers x 512, 8 experts at equal active compute, 8 x 128 tokens per micro-step
#   OMP_NUM_THREADS=1 python -m tools.bench config/bench_cpu_equal_active.py --moe_top_k=1

include("bench_cpu.py")  # CPU, block 128, batch 8, vocab 512, 8 experts, top-2, 2 warm-up + 10 timed steps

dtype = "float32"
n_layer = 2
n_head = 8
n_embd = 512
bench_equal_active = True
bench_checkpoint = False
