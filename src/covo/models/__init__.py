"""Model loading (offline GGUF checkpoints, Hugging Face, tiny random), LoRA adapters and export."""
