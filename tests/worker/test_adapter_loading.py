"""Loading adapters: cheap reading and packing (the same bytes and refusals as before), and the
worker's adapter store, which reads only when the coordinator asks and never inside a step."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from engines import AdapterReads, add, generate, make_engine
from peers import peft_greedy
from safetensors.torch import load_file, save_file

from lorafleet.coordinator.adapters import AdapterState
from lorafleet.coordinator.sequence import Request
from lorafleet.worker import adapters
from lorafleet.worker.adapters import AdapterError, read_adapter
from lorafleet.worker.config import ModelConfig
from lorafleet.worker.loader import Shard
from lorafleet.worker.lora import pack_adapter, plan_layout
from lorafleet.worker.step import Step

WAIT = 60.0  # seconds: the bound of every wait below


def _pack_from(fill: float, monkeypatch, *args) -> torch.Tensor:
    """pack_adapter with its torch.empty memory filled with `fill` first."""
    empty = torch.empty

    def filled(*a, **kw):
        return empty(*a, **kw).fill_(fill)

    with monkeypatch.context() as m:
        m.setattr(torch, "empty", filled)
        return pack_adapter(*args)


@pytest.fixture(scope="module")
def one_layer_adapter(tiny_models, adapter_factory):
    """q and v in layer 1 only: layer 0 has no weights for the targets the layout holds."""
    return adapter_factory(tiny_models["llama_gqa"], r=3, lora_alpha=6, target_modules=["q_proj", "v_proj"],
                           layers_to_transform=[1], seed=41)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shard", [Shard(), Shard(0, 2), Shard(1, 2)], ids=["tp1", "tp2-rank0", "tp2-rank1"])
def test_packing_writes_every_element(tiny_models, tiny_adapters, one_layer_adapter, shard, dtype, monkeypatch):
    """Packing into uninitialised memory gives exactly what packing into zeros gives: whatever the
    layout, every element (rank padding, targets a layer lacks, the tail) is written. The values
    themselves are checked against PEFT by the engine tests."""
    cfg = ModelConfig.from_dir(tiny_models["llama_gqa"])
    page_dim = 2 * cfg.kv_size // shard.size
    folders = {name: tiny_adapters[name] for name in ("r1_v", "r3_attn", "r8_mlp", "r4_o_down", "r16_all", "r8_rslora_all")}
    folders["one_layer"] = one_layer_adapter
    for name, folder in folders.items():
        lora = read_adapter(name, folder, cfg, max_rank=256)
        layout = plan_layout(lora.ranks, lora.scales, cfg, shard, page_dim)
        args = (lora, layout, cfg, shard, page_dim, dtype)
        zeroed, poisoned = _pack_from(0.0, monkeypatch, *args), _pack_from(float("nan"), monkeypatch, *args)
        assert zeroed.dtype == dtype and zeroed.shape == (cfg.num_layers, layout.num_pages, page_dim)
        assert torch.equal(zeroed, poisoned), name
        assert torch.equal(pack_adapter(*args), zeroed), name
        has_weights = {layer for layer, _ in lora.weights}
        assert [bool((zeroed[layer] != 0).any()) for layer in range(cfg.num_layers)] == \
            [layer in has_weights for layer in range(cfg.num_layers)], name


def test_read_equals_safetensors(tiny_models, tiny_adapters):
    """The one-buffer reader gives exactly the tensors the safetensors library gives."""
    cfg = ModelConfig.from_dir(tiny_models["llama_gqa"])
    tensors = load_file(tiny_adapters["r16_all"] / "adapter_model.safetensors")
    lora = read_adapter("r16", tiny_adapters["r16_all"], cfg, max_rank=256)
    assert len(lora.weights) == len(tensors) // 2
    for (layer, target), (a, b) in lora.weights.items():
        block = "mlp" if target in ("gate_proj", "up_proj", "down_proj") else "self_attn"
        prefix = f"base_model.model.model.layers.{layer}.{block}.{target}"
        assert torch.equal(a, tensors[f"{prefix}.lora_A.weight"]) and torch.equal(b, tensors[f"{prefix}.lora_B.weight"])


def _rewrite(src: Path, dst: Path, change) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(dst / "adapter_model.safetensors")
    change(tensors)
    save_file(tensors, dst / "adapter_model.safetensors")
    return dst


def test_non_finite_weight_is_named(tiny_models, tiny_adapters, tmp_path):
    cfg = ModelConfig.from_dir(tiny_models["llama_gqa"])
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"

    def poison(tensors):
        tensors[key][3, 1] = float("-inf")

    bad = _rewrite(tiny_adapters["r3_attn"], tmp_path / "inf", poison)
    with pytest.raises(AdapterError, match=r"adapter 'inf': layer 1 v_proj: weights contain NaN or Inf"):
        read_adapter("inf", bad, cfg, max_rank=256)


def test_huge_finite_weights_are_accepted(tiny_models, tiny_adapters, tmp_path):
    """Values whose sum overflows float32 are finite: the fast check falls back to the exact one."""
    cfg = ModelConfig.from_dir(tiny_models["llama_gqa"])

    def huge(tensors):
        for t in tensors.values():
            t.fill_(3e38)

    folder = _rewrite(tiny_adapters["r2_q"], tmp_path / "huge", huge)
    lora = read_adapter("huge", folder, cfg, max_rank=256)
    assert all(float(a[0, 0]) == pytest.approx(3e38) for a, _ in lora.weights.values())


@pytest.mark.parametrize("damage", ["truncated", "header_length", "offsets"])
def test_damaged_safetensors_is_refused(tiny_models, tiny_adapters, tmp_path, damage):
    cfg = ModelConfig.from_dir(tiny_models["llama_gqa"])
    folder = tmp_path / damage
    shutil.copytree(tiny_adapters["r2_q"], folder)
    st = folder / "adapter_model.safetensors"
    raw = bytearray(st.read_bytes())
    if damage == "truncated":
        raw = raw[:len(raw) - 16]
    elif damage == "header_length":
        raw[:8] = (2**40).to_bytes(8, "little")
    else:
        n = int.from_bytes(raw[:8], "little")
        raw[8:8 + n] = raw[8:8 + n].replace(b'"data_offsets":[0,', b'"data_offsets":[9,', 1)
    st.write_bytes(bytes(raw))
    with pytest.raises(AdapterError, match=r"adapter 'x': adapter_model.safetensors cannot be read"):
        read_adapter("x", folder, cfg, max_rank=256)


# ------------------------------------------------------------- the adapter store


def test_config_rank_must_match_the_tensors(tiny_models, tiny_adapters, tmp_path):
    """PEFT builds layers of the config's r and refuses tensors of another rank: so does lorafleet."""
    import json

    cfg = ModelConfig.from_dir(tiny_models["llama_gqa"])
    folder = tmp_path / "liar"
    shutil.copytree(tiny_adapters["r8_k"], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "r": 4}))
    with pytest.raises(AdapterError, match="says r=4 for k_proj but its tensors in layer 0 have rank 8"):
        read_adapter("liar", folder, cfg, 64)
    (folder / "adapter_config.json").write_text("[1, 2, 3]")
    with pytest.raises(AdapterError, match="not a JSON object"):
        read_adapter("liar", folder, cfg, 64)


