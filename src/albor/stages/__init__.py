"""albor.stages."""
