"""lorafleet coordinator."""