def test_the_store_reads_only_when_told_and_steps_never_read(tiny_models, same_size_adapters, monkeypatch):
    """The worker reads an adapter when the coordinator asks (read_adapter), places its host copy when
    a Step says so, drops it when a Step says so, and refuses to place one it was never told to read."""
    engine = make_engine(tiny_models["llama_gqa"], same_size_adapters)
    worker = engine.executor.worker
    reads = AdapterReads(monkeypatch, WAIT)
    info = worker.read_adapter("s0", str(same_size_adapters / "s0"))
    assert reads.count("s0") == 1 and worker.host_adapters() == ["s0"]
    pages = list(range(info.num_pages))
    worker.execute(Step(load_adapters={"s0": pages}))
    assert torch.equal(worker.pool.pages[:, pages], worker.adapters.get("s0").packed)
    assert reads.count("s0") == 1  # placing reads nothing
    worker.execute(Step(evicted_adapters=["s0"], dropped_adapters=["s0"]))
    assert worker.host_adapters() == [] and "s0" not in worker.tables.adapter_pages
    with pytest.raises(RuntimeError, match="not in this rank's host memory"):
        worker.execute(Step(load_adapters={"s0": pages}))
    assert reads.count("s0") == 1
    engine.shutdown()


def test_a_rewritten_adapter_gets_a_new_version(tiny_models, same_size_adapters, tmp_path):
    engine = make_engine(tiny_models["llama_gqa"], same_size_adapters)
    folder = tmp_path / "v"
    shutil.copytree(same_size_adapters / "s0", folder)
    first = engine.executor.worker.read_adapter("v", str(folder))
    shutil.rmtree(folder)
    shutil.copytree(same_size_adapters / "s1", folder)
    second = engine.executor.worker.read_adapter("v", str(folder))
    assert first.version and second.version and first.version != second.version
    shutil.rmtree(folder)
    shutil.copytree(same_size_adapters / "s0", folder)  # the first weights again, as new files
    assert engine.executor.worker.read_adapter("v", str(folder)).version == first.version
    engine.shutdown()


