"""Fixtures of the finetune tests: one tiny random Llama (GQA) and a small synthetic task."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

# 16 prompts, each mapped to a fixed completion: learnable by memorisation, impossible before.
WORDS = ("apple", "river", "stone", "cloud", "tiger", "piano", "ocean", "maple",
         "candle", "rocket", "violet", "desert", "lemon", "falcon", "copper", "meadow")
TASK = [(f"item {i}:", f" {w}") for i, w in enumerate(WORDS)]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(autouse=True)
def _one_thread():
    """The test machines have 2 cores shared with servers and other tests."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def ft_model(tmp_path_factory) -> Path:
    import peers

    return peers.make_tiny_model(tmp_path_factory.mktemp("ft_model") / "llama", num_heads=4, num_kv_heads=2, seed=11)


@pytest.fixture(scope="session")
def task_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("ft_data") / "train.jsonl",
                       [{"prompt": p, "completion": c} for p, c in TASK])
