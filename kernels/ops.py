"""The base projections' matmul, and the elementwise ops between the matmuls: residual add +
RMSNorm, rotary embedding, SwiGLU.

`pack_weight` and `linear`: the base weights never change, so on the CPU the loader packs each
one once into oneDNN's blocked layout (`pack_weight`) and `linear` multiplies with the packed
copy (kernels/README.md, "The base matmuls"). In bfloat16, F.linear calls the same oneDNN kernel
but hands it the plain (out, in) weight, which oneDNN reorders on every call: packed, the bits
are F.linear's and a matmul at decode's row counts takes 10-60% less time. In float32, F.linear
is MKL's GEMM, which on an AMD EPYC measured 1.3-4x slower than oneDNN's; the sums run in another
order, so the results differ from F.linear's in the last bits (about 1e-6 relative). Other
devices keep the plain weight and F.linear.

`rms_norm`, `rotate` and the bodies of the launchers' fallbacks below are the torch
references: the spec, the path for CUDA tensors and float16, and the CPU fallback when no C
compiler is found. CPU tensors in float32 and bfloat16 go to the C kernels (cpu_ops.c), one
pass over each token's row instead of torch's chain of whole-tensor ops and conversions. The
kernels round every intermediate where the torch code rounds it, so in bfloat16 they give the
reference's bits except, rarely, one unit in the last place (the order of the norm's sum of
squares, the last bit of exp); tests/kernels/test_cpu_ops.py holds them to that.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu


PACK_ROWS = 64  # the row count oneDNN is told to expect; any row count works with the packed weight


def packs(w: torch.Tensor) -> bool:
    if w.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return w.dtype == torch.float32 or (w.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pack_weight(w: torch.Tensor) -> torch.Tensor:
    """A base projection's weight (out, in), ready for `linear`: oneDNN's packed copy where that pays, else w."""
    if w.dim() != 2:
        raise ValueError(f"pack_weight: weight {tuple(w.shape)} must be (out, in)")
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), PACK_ROWS) if packs(w) else w


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, bias) for a weight from `pack_weight`."""
    if w.layout == torch._mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")
    return F.linear(x, w, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / sqrt(mean(x^2) + eps)), in float32, rounded to x.dtype before the weight."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, halves layout. x: (T, heads, d); cos, sin: (T, 1, d)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def add_rms_norm_(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """h += delta in place (nothing to add when delta is None); returns rms_norm(h, weight, eps), a new tensor.

    h, delta: (T, hidden); weight: (hidden,). The residual stream's add and the norm that
    follows it, in one pass.
    """
    if h.dim() != 2 or weight.shape != (h.shape[1],) or (delta is not None and delta.shape != h.shape):
        raise ValueError(f"add_rms_norm_: h {tuple(h.shape)}, delta {None if delta is None else tuple(delta.shape)}, "
                         f"weight {tuple(weight.shape)}")
    _same_kind("add_rms_norm_", h, weight, *([] if delta is None else [delta]))
    if cpu.ops_usable(h) and h.stride(1) == 1:
        return cpu.add_rms_norm_(h, delta, weight, eps)
    if delta is not None:
        h.add_(delta)
    return rms_norm(h, weight, eps)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rotate(q, cos, sin), rotate(k, cos, sin)).

    q: (T, Hq, d), k: (T, Hk, d), each head's d elements adjacent (views of the fused q|k|v
    output are fine); cos, sin: (T, 1, d). The C kernel rotates q and k in place and returns
    them; the torch path returns new tensors.
    """
    rows, head_dim = q.shape[0], q.shape[-1]
    if q.dim() != 3 or k.dim() != 3 or k.shape[0] != rows or k.shape[2] != head_dim or head_dim % 2 \
            or cos.shape != (rows, 1, head_dim) or sin.shape != cos.shape:
        raise ValueError(f"rotary: q {tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    _same_kind("rotary", q, k, cos, sin)
    if cpu.ops_usable(q) and q.stride(2) == 1 and k.stride(2) == 1:
        cpu.rotary_(q, k, cos, sin)
        return q, k
    return rotate(q, cos, sin), rotate(k, cos, sin)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """F.silu(gate) * up, where gate_up = cat(gate, up) along the last dim: (T, 2n) -> (T, n), a new tensor."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"silu_mul: gate_up {tuple(gate_up.shape)} must be (T, 2n)")
    if cpu.ops_usable(gate_up):
        return cpu.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _same_kind(op: str, first: torch.Tensor, *others: torch.Tensor) -> None:
    for t in others:
        if t.dtype != first.dtype or t.device != first.device:
            raise ValueError(f"{op}: {t.dtype} on {t.device} beside {first.dtype} on {first.device}")
