"""lorafleet kernels."""