def test_host_memory_is_least_recently_used_out(tiny_models, same_size_adapters):
    """Host memory for two adapters: reading a third drops the least recently used idle one (and its
    pool pages); one that a queued request uses is never dropped; the tokens stay PEFT's."""
    model = tiny_models["llama_gqa"]
    probe = make_engine(model, same_size_adapters)
    size = probe.ensure_adapter("s0").info.host_bytes
    probe.shutdown()
    engine = make_engine(model, same_size_adapters, host_cache_bytes=2 * size + size // 2)
    for name in ("s0", "s1"):
        engine.ensure_adapter(name)
    seq = add(engine, Request("a", [5, 6, 7], 3, "s0", ignore_eos=True))  # s0 is in use, and recently used
    engine.step()
    engine.ensure_adapter("s2")
    states = {n: e.state for n, e in engine.adapters.entries.items()}
    assert states == {"s0": AdapterState.HOST_READY, "s1": AdapterState.DISK, "s2": AdapterState.HOST_READY}
    while engine.has_work():
        engine.step()
    assert sorted(engine.executor.worker.host_adapters()) == ["s0", "s2"]
    assert seq.output_ids == peft_greedy(model, same_size_adapters / "s0", [5, 6, 7], 3)
    assert generate(engine, [("s1", [5, 6, 7], 3)]) == [peft_greedy(model, same_size_adapters / "s1", [5, 6, 7], 3)]
    assert engine.adapters.host_bytes <= 2 * size + size // 2
    engine.shutdown()


def test_files_of_one_layout_share_its_checks_not_their_values(tiny_models, tiny_adapters, tmp_path):
    """What a header and a config say is checked once (`_LAYOUTS`); each file's values, size and
    config are still its own: its weights and version, a NaN in it, a config that disagrees, a cut."""
    cfg = ModelConfig.from_dir(tiny_models["llama_gqa"])
    adapters._LAYOUTS.clear()

    def scaled(factor):
        def change(tensors):
            for t in tensors.values():
                t.mul_(factor)
        return change

    folders = [_rewrite(tiny_adapters["r3_attn"], tmp_path / f"x{i}", scaled(-2.0 * (i + 1))) for i in range(3)]
    loras = [read_adapter(f"x{i}", folder, cfg, max_rank=256) for i, folder in enumerate(folders)]
    assert len(adapters._LAYOUTS) == 1, "three files with one header and config were checked as three layouts"
    assert len({lora.version for lora in loras}) == 3
    for folder, lora in zip(folders, loras):
        tensors = load_file(folder / "adapter_model.safetensors")
        prefix = "base_model.model.model.layers.{}.self_attn.{}"
        for (layer, target), (a, b) in lora.weights.items():
            assert torch.equal(a, tensors[prefix.format(layer, target) + ".lora_A.weight"])
            assert torch.equal(b, tensors[prefix.format(layer, target) + ".lora_B.weight"])

    def poison(tensors):
        tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"][1, 2] = float("nan")

    nan = _rewrite(folders[0], tmp_path / "nan", poison)
    with pytest.raises(AdapterError, match=r"adapter 'nan': layer 0 q_proj: weights contain NaN or Inf"):
        read_adapter("nan", nan, cfg, max_rank=256)

    config = json.loads((folders[0] / "adapter_config.json").read_text())
    alpha = tmp_path / "alpha"
    shutil.copytree(folders[0], alpha)
    (alpha / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 3 * config["lora_alpha"]}))
    assert read_adapter("alpha", alpha, cfg, max_rank=256).scales["q_proj"] == pytest.approx(3 * loras[0].scales["q_proj"])
    (alpha / "adapter_config.json").write_text(json.dumps({**config, "r": config["r"] + 1}))
    with pytest.raises(AdapterError, match=r"adapter 'alpha': adapter_config.json says r=4 for \w+ but its tensors"):
        read_adapter("alpha", alpha, cfg, max_rank=256)

    st = folders[1] / "adapter_model.safetensors"
    st.write_bytes(st.read_bytes()[:-4])
    with pytest.raises(AdapterError, match=r"adapter 'x1': adapter_model.safetensors cannot be read"):
        read_adapter("x1", folders[1], cfg, max_rank=256)
    assert read_adapter("x0", folders[0], cfg, max_rank=256).version == loras[0].version
