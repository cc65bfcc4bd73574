"""Convert Hugging Face checkpoints to MLX."""
