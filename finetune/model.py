"""The base model, its tokenizer and the PEFT LoRA model trained on it."""
from __future__ import annotations

import warnings
from pathlib import Path

# Short names on the command line -> the Llama family's module names.
TARGETS = {
    "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
    "gate": "gate_proj", "up": "up_proj", "down": "down_proj",
}
ALL_TARGETS = tuple(TARGETS.values())
DTYPES = ("float32", "bfloat16", "float16")


def parse_targets(text: str) -> tuple[str, ...]:
    """'q,k,v' or 'q_proj,v_proj' or 'all' -> module names, in the Llama order, without repeats."""
    names = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part == "all":
            names.extend(ALL_TARGETS)
            continue
        name = TARGETS.get(part, part)
        if name not in ALL_TARGETS:
            raise ValueError(f"unknown target {part!r}; choose from {', '.join(TARGETS)} (or their *_proj names, or all)")
        names.append(name)
    if not names:
        raise ValueError("no target given; e.g. --targets q,k,v,o,gate,up,down")
    return tuple(t for t in ALL_TARGETS if t in names)


def check_model_dir(model_dir: str | Path) -> Path:
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
    if not (model_dir / "tokenizer.json").is_file() and not (model_dir / "tokenizer_config.json").is_file():
        raise ValueError(f"{model_dir} has no tokenizer (tokenizer.json); training data is text, it needs one")
    return model_dir


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def load_base(model_dir: str | Path, dtype: str = "float32", device: str = "cpu"):
    """The causal LM in eval mode with every base weight frozen."""
    import torch
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype))
    model.to(device)
    model.requires_grad_(False)
    model.eval()
    return model


def target_linears(model, targets) -> dict[str, object]:
    """Qualified name -> nn.Linear for every targeted projection of the decoder layers."""
    import torch

    found = {name: module for name, module in model.named_modules()
             if name.rsplit(".", 1)[-1] in targets and isinstance(module, torch.nn.Linear) and ".layers." in f".{name}"}
    missing = [t for t in targets if not any(name.endswith("." + t) for name in found)]
    if missing:
        raise ValueError(f"the model has no {', '.join(missing)} projection; is it a Llama-family model?")
    return found


def lora_config(rank: int, alpha: float, targets, use_rslora: bool):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none",
                      task_type="CAUSAL_LM", use_rslora=use_rslora)


def lora_scale(rank: int, alpha: float, use_rslora: bool) -> float:
    return alpha / (rank ** 0.5 if use_rslora else rank)


def peft_lora_model(base, rank: int, alpha: float, targets, use_rslora: bool, seed: int):
    """PEFT's LoRA model on ``base`` (A random from ``seed``, B zero); only the LoRA factors train."""
    import torch
    from peft import get_peft_model

    target_linears(base, targets)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        # peft calls a transformers API that transformers 5 deprecated; not ours to fix.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(base, lora_config(rank, alpha, targets, use_rslora))
