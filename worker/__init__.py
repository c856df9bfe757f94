"""lorafleet worker."""
