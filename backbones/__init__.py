"""Adapters around library backbones (transformers MLLMs, diffusers generators)."""
