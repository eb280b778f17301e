"""Generator (DiT + VAE + scheduler) adapters, one file per family."""
