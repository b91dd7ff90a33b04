"""Pure torch: networks, losses and samplers. Tensors in, tensors out; no files, no store."""
