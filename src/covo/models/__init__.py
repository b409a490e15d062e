"""Model loading (offline GGUF checkpoints, Hugging Face, tiny random, the shipped toy
reasoner), LoRA adapters and export."""
