"""MLLM adapters, one file per family."""
