"""The benchmarks' adapters: one recipe, made once and cached, in PEFT's format.

Adapter i has rank `ranks[i % len(ranks)]` on `targets`. The first `peft_made` are made by
peft itself (`init_lora_weights=False`, B redrawn with std `b_std` so outputs stay sane); the
others hold seeded random tensors under the same names and shapes, beside a copy of the
same-rank adapter_config.json, which makes thousands of adapters in seconds.
"""
from __future__ import annotations

import functools
import hashlib
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

TARGET_SETS = {
    "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}


@dataclass(frozen=True)
class AdapterSet:
    model: str
    targets: tuple[str, ...] = TARGET_SETS["attn"]
    ranks: tuple[int, ...] = (8, 16)
    seed: int = 0
    b_std: float = 0.02
    peft_made: int = 4

    @staticmethod
    def name(i: int) -> str:
        return f"adapter-{i:04d}"

    def rank(self, i: int) -> int:
        return self.ranks[i % len(self.ranks)]

    def folder(self, workdir: str | Path) -> Path:
        """The cache folder, keyed by the model's config and the recipe."""
        recipe = f"{self.targets}|{self.ranks}|{self.b_std}|{self.peft_made}|{self.seed}".encode()
        key = hashlib.sha256((Path(self.model) / "config.json").read_bytes() + recipe).hexdigest()[:10]
        return Path(workdir) / f"adapters-{Path(self.model).name}-{key}"

    def make(self, workdir: str | Path, count: int) -> Path:
        """Adapters 0 .. count-1 (those missing from the cache folder); returns the folder."""
        root = self.folder(workdir)
        missing = [i for i in range(count) if not (root / self.name(i) / "adapter_model.safetensors").is_file()]
        if not missing:
            return root
        root.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        print(f"making {len(missing)} adapters in {root}", file=sys.stderr, flush=True)
        made = lambda i: (root / self.name(i) / "adapter_model.safetensors").is_file()  # noqa: E731
        # the peft-made ones, which include one template per rank for the random copies
        by_peft = [i for i in range(min(self.peft_made, max(count, len(self.ranks)))) if not made(i)]
        if by_peft:
            self._make_with_peft(root, by_peft)
        templates = {self.rank(i): root / self.name(i) for i in range(min(self.peft_made, len(self.ranks)))}
        for i in missing:
            if i >= self.peft_made:
                write_random_adapter(root / self.name(i), templates[self.rank(i)], self.seed * 1_000_003 + i, self.b_std)
        print(f"made {len(missing)} adapters in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
        return root

    def _make_with_peft(self, root: Path, indices: list[int]) -> None:
        import torch
        from peft import LoraConfig, get_peft_model

        from peft_baseline import load_base

        base = load_base(self.model, "float32")
        for i in indices:
            torch.manual_seed(self.seed * 1_000_003 + i)
            r = self.rank(i)
            lora = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(self.targets), lora_dropout=0.0,
                              init_lora_weights=False, task_type="CAUSAL_LM")
            model = get_peft_model(base, lora)
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if ".lora_B." in name:
                        param.normal_(0.0, self.b_std)
            save_atomically(root / self.name(i), model.save_pretrained)
            base = model.unload()


@functools.lru_cache(maxsize=None)
def tensor_specs(template: Path) -> tuple[tuple[str, tuple[int, ...], object], ...]:
    """(name, shape, dtype) of each tensor of a PEFT adapter's safetensors file."""
    from safetensors import safe_open

    with safe_open(template / "adapter_model.safetensors", framework="pt") as f:
        return tuple((key, tuple(f.get_slice(key).get_shape()), f.get_tensor(key).dtype) for key in f.keys())


def write_random_adapter(folder: Path, template: Path, seed: int, b_std: float) -> None:
    """Same tensor names, shapes and dtypes as `template`: A uniform as peft's kaiming init, B ~ N(0, b_std)."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, shape, dtype in tensor_specs(template):
        tensor = torch.empty(shape, dtype=dtype)
        if ".lora_A." in key:
            bound = 1.0 / math.sqrt(shape[1])
            tensors[key] = tensor.uniform_(-bound, bound, generator=generator)
        else:
            tensors[key] = tensor.normal_(0.0, b_std, generator=generator)

    def save(tmp: Path) -> None:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        shutil.copyfile(template / "adapter_config.json", tmp / "adapter_config.json")

    save_atomically(folder, save)


def save_atomically(folder: Path, save) -> None:
    """save(tmp) into a temporary folder beside `folder`, then renamed: no half-written adapter survives."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
