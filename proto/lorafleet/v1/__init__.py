"""Generated gRPC stubs of the public API (lorafleet.v1)."""
