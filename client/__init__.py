"""lorafleet client."""
