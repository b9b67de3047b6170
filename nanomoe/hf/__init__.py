"""Hugging Face formats in and out: formats.py picks the format; gpt2.py, llama.py (Llama, Mixtral, Qwen2-MoE),
qwen3.py (Qwen3, Qwen3-MoE) and deepseek.py (DeepSeek-V3, V2) know their layouts; common.py holds what they
share."""
