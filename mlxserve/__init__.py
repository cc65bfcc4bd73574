"""mlxserve: run, serve and fine-tune LLMs on Apple Silicon with MLX."""
__version__ = "0.1.0"
