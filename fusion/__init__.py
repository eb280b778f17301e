"""unifuse.fusion: the fused model, data, flow matching, training stages, generation."""
