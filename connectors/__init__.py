"""Connector designs (one file each) mapping MLLM hidden states to DiT text states."""
