"""bench/gpu_check.py's CPU side: the no-CUDA line, its arguments, and its checks run on the CPU path.

The GPU itself is not here; these hold the harness to account so that `make gpu-check` on a GPU
fails only when the GPU path is wrong: its kernel checks are run with the C kernels and the
torch references in the place of the Triton ones, and must pass; with a broken kernel they must fail.
"""
from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from lorafleet.kernels import attention, cpu

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import gpu_check  # noqa: E402

CPU_LORA = types.SimpleNamespace(shrink=lambda x, pool, batch, group, mode: cpu.shrink(x, pool, batch, group),
                                 expand=lambda y, s, pool, batch, group, mode: cpu.expand(y, s, pool, batch, group))


def test_without_cuda_it_says_so_in_one_line_and_fails():
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2
    assert done.stdout.strip().count("\n") == 0 and "no CUDA device" in done.stdout


def test_arguments():
    args = gpu_check.parse_args(["--only", "kernels", "offline", "--adapters", "0", "8"])
    assert args.only == ["kernels", "offline"] and args.adapters == [0, 8] and args.requests == 256
    assert gpu_check.parse_args([]).only == list(gpu_check.CHECKS)
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--only", "nothing"])
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--requests", "0"])


def test_the_one_billion_parameter_shape():
    assert 0.95e9 < gpu_check.llama_parameters(gpu_check.ONE_B) < 1.05e9


def test_to_device_copies_tensors_and_drops_caches(make_lora_case):
    case = make_lora_case([[8, 8, 8]], [0, 0, -1])
    cpu.shrink(case.x, case.pool, case.batch, case.group)  # fills the batch's and group's CPU caches
    moved = gpu_check.to_device(case, "cpu")
    assert moved.batch._cpu_segments is None and moved.group._cpu_args is None
    assert case.batch._cpu_segments is not None  # the original keeps its own
    assert torch.allclose(moved.pool, case.pool, rtol=0, atol=0, equal_nan=True) and moved.group.out_dims == case.group.out_dims


def _kernel_cases():
    return gpu_check.load_module("lorafleet_kernel_cases", REPO / "tests" / "kernels" / "conftest.py")


def test_the_kernel_checks_pass_on_a_correct_kernel():
    cases = _kernel_cases()
    lora = list(gpu_check.lora_cases(cases))
    attn = list(gpu_check.attention_cases(cases))
    assert {c.x.dtype for _, c, _ in lora} == {c.q.dtype for _, c in attn} == {torch.bfloat16, torch.float16}
    assert {mode for _, _, mode in lora} == {"segment", "token"}
    for label, case, mode in lora:
        assert gpu_check.check_lora(case, mode, "cpu", CPU_LORA) is None, label
    for label, case in attn:
        assert gpu_check.check_attention(case, "cpu", attention) is None, label


def test_the_kernel_checks_catch_a_wrong_kernel():
    cases = _kernel_cases()
    label, case, mode = next(gpu_check.lora_cases(cases))
    off_by_one = types.SimpleNamespace(shrink=lambda *a, mode: CPU_LORA.shrink(*a, mode=mode) * 1.1,
                                       expand=CPU_LORA.expand)
    assert gpu_check.check_lora(case, mode, "cpu", off_by_one).startswith("shrink:")
    label, case = next(gpu_check.attention_cases(cases))
    no_write = types.SimpleNamespace(paged_attention=attention.paged_attention, write_kv=lambda *a: None)
    assert gpu_check.check_attention(case, "cpu", no_write).startswith("write_kv:")


def test_the_engine_check_passes_on_the_cpu_path(tmp_path):
    """The same check the GPU runs, engine and PEFT on the CPU: float32 equal, bfloat16 mostly."""
    args = gpu_check.parse_args(["--only", "engine", "--workdir", str(tmp_path)])
    ok, summary = gpu_check.run_engine(args, device="cpu")
    assert ok, summary
    assert summary.startswith("float32: 22/22 requests token-for-token equal to PEFT on cpu")


def test_the_offline_check_runs_on_the_cpu_path(tmp_path):
    """A small Llama instead of the 1B one, 0 and 2 adapters: every request completes, one line."""
    args = gpu_check.parse_args(["--only", "offline", "--workdir", str(tmp_path), "--adapters", "0", "2",
                                 "--requests", "6"])
    small = dict(hidden=64, intermediate=128, layers=2, num_heads=4, num_kv_heads=2, max_position_embeddings=256)
    ok, summary = gpu_check.run_offline(args, device="cpu", shape=small)
    assert ok, summary
    assert "6 requests" in summary and "0 adapters" in summary and "2 adapters" in summary and "tok/s" in summary
