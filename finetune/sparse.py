"""Sparse low-rank adaptation (the SLoRA recipe, arXiv 2308.06522), trained with torch and PEFT.

Stage 1 fine-tunes a sparse subset of every targeted weight: a fixed mask of density D (random,
or the largest-magnitude entries) chosen once, and a trainable value per masked entry, applied to
the frozen weight through a torch parametrization (``W -> W + scatter(values)``). The training loop
is the one of ``loop.py``.

Stage 2 is ordinary PEFT LoRA whose factors start from the rank-R truncated SVD of each sparse
update ``dW = U S V^T``: ``A = V_R^T`` and ``B = U_R S_R / scale`` (scale = alpha/r or
alpha/sqrt(r)), so ``scale * B @ A`` is exactly the best rank-R approximation of ``dW``. A takes the
orthonormal right singular vectors rather than the balanced ``sqrt(S)`` split: its rows then have
unit norm like a LoRA A at its usual random init, so every rank direction receives gradient even
where ``S`` is small or zero (a balanced split would start those directions at zero on both
sides, where LoRA cannot learn them).

The base weight is *not* adjusted by the truncation residual ``dW - dW_R``: the adapter is served
on the original base weights, so training it on an adjusted base would teach it a function the
server never computes (a sparse update is far from low rank; the residual is most of it at small
ranks, see ``svd_energy`` in the report). Stage 2 therefore starts from ``W + dW_R``, the best a
rank-R adapter on the served base can represent of stage 1's result, and the output is an ordinary
LoRA adapter of rank R.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from .data import Example
from .loop import TrainSettings, train
from .model import target_linears

MASKS = ("random", "magnitude")


@dataclasses.dataclass
class SparseUpdate:
    """The trained sparse update of one weight: values at flat indices of a (out, in) matrix."""

    name: str  # the module's qualified name in the base model, e.g. model.layers.0.self_attn.q_proj
    shape: tuple[int, int]
    index: object  # LongTensor, sorted flat indices
    values: object  # float32 tensor, one value per index

    def dense(self):
        import torch

        out = torch.zeros(self.shape[0] * self.shape[1], dtype=torch.float32)
        out[self.index.cpu()] = self.values.detach().float().cpu()
        return out.view(self.shape)


def mask_index(weight, density: float, mask: str, generator):
    """Sorted flat indices of the entries to train: round(density * numel) of them, at least one."""
    import torch

    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if mask not in MASKS:
        raise ValueError(f"mask must be one of {', '.join(MASKS)}, got {mask!r}")
    numel = weight.numel()
    k = max(1, round(density * numel))
    if mask == "random":
        index = torch.randperm(numel, generator=generator)[:k]
    else:
        index = weight.detach().abs().flatten().float().cpu().topk(k).indices
    return index.sort().values


def _parametrization_class():
    import torch

    class SparseDelta(torch.nn.Module):
        """A torch parametrization: the frozen weight plus trainable values at fixed entries."""

        def __init__(self, index, device):
            super().__init__()
            self.register_buffer("index", index.to(device))
            self.values = torch.nn.Parameter(torch.zeros(index.numel(), dtype=torch.float32, device=device))

        def forward(self, weight):
            delta = torch.zeros(weight.numel(), dtype=torch.float32, device=weight.device)
            delta = delta.index_add(0, self.index, self.values)
            return weight + delta.view_as(weight).to(weight.dtype)

    return SparseDelta


def sparse_stage(base, examples: Sequence[Example], targets, density: float, mask: str,
                 settings: TrainSettings, on_step: Callable[[int, float], None] | None = None):
    """Stage 1 on the (frozen) causal LM ``base``; returns ([SparseUpdate], per-step losses).

    ``base`` is left as it was: the parametrizations are removed and its weights never change.
    """
    import torch
    from torch.nn.utils import parametrize

    linears = target_linears(base, targets)
    SparseDelta = _parametrization_class()
    generator = torch.Generator().manual_seed(settings.seed)
    deltas = {}
    try:
        for name, linear in linears.items():
            delta = SparseDelta(mask_index(linear.weight, density, mask, generator), linear.weight.device)
            parametrize.register_parametrization(linear, "weight", delta)
            deltas[name] = delta
        losses = train(base, [d.values for d in deltas.values()], examples, settings, on_step)
        updates = [SparseUpdate(name, tuple(linears[name].weight.shape), d.index.detach().cpu(),
                                d.values.detach().float().cpu().clone()) for name, d in deltas.items()]
    finally:
        for name in deltas:
            parametrize.remove_parametrizations(linears[name], "weight", leave_parametrized=False)
    return updates, losses


def svd_factors(dense, rank: int, scale: float):
    """(A, B) with scale * B @ A = the rank-``rank`` truncated SVD of ``dense`` (see the module doc)."""
    import torch

    u, s, vh = torch.linalg.svd(dense.double(), full_matrices=False)
    a = vh[:rank]
    b = u[:, :rank] * (s[:rank] / scale)
    energy = float((s[:rank] ** 2).sum() / (s ** 2).sum().clamp_min(1e-300))
    return a.float(), b.float(), energy


def init_lora_from_sparse(peft_model, updates: Sequence[SparseUpdate], rank: int, scale: float,
                          adapter: str = "default") -> dict[str, float]:
    """Sets every LoRA pair of ``peft_model`` from its sparse update; returns the fraction of each
    update's squared Frobenius norm that the rank-R truncation keeps."""
    import torch

    causal_lm = peft_model.get_base_model()
    energies = {}
    for update in updates:
        layer = causal_lm.get_submodule(update.name)
        lora_a, lora_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        if tuple(lora_a.shape) != (rank, update.shape[1]) or tuple(lora_b.shape) != (update.shape[0], rank):
            raise ValueError(f"{update.name}: LoRA shapes {tuple(lora_a.shape)}, {tuple(lora_b.shape)} do not fit "
                             f"rank {rank} of a {update.shape} weight")
        a, b, energy = svd_factors(update.dense(), rank, scale)
        with torch.no_grad():
            lora_a.copy_(a.to(lora_a.dtype))
            lora_b.copy_(b.to(lora_b.dtype))
        energies[update.name] = energy
    return energies


def check_rank(base, targets, rank: int) -> None:
    for name, linear in target_linears(base, targets).items():
        if rank > min(linear.weight.shape):
            raise ValueError(f"--rank {rank} is above the smaller dimension of {name} {tuple(linear.weight.shape)}: "
                             "a truncated SVD has no more directions")
