"""1,000 adapters through a pool that holds at most 50 at once and host memory for 100: outputs equal
a pool that holds them all, and host memory stays within its bound."""
from __future__ import annotations

import json
import shutil

import torch
from engines import make_engine
from safetensors.torch import load_file, save_file

from lorafleet.coordinator.run import Job, drive
from lorafleet.coordinator.sequence import Request

N_ADAPTERS = 1000


def _thousand_adapters(template, root):
    """Copies of a peft-saved adapter with fresh random weights (same keys, shapes and config)."""
    tensors = load_file(template / "adapter_model.safetensors")
    config = json.loads((template / "adapter_config.json").read_text())
    gen = torch.Generator().manual_seed(7)
    for i in range(N_ADAPTERS):
        folder = root / f"a{i:04d}"
        folder.mkdir(parents=True)
        save_file({k: torch.randn(v.shape, generator=gen) * 0.5 for k, v in tensors.items()}, folder / "adapter_model.safetensors")
        (folder / "adapter_config.json").write_text(json.dumps(config))


def _run(engine, max_resident: list[int], max_host: list[int]) -> list[list[int]]:
    """`lorafleet run`'s driver; the pool and host memory are checked after every step."""
    jobs = [Job(Request(str(i), [3 + i % 200, 7, 11], 4, f"a{i:04d}", ignore_eos=True)) for i in range(N_ADAPTERS)]
    step = engine.step

    def checked_step():
        outputs = step()
        engine.scheduler.plan.check()
        max_resident[0] = max(max_resident[0], len(engine.scheduler.plan.adapters))
        max_host[0] = max(max_host[0], len(engine.executor.worker.host_adapters()))
        return outputs

    engine.step = checked_step
    drive(engine, jobs, max_steps=20_000)
    assert not engine.has_work() and all(j.error is None for j in jobs)
    return [j.seq.output_ids for j in jobs]


def test_thousand_adapters_through_fifty_slots(tiny_models, adapter_factory, tmp_path):
    model = tiny_models["llama_gqa"]
    template = adapter_factory(model, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    root = tmp_path / "adapters"
    _thousand_adapters(template, root)
    page_bytes = 2 * (2 * 2 * 16) * 4
    adapter_pages = 7  # (2*64 + 2*64 + 64*2 + 32*2) / 64
    small = make_engine(model, root, pool_bytes=(50 * adapter_pages + 6) * page_bytes,
                        host_cache_bytes=100 * adapter_pages * page_bytes, max_num_seqs=16)
    assert small.ensure_adapter("a0000").info.num_pages == adapter_pages
    peak, host = [0], [0]
    got = _run(small, peak, host)
    assert 1 < peak[0] <= 50
    assert 16 < host[0] <= 100  # the host memory bound held; lorafleet run keeps 2 x max_num_seqs queued
    big = make_engine(model, root, pool_bytes=(N_ADAPTERS * adapter_pages + 2000) * page_bytes, max_num_seqs=16)
    peak_big = [0]
    assert got == _run(big, peak_big, [0])
    assert peak_big[0] > 50
    assert len({tuple(t) for t in got}) > N_ADAPTERS // 2  # the adapters really differ
    shutil.rmtree(root)


def test_the_folder_watcher_reads_the_configs_only_when_the_folder_changes(tiny_adapters, tmp_path, monkeypatch):
    """The watcher (recheck=False, twice a second) looks at 1,000 configs again only when a folder is
    added, removed or renamed, or once recheck_every has passed; a listing (recheck=True) always does."""
    from lorafleet.coordinator import adapters as catalog_module

    root = tmp_path / "adapters"
    for i in range(N_ADAPTERS):
        shutil.copytree(tiny_adapters["r8_k"], root / f"a{i:04d}")
    catalog = catalog_module.DiskCatalog(root, recheck_every=3600)
    stats = []
    real_mtime = catalog_module._mtime
    monkeypatch.setattr(catalog_module, "_mtime", lambda path: stats.append(path) or real_mtime(path))
    assert len(catalog.items(recheck=False)) == N_ADAPTERS and len(stats) == N_ADAPTERS + 1
    edited = root / "a0007" / "adapter_config.json"
    edited.write_text(json.dumps({**json.loads(edited.read_text()), "r": 3}))
    stats.clear()
    assert catalog.items(recheck=False)[7]["error"] is None  # the root did not change: nothing read again
    assert stats == [root]
    assert "says r=3" in catalog.items()[7]["error"]  # a listing reads every config
    shutil.copytree(root / "a0001", root / "new")
    stats.clear()
    assert [item["name"] for item in catalog.items(recheck=False)][-1] == "new"
    assert len(stats) == N_ADAPTERS + 2
    catalog.recheck_every = 0
    stats.clear()
    catalog.items(recheck=False)
    assert len(stats) == N_ADAPTERS + 2
