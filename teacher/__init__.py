"""NatureLM-audio in PyTorch: BEATs encoder, windowed Q-Former, LLM with LoRA, Lightning training."""
