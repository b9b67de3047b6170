"""The optional layers of the models, each in its own module (model.py and moe_model.py import them)."""
