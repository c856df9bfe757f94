"""Reads a Hugging Face safetensors checkpoint, each rank only its own slices."""
from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open


class CheckpointError(ValueError):
    """The checkpoint is missing a tensor or has the wrong shape; the message names it."""


@dataclass(frozen=True)
class Shard:
    """This rank's place in the tensor-parallel group."""

    rank: int = 0
    size: int = 1

    def bounds(self, length: int) -> tuple[int, int]:
        """This rank's [lo, hi) of `length` rows: equal parts, the last one shorter if it must be."""
        part = -(-length // self.size)
        return min(length, self.rank * part), min(length, (self.rank + 1) * part)


class Checkpoint:
    """Tensors of a model folder: one `model.safetensors` or shards with an index."""

    def __init__(self, model_dir: str | Path, dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.dir = Path(model_dir)
        self.dtype, self.device = dtype, torch.device(device)
        self._files = ExitStack()
        self._where = self._index()
        self._handles: dict[str, object] = {}

    def _index(self) -> dict[str, str]:
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            return dict(json.loads(index.read_text())["weight_map"])
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            if list(self.dir.glob("*.bin")) or list(self.dir.glob("*.pt")):
                raise CheckpointError(f"{self.dir}: only pickled weights (.bin/.pt); lorafleet reads safetensors only")
            raise CheckpointError(f"{self.dir}: no *.safetensors files")
        where = {}
        for f in files:
            with safe_open(f, framework="pt") as h:
                for name in h.keys():
                    where[name] = f.name
        return where

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def _handle(self, name: str):
        if name not in self._where:
            raise CheckpointError(f"{self.dir}: tensor {name!r} is missing")
        fname = self._where[name]
        if fname not in self._handles:
            self._handles[fname] = self._files.enter_context(safe_open(self.dir / fname, framework="pt"))
        return self._handles[fname]

    def get(self, name: str, shape: tuple[int, ...] | None = None, shard: Shard | None = None, dim: int = 0) -> torch.Tensor:
        """The tensor `name`, or only this rank's part of it along `dim`; checks the full shape."""
        sl = self._handle(name).get_slice(name)
        full = tuple(sl.get_shape())
        if shape is not None and full != tuple(shape):
            raise CheckpointError(f"{self.dir}: {name} has shape {full}, config implies {tuple(shape)}")
        if shard is None or shard.size == 1:
            t = sl[:]
        else:
            lo, hi = shard.bounds(full[dim])
            t = sl[:, lo:hi] if dim == 1 else sl[lo:hi]
        return t.to(device=self.device, dtype=self.dtype).contiguous()

    def close(self) -> None:
        self._files.close()
