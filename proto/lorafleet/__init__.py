"""lorafleet: one base LLM, thousands of LoRA adapters, tensor-parallel workers."""
