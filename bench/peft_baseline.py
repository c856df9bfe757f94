"""The S-LoRA paper's Hugging Face PEFT baseline, once: one base model wrapped by PEFT that serves
one adapter at a time, generating batches greedily, left padded, to the batch's longest output.
bench/offline.py runs it in-process; bench/peft_server.py puts it behind the gRPC API."""
from __future__ import annotations

import time
import warnings
from collections import OrderedDict
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")


def load_base(model: str, dtype: str):
    """The base model through transformers, in eval mode, quietly."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    return AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()


class _StopWhen:
    """A generate stopping criterion: every row stops once `should_stop()` is true."""

    def __init__(self, should_stop):
        self.should_stop = should_stop

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.should_stop(), dtype=torch.bool)


class PeftAdapters:
    """The base model and the adapters loaded into it: at most `max_loaded`, least recently used out."""

    def __init__(self, base, adapters: str | Path, max_loaded: int = 1):
        self.base, self.adapters, self.max_loaded = base, Path(adapters), max_loaded
        self.model = None  # the PeftModel, once the first adapter is loaded
        self.loaded: OrderedDict[str, None] = OrderedDict()
        config = base.config
        self.vocab_size, self.max_len = config.vocab_size, config.max_position_embeddings
        self.pad_id = config.pad_token_id if config.pad_token_id is not None else 0
        eos = base.generation_config.eos_token_id
        self.eos_ids = frozenset(eos if isinstance(eos, list) else ([] if eos is None else [eos]))
        self.stats = {"adapter_loads": 0, "swap_s": 0.0, "generate_s": 0.0, "batches": 0, "requests": 0}

    def activate(self, name: str) -> None:
        """load_adapter (when not loaded) + set_adapter; deletes the least recently used beyond max_loaded."""
        from peft import PeftModel

        started = time.perf_counter()
        path = str(self.adapters / name)
        if self.model is None:
            self.model = PeftModel.from_pretrained(self.base, path, adapter_name=name).eval()
            self.stats["adapter_loads"] += 1
        elif name not in self.loaded:
            self.model.load_adapter(path, adapter_name=name)
            self.stats["adapter_loads"] += 1
        self.model.set_adapter(name)
        self.loaded[name] = None
        self.loaded.move_to_end(name)
        while len(self.loaded) > self.max_loaded:
            old = next(iter(self.loaded))
            self.model.delete_adapter(old)
            del self.loaded[old]
        self.stats["swap_s"] += time.perf_counter() - started

    def generate(self, adapter: str | None, prompts: list[list[int]], max_new: list[int], should_stop=None) -> list[list[int]]:
        """Greedy tokens of each prompt (its own max_new), generated together; eos does not stop a row."""
        if adapter is not None:
            self.activate(adapter)
        started = time.perf_counter()
        if adapter is not None or self.model is None:
            out = self._generate(self.model if adapter is not None else self.base, prompts, max_new, should_stop)
        else:
            with self.model.disable_adapter():
                out = self._generate(self.model, prompts, max_new, should_stop)
        self.stats["generate_s"] += time.perf_counter() - started
        self.stats["batches"] += 1
        self.stats["requests"] += len(prompts)
        return out

    def _generate(self, model, prompts: list[list[int]], max_new: list[int], should_stop) -> list[list[int]]:
        import torch

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        stopping = [_StopWhen(should_stop)] if should_stop is not None else None
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(max_new), do_sample=False,
                                 eos_token_id=None, pad_token_id=self.pad_id, stopping_criteria=stopping)
        return [out[row, width:width + n].tolist() for row, n in enumerate(max_new)]
