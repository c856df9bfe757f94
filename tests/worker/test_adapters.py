"""Adapters lorafleet cannot serve exactly are refused with a message naming the adapter and the reason;
the engine and the other adapters carry on."""
from __future__ import annotations

import shutil

import pytest
from engines import generate, make_engine
from peers import peft_greedy

from lorafleet.coordinator.config import EngineConfig
from lorafleet.worker.adapters import AdapterError, read_adapter
from lorafleet.worker.config import ModelConfig

REASONS = {
    "bin": "never unpickles",
    "dora": "DoRA",
    "modules_to_save": "modules_to_save",
    "embedding_target": "embed",
    "lm_head_target": "lm_head",
    "shape_mismatch": "do not match the base model",
    "nan": "NaN or Inf",
    "inf": "NaN or Inf",
    "no_weights": "adapter_model.safetensors is missing",
    "bad_config": "not valid JSON",
    "not_lora": "only LORA adapters",
}


@pytest.mark.parametrize("kind", sorted(REASONS))
def test_refused_with_its_reason(tiny_models, bad_adapters, kind):
    cfg = ModelConfig.from_dir(tiny_models["llama_gqa"])
    with pytest.raises(AdapterError) as err:
        read_adapter(f"bad-{kind}", bad_adapters[kind], cfg, max_rank=256)
    assert f"adapter 'bad-{kind}'" in str(err.value)
    assert REASONS[kind] in str(err.value)


def test_pickled_weights_are_never_loaded(tiny_models, bad_adapters, monkeypatch):
    import torch

    def no_unpickling(*a, **k):
        raise AssertionError("torch.load was called on an adapter")

    monkeypatch.setattr(torch, "load", no_unpickling)
    cfg = ModelConfig.from_dir(tiny_models["llama_gqa"])
    with pytest.raises(AdapterError):
        read_adapter("bin", bad_adapters["bin"], cfg, max_rank=256)


def test_rank_above_the_maximum(tiny_models, tiny_adapters):
    cfg = ModelConfig.from_dir(tiny_models["llama_gqa"])
    with pytest.raises(AdapterError, match=r"rank 64 is above the server's maximum of 32 \(--max-lora-rank\)"):
        read_adapter("big", tiny_adapters["r64_all"], cfg, max_rank=32)


def test_rslora_scale(tiny_models, tiny_adapters):
    cfg = ModelConfig.from_dir(tiny_models["llama_gqa"])
    lora = read_adapter("rs", tiny_adapters["r8_rslora_all"], cfg, max_rank=256)
    assert lora.scales["q_proj"] == pytest.approx(8 / 8 ** 0.5)
    plain = read_adapter("plain", tiny_adapters["r16_all"], cfg, max_rank=256)
    assert plain.scales["down_proj"] == pytest.approx(32 / 16)


def test_bad_adapters_leave_the_engine_serving(tiny_models, tiny_adapters, bad_adapters, tmp_path):
    """Every bad adapter sits beside good ones under one root: each request for a bad one fails
    with its reason, and the good requests in the same batch still equal PEFT."""
    from lorafleet.coordinator.run import run_batch

    model = tiny_models["llama_gqa"]
    root = tmp_path / "adapters"
    for name, path in list(bad_adapters.items()) + [("good", tiny_adapters["r16_all"])]:
        shutil.copytree(path, root / name)
    engine = make_engine(model, root)
    lines = [{"id": k, "adapter": k, "prompt_token_ids": [5, 6, 7], "max_new_tokens": 4} for k in REASONS]
    lines.append({"id": "good", "adapter": "good", "prompt_token_ids": [5, 6, 7], "max_new_tokens": 6, "ignore_eos": True})
    results = {r["id"]: r for r in run_batch(engine, lines, progress=False)}
    for kind, reason in REASONS.items():
        assert reason in results[kind]["error"]
    assert results["good"]["token_ids"] == peft_greedy(model, tiny_adapters["r16_all"], [5, 6, 7], 6)
    assert generate(engine, [("good", [9, 9], 3)])[0] == peft_greedy(model, tiny_adapters["r16_all"], [9, 9], 3)


def test_engine_config_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="not a Hugging Face model folder"):
        EngineConfig(str(tmp_path))
