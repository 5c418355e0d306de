"""Inference: KV-cache generation and completion on albor models (no training code)."""
