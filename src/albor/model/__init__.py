"""The albor decoder: config, named presets, the model, size/cost estimates and the HF adapter."""
