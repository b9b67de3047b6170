"""Hugging Face formats in and out: formats.py picks the format; gpt2.py and llama.py (Llama, Mixtral,
Qwen2-MoE) know their layouts; common.py holds what they share."""
