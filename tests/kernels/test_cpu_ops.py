"""The elementwise C kernels of the CPU path (kernels/cpu_ops.c) equal their torch references (kernels/ops.py).

float32 agrees to float32's rounding (the kernels may fuse a multiply-add and sum squares in
another order). bfloat16 rounds where the torch code rounds: the residual stream is equal bit
for bit, everything else too but for rare last-place steps (the norm's sum of squares in
another order, exp's last bit).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lorafleet.kernels import cpu, ops

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, params=["native", "generic"])
def library(request, monkeypatch):
    """Both builds of the bfloat16 kernels: AVX512-BF16 conversions (this machine) and the generic loops."""
    if request.param == "generic":
        monkeypatch.setattr(cpu, "_library", cpu.load_variant(cpu.GENERIC_BF16))
    return request.param


def assert_matches(out: torch.Tensor, expected: torch.Tensor) -> None:
    """float32: within float32's rounding. bfloat16: rarely other bits, then at most two units in the last
    place (the norm's weight multiplies a rounded intermediate that may be one unit off)."""
    assert out.shape == expected.shape and out.dtype == expected.dtype
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, expected, rtol=2e-6, atol=1e-6, equal_nan=True)
        return
    got, want = out.float(), expected.float()
    assert torch.equal(got.isnan(), want.isnan())
    finite = want.isfinite()
    assert torch.equal(got[~finite & ~want.isnan()], want[~finite & ~want.isnan()])
    got, want = got[finite], want[finite]
    ulp = torch.exp2(torch.floor(torch.log2(want.abs().clamp(min=2.0 ** -126))) - 7)
    assert bool(((got - want).abs() <= 2 * ulp).all()), f"off by more than two ulps: {((got - want).abs() / ulp).max()}"
    assert (got != want).sum() <= max(1, want.numel() // 1000), f"{int((got != want).sum())} of {want.numel()} differ"


def randn(*shape, dtype, seed, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


# ---------------------------------------------------------------- residual add + RMSNorm


@pytest.mark.parametrize("shape", [(1, 576), (7, 100), (1024, 576), (3, 17), (2, 1)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_rms_norm_matches_the_reference(dtype, shape):
    h, delta = randn(*shape, dtype=dtype, seed=1), randn(*shape, dtype=dtype, seed=2, scale=3)
    weight = randn(shape[1], dtype=dtype, seed=3)
    expected_h = h + delta
    expected = ops.rms_norm(expected_h, weight, 1e-5)
    out = ops.add_rms_norm_(h, delta, weight, 1e-5)
    assert torch.equal(h, expected_h)  # the residual stream itself: exact in every dtype
    assert_matches(out, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_without_delta_leaves_h_alone(dtype):
    h, weight = randn(33, 64, dtype=dtype, seed=4, scale=50), randn(64, dtype=dtype, seed=5)
    before = h.clone()
    assert_matches(ops.add_rms_norm_(h, None, weight, 1e-6), ops.rms_norm(before, weight, 1e-6))
    assert torch.equal(h, before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_rms_norm_takes_strided_rows(dtype):
    """h a column block of a wider tensor (written in place there), delta a transposed view."""
    wide = randn(9, 80, dtype=dtype, seed=6)
    h, delta = wide[:, 8:56], randn(48, 9, dtype=dtype, seed=7).t()
    weight = randn(48, dtype=dtype, seed=8)
    expected_h = h + delta
    expected, rest = ops.rms_norm(expected_h, weight, 1e-5), wide[:, 56:].clone()
    assert_matches(ops.add_rms_norm_(h, delta, weight, 1e-5), expected)
    assert torch.equal(wide[:, 8:56], expected_h) and torch.equal(wide[:, 56:], rest)


# ---------------------------------------------------------------- rotary


def rope_tables(positions: torch.Tensor, head_dim: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """As worker/model.py builds them."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = positions[:, None].float() * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype).unsqueeze(1), emb.sin().to(dtype).unsqueeze(1)


@pytest.mark.parametrize("rows, heads, kv_heads, head_dim", [(1, 9, 3, 64), (5, 4, 2, 18), (300, 9, 3, 64), (3, 2, 1, 2),
                                                           (17, 2, 2, 128)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_matches_the_reference_in_place_in_qkv(dtype, rows, heads, kv_heads, head_dim):
    """q and k as the model passes them: views of the fused q|k|v output; v is left alone."""
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    qkv = randn(rows, q_size + 2 * kv_size, dtype=dtype, seed=rows)
    before = qkv.clone()
    q, k, _ = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q, k = q.unflatten(-1, (heads, head_dim)), k.unflatten(-1, (kv_heads, head_dim))
    cos, sin = rope_tables(torch.arange(rows) * 37 + 5, head_dim, dtype)  # positions into the thousands
    expected_q, expected_k = ops.rotate(q, cos, sin), ops.rotate(k, cos, sin)
    out_q, out_k = ops.rotary(q, k, cos, sin)
    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()
    assert_matches(out_q, expected_q)
    assert_matches(out_k, expected_k)
    assert torch.equal(qkv[:, q_size + kv_size:], before[:, q_size + kv_size:])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_uses_both_halves_of_the_tables(dtype):
    """Any cos and sin of shape (T, 1, d), not only the model's (whose halves repeat), and contiguous q, k."""
    q, k = randn(6, 3, 16, dtype=dtype, seed=10), randn(6, 1, 16, dtype=dtype, seed=11)
    cos, sin = randn(6, 1, 16, dtype=dtype, seed=12), randn(6, 1, 16, dtype=dtype, seed=13)
    expected_q, expected_k = ops.rotate(q, cos, sin), ops.rotate(k, cos, sin)
    out_q, out_k = ops.rotary(q, k, cos, sin)
    assert_matches(out_q, expected_q)
    assert_matches(out_k, expected_k)


# ---------------------------------------------------------------- silu(gate) * up


def silu_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@pytest.mark.parametrize("rows, inter", [(1, 1536), (13, 17), (512, 1536), (4, 1)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_mul_matches_the_reference(dtype, rows, inter):
    gate_up = randn(rows, 2 * inter, dtype=dtype, seed=inter, scale=4)
    assert_matches(ops.silu_mul(gate_up), silu_reference(gate_up))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_mul_at_the_ends_of_exp(dtype):
    """Where exp(-g) overflows or underflows, infinities and NaN: the reference's values, zeros' signs aside."""
    edges = [0.0, -0.0, 1e-30, -1e-30, 17.0, -17.0, 86.5, -86.5, 88.5, -88.5, 88.75, -88.75, 89.0, -89.0, 100.0,
             -100.0, 1e30, -1e30, math.inf, -math.inf, math.nan]
    gate = torch.tensor(edges).to(dtype)
    gate_up = torch.cat([gate, torch.linspace(-3, 3, len(edges)).to(dtype)]).unsqueeze(0)
    assert_matches(ops.silu_mul(gate_up), silu_reference(gate_up))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_mul_over_the_whole_range(dtype):
    """Every magnitude from 2^-20 to 2^7 in both signs, against torch's exp."""
    gate = torch.cat([torch.logspace(-20, 7, 4001, base=2), -torch.logspace(-20, 7, 4001, base=2)]).to(dtype)
    gate_up = torch.stack([gate, torch.ones_like(gate)]).flatten().reshape(1, -1)
    assert_matches(ops.silu_mul(gate_up), silu_reference(gate_up))


def test_silu_mul_takes_strided_rows():
    wide = randn(5, 40, dtype=torch.bfloat16, seed=20)
    assert_matches(ops.silu_mul(wide[:, 4:36]), silu_reference(wide[:, 4:36]))


# ---------------------------------------------------------------- threads, dispatch, fallbacks


@pytest.mark.parametrize("rows", [48, 400])  # a decode step's rows, and a prefill's
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_two_threads_give_the_one_thread_result(dtype, rows):
    """Rows split between threads (above the kernels' PARALLEL_MIN elements): bit for bit the same."""
    h, delta, weight = randn(rows, 576, dtype=dtype, seed=30), randn(rows, 576, dtype=dtype, seed=31), randn(576, dtype=dtype, seed=32)
    qkv = randn(rows, 960, dtype=dtype, seed=33)
    cos, sin = rope_tables(torch.arange(rows), 64, dtype)
    gate_up = randn(rows, 3072, dtype=dtype, seed=34)

    def run():
        hh, q, k = h.clone(), qkv[:, :576].clone().unflatten(-1, (9, 64)), qkv[:, 576:768].clone().unflatten(-1, (3, 64))
        return [ops.add_rms_norm_(hh, delta, weight, 1e-5), hh, *ops.rotary(q, k, cos, sin), ops.silu_mul(gate_up)]

    one = run()
    torch.set_num_threads(2)
    for a, b in zip(one, run()):
        assert torch.equal(a, b)


def test_the_library_has_the_ops():
    assert cpu.library() is not None, cpu._failed
    assert all(cpu.ops_usable(torch.zeros(1, dtype=d)) for d in DTYPES)
    assert not cpu.ops_usable(torch.zeros(1, dtype=torch.float16))  # float16 stays on torch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_without_the_library_the_torch_references_run(monkeypatch, dtype):
    """No C compiler (or float16): the launchers give the references' results, rotary as new tensors."""
    if dtype != torch.float16:
        monkeypatch.setattr(cpu, "_library", None)
        monkeypatch.setattr(cpu, "_failed", "no C compiler (test)")
    h, delta, weight = randn(4, 32, dtype=dtype, seed=40), randn(4, 32, dtype=dtype, seed=41), randn(32, dtype=dtype, seed=42)
    expected = ops.rms_norm(h + delta, weight, 1e-5)
    assert torch.equal(ops.add_rms_norm_(h, delta, weight, 1e-5), expected)
    q, k = randn(4, 2, 8, dtype=dtype, seed=43), randn(4, 1, 8, dtype=dtype, seed=44)
    cos, sin = rope_tables(torch.arange(4), 8, dtype)
    out_q, out_k = ops.rotary(q, k, cos, sin)
    assert out_q.data_ptr() != q.data_ptr()
    assert torch.equal(out_q, ops.rotate(q, cos, sin)) and torch.equal(out_k, ops.rotate(k, cos, sin))
    gate_up = randn(4, 16, dtype=dtype, seed=45)
    assert torch.equal(ops.silu_mul(gate_up), silu_reference(gate_up))


def test_bad_shapes_and_mixed_dtypes_are_refused():
    h, weight = torch.zeros(3, 8), torch.ones(8)
    with pytest.raises(ValueError, match="add_rms_norm_"):
        ops.add_rms_norm_(h, torch.zeros(3, 7), weight, 1e-5)
    with pytest.raises(ValueError, match="add_rms_norm_"):
        ops.add_rms_norm_(h, None, weight.bfloat16(), 1e-5)
    q, k, cos = torch.zeros(3, 2, 8), torch.zeros(3, 1, 8), torch.zeros(3, 1, 8)
    with pytest.raises(ValueError, match="rotary"):
        ops.rotary(q, k, cos[:2], cos[:2])
    with pytest.raises(ValueError, match="rotary"):
        ops.rotary(q[..., :7], k[..., :7], cos[..., :7], cos[..., :7])  # odd head size: no halves
    with pytest.raises(ValueError, match="silu_mul"):
        ops.silu_mul(torch.zeros(3, 7))


# ---------------------------------------------------------------- base projections: packed weights


@pytest.mark.parametrize("out_f,in_f", [(960, 576), (576, 1536), (3072, 64), (37, 19)])
def test_linear_with_a_packed_weight_gives_f_linears_results(out_f, in_f):
    """bfloat16 on the CPU: oneDNN's packed weight, the same kernel and bits as F.linear at every row count,
    on strided rows, with and without a bias; float32: oneDNN's packed weight against MKL's F.linear, the
    same sums in another order."""
    gen = torch.Generator().manual_seed(out_f + in_f)
    w = (torch.randn(out_f, in_f, generator=gen) * in_f ** -0.5).bfloat16()
    packed = ops.pack_weight(w)
    assert ops.packs(w) and packed.layout == torch._mkldnn and packed.shape == w.shape
    bias = torch.randn(out_f, generator=gen).bfloat16()
    for rows in (0, 1, 7, 64, 65, 300):
        x = torch.randn(rows, 2 * in_f, generator=gen).bfloat16()[:, ::2]  # strided rows
        assert torch.equal(ops.linear(x, packed), F.linear(x, w))
        assert torch.equal(ops.linear(x, packed, bias), F.linear(x, w, bias))
    w32, bias32 = w.float(), bias.float()
    packed32 = ops.pack_weight(w32)
    assert packed32.layout == torch._mkldnn and packed32.dtype == torch.float32
    for rows in (0, 1, 7, 64, 300):
        x = torch.randn(rows, 2 * in_f, generator=gen)[:, ::2]
        torch.testing.assert_close(ops.linear(x, packed32, bias32), F.linear(x, w32, bias32), rtol=1e-5, atol=1e-5)
    assert ops.pack_weight(w.half()).layout == torch.strided, "float16 keeps the plain weight"
    with pytest.raises(ValueError, match="must be \\(out, in\\)"):
        ops.pack_weight(w[0])
