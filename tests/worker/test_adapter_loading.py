"""Loading adapters: cheap reading and packing (the same bytes and refusals as before), and the
worker's background prefetch of adapters that fell out of the host cache (one read each)."""
from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from engines import AdapterReads, generate, make_engine
from peers import peft_greedy
from safetensors.torch import load_file, save_file

import lorafleet.worker.worker as worker_module
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


# ------------------------------------------------------------- prefetch


@pytest.fixture(scope="module")
def same_size_adapters(tiny_models, adapter_factory, tmp_path_factory):
    """Four adapters of one size (rank 2 on q and v), so a host cache can be sized in adapters."""
    root = tmp_path_factory.mktemp("same_size")
    for i in range(4):
        adapter_factory(tiny_models["llama_gqa"], root / f"s{i}", r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], seed=60 + i)
    return root


def _adapter_bytes(engine, name: str) -> int:
    w = engine.executor.worker
    return w.model_cfg.num_layers * engine.registry.entries[name].num_pages * w.page_dim * 4


def _engine_with_cache_of(model, root, adapters: int, **kw):
    """An engine whose host cache holds exactly `adapters` of the same-size adapters."""
    probe = make_engine(model, root)
    size = _adapter_bytes(probe, probe.ensure_adapter("s0").name)
    probe.shutdown()
    return make_engine(model, root, host_cache_bytes=adapters * size + size // 2, **kw)


def _wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_prefetched_adapter_is_read_once(tiny_models, same_size_adapters, monkeypatch):
    """Adapters pushed out of the host cache are re-read on the prefetch thread while they wait in
    the queue, once each; loading them into the pool then takes them from the cache."""
    model = tiny_models["llama_gqa"]
    engine = _engine_with_cache_of(model, same_size_adapters, adapters=1, max_num_seqs=1)
    names = ["s0", "s1", "s2"]
    for name in names:
        engine.ensure_adapter(name)
    worker = engine.executor.worker
    assert worker.host_cached_adapters() == ["s2"]
    reads = AdapterReads(monkeypatch, WAIT)
    requests = [(name, [5, 6, 7], 3) for name in names]
    got = generate(engine, requests)
    assert reads.count("s0") == 1  # admitted in the first step: read on the engine thread, no time to prefetch
    for name in ("s1", "s2"):
        assert reads.count(name) == 1, reads.calls
        assert [t for n, t in reads.calls if n == name][0].startswith("adapter-prefetch")
    assert not worker._prefetching
    assert got == generate(make_engine(model, same_size_adapters), requests)
    assert got[1] == peft_greedy(model, same_size_adapters / "s1", [5, 6, 7], 3)
    engine.shutdown()


def test_load_waits_for_the_read_in_flight(tiny_models, same_size_adapters, monkeypatch):
    """A step that needs an adapter being prefetched waits for that read instead of starting another."""
    model = tiny_models["llama_gqa"]
    engine = _engine_with_cache_of(model, same_size_adapters, adapters=1)
    for name in ("s0", "s1"):
        engine.ensure_adapter(name)
    worker = engine.executor.worker
    assert "s0" not in worker.host_cached_adapters()
    reads = AdapterReads(monkeypatch, WAIT)
    reads.hold("s0")
    worker.execute(Step(prefetch_adapters=["s0"]))
    assert reads.entered["s0"].wait(WAIT)
    pages = list(range(engine.registry.entries["s0"].num_pages))
    loader = threading.Thread(target=worker.execute, args=(Step(load_adapters={"s0": pages}),))
    loader.start()
    time.sleep(0.2)  # let the load reach the in-flight read (either order must give one read)
    reads.held["s0"].set()
    loader.join(WAIT)
    assert not loader.is_alive()
    assert reads.count("s0") == 1
    assert worker.adapter_pages["s0"] == pages
    packed = worker.cache.get("s0").packed
    assert torch.equal(worker.pool.pages[:, pages], packed)
    engine.shutdown()


def test_prefetch_is_bounded(tiny_models, same_size_adapters, monkeypatch):
    """At most MAX_PREFETCH reads in flight, and never more adapters than the host cache holds."""
    model = tiny_models["llama_gqa"]
    engine = _engine_with_cache_of(model, same_size_adapters, adapters=2)
    names = ["s0", "s1", "s2", "s3"]
    for name in names:
        engine.ensure_adapter(name)
    worker = engine.executor.worker
    for name in names:
        worker.cache.remove(name)  # nothing cached
    reads = AdapterReads(monkeypatch, WAIT)
    for name in names:
        reads.hold(name)
    worker.execute(Step(prefetch_adapters=names))
    assert set(worker._prefetching) == {"s0", "s1"} and worker_module.MAX_PREFETCH == 2
    worker.execute(Step(prefetch_adapters=names))  # the same hint again starts nothing new
    assert set(worker._prefetching) == {"s0", "s1"}
    for name in names:
        reads.held[name].set()
    _wait_until(lambda: not worker._prefetching, "the prefetches")
    assert sorted(worker.host_cached_adapters()) == ["s0", "s1"]
    worker.execute(Step(prefetch_adapters=names))  # s0 and s1 fill the cache: s2 and s3 are not read
    assert not worker._prefetching
    assert [n for n, _ in reads.calls] == ["s0", "s1"]
    engine.shutdown()


def test_prefetch_of_a_forgotten_adapter_is_dropped(tiny_models, same_size_adapters, monkeypatch):
    model = tiny_models["llama_gqa"]
    engine = _engine_with_cache_of(model, same_size_adapters, adapters=2)
    engine.ensure_adapter("s0")
    worker = engine.executor.worker
    worker.cache.remove("s0")
    reads = AdapterReads(monkeypatch, WAIT)
    reads.hold("s0")
    worker.execute(Step(prefetch_adapters=["s0"]))
    assert reads.entered["s0"].wait(WAIT)
    worker.forget_adapter("s0")
    reads.held["s0"].set()
    _wait_until(lambda: not worker._prefetching, "the prefetch")
    assert worker.host_cached_adapters() == []
    engine.shutdown()


def test_failed_prefetch_is_not_retried_and_the_load_reports_it(tiny_models, same_size_adapters, monkeypatch):
    """A folder that can no longer be read: the hint does not re-read it every step, and the step that
    loads it raises the adapter's error, as loading without a prefetch does."""
    model = tiny_models["llama_gqa"]
    engine = _engine_with_cache_of(model, same_size_adapters, adapters=2)
    engine.ensure_adapter("s0")
    worker = engine.executor.worker
    worker.cache.remove("s0")
    tries = []

    def gone(name, *args, **kw):
        tries.append(threading.current_thread().name)
        raise AdapterError(name, "adapter_model.safetensors is missing")

    monkeypatch.setattr(worker_module, "read_adapter", gone)
    worker.execute(Step(prefetch_adapters=["s0"]))
    _wait_until(lambda: not worker._prefetching, "the prefetch")
    worker.execute(Step(prefetch_adapters=["s0"]))
    assert not worker._prefetching and len(tries) == 1
    with pytest.raises(AdapterError, match="adapter 's0': adapter_model.safetensors is missing"):
        worker.execute(Step(load_adapters={"s0": list(range(engine.registry.entries["s0"].num_pages))}))
    assert len(tries) == 2 and tries[1] == threading.current_thread().name
    engine.shutdown()
