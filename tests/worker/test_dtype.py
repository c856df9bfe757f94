"""--dtype auto: resolved once, to bfloat16 where the hardware multiplies it natively, else float32."""
from __future__ import annotations

import pytest

from lorafleet.coordinator.cli import add_engine_args
from lorafleet.coordinator.config import EngineConfig
from lorafleet.worker import config as worker_config
from lorafleet.worker.config import WorkerConfig, cpu_has_native_bf16, resolve_dtype

AMX = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
AVX512_BF16 = "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n"
AVX2 = "flags\t\t: fpu sse2 avx2 fma\n"


@pytest.mark.parametrize("cpuinfo, expected", [(AMX, "bfloat16"), (AVX512_BF16, "bfloat16"), (AVX2, "float32")])
def test_auto_on_cpu_follows_the_cpu_flags(cpuinfo, expected):
    assert resolve_dtype("auto", "cpu", cpuinfo) == expected


def test_a_flag_must_match_whole_not_as_a_prefix():
    assert not cpu_has_native_bf16("flags\t: avx512_bf16x amx_bf16_fake\n")


def test_auto_on_cuda_is_bfloat16_whatever_the_host_cpu():
    assert resolve_dtype("auto", "cuda", AVX2) == "bfloat16"
    assert resolve_dtype("auto", "cuda:1", AVX2) == "bfloat16"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_an_explicit_dtype_is_kept(dtype):
    assert resolve_dtype(dtype, "cpu", AVX2) == dtype
    assert resolve_dtype(dtype, "cuda", AMX) == dtype


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="choose one of auto, float32, bfloat16, float16"):
        resolve_dtype("float64")


def test_engine_config_holds_the_resolved_dtype(tiny_models, monkeypatch):
    """The server's GetServerInfo reads cfg.engine.dtype: it must be the dtype served in, never "auto"."""
    model = str(tiny_models["llama_gqa"])
    monkeypatch.setattr(worker_config, "cpu_has_native_bf16", lambda cpuinfo=None: True)
    cfg = EngineConfig(model)
    assert cfg.dtype == "bfloat16" and cfg.worker_config().dtype == "bfloat16"
    monkeypatch.setattr(worker_config, "cpu_has_native_bf16", lambda cpuinfo=None: False)
    assert EngineConfig(model).dtype == "float32"
    assert EngineConfig(model, dtype="bfloat16").dtype == "bfloat16"
    assert WorkerConfig(model).dtype == "float32"
    with pytest.raises(ValueError, match="--dtype 'int8'"):
        EngineConfig(model, dtype="int8")


def test_this_machine_resolves_auto_from_its_own_flags():
    text = open("/proc/cpuinfo").read()
    native = any(f in line.split() for line in text.splitlines() if line.startswith("flags") for f in ("amx_bf16", "avx512_bf16"))
    assert resolve_dtype("auto") == ("bfloat16" if native else "float32")


def test_the_cli_default_is_auto():
    import argparse

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert parser.parse_args(["--model", "m"]).dtype == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", "--dtype", "float64"])
