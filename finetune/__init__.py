"""Fine-tuning LoRA adapters for lorafleet: `lorafleet finetune` (LoRA and sparse LoRA).

    data.py    JSONL lines -> token ids and labels (loss on the completion / assistant turns only)
    model.py   the base model, tokenizer and PEFT LoRA model
    loop.py    the one training loop (the demo adapters use it too) and the eval (loss, exact-match)
    sparse.py  sparse LoRA (SLoRA): a sparse stage, then LoRA initialised from its truncated SVD
    run.py     the whole command as a function: `finetune(FinetuneConfig(...))`
    cli.py     its command-line arguments

Importing this package is cheap: torch, transformers and peft are imported when training starts
(they come with `pip install lorafleet[train]`).
"""
from .data import DataError
from .run import FinetuneConfig, FinetuneError, FinetuneResult, finetune, require_train_packages

__all__ = ["DataError", "FinetuneConfig", "FinetuneError", "FinetuneResult", "finetune", "require_train_packages"]
