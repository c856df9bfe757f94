"""Fixtures of the finetune tests: one tiny random Llama (GQA) and a small synthetic task."""
from __future__ import annotations

from pathlib import Path

import pytest
from ft_task import TASK, write_jsonl


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
