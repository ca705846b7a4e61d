"""Model code: single-device modules built from ModelConfig, and the Hugging Face key maps."""
