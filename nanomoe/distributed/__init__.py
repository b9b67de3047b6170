"""Training on several processes with PyTorch's own engine: parallel.py (processes, DDP, FSDP2),
expert_parallel.py (experts split over processes), checkpoint.py (sharded checkpoints)."""
