"""`--method sparse-lora`: a sparse stage at density D, then LoRA from the rank-R truncated SVD of
that sparse update (checked numerically), trained on, and written as an ordinary LoRA adapter."""
from __future__ import annotations

import json

import pytest
import torch
from engines import generate, make_engine
from peers import encode, peft_greedy
from safetensors.torch import load_file

from lorafleet.finetune import FinetuneConfig, finetune
from lorafleet.finetune.sparse import mask_index

RANK, DENSITY, STEPS, STAGE1 = 4, 0.05, 40, 20
TARGETS = ("q_proj", "v_proj", "down_proj")


@pytest.fixture(scope="module")
def result(ft_model, task_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft_sparse") / "sparse"
    return finetune(FinetuneConfig(model=str(ft_model), data=str(task_file), output=str(out), rank=RANK, alpha=8,
                                   targets=TARGETS, max_steps=STEPS, lr=1e-2, seed=5, method="sparse-lora",
                                   density=DENSITY, sparse_steps=STAGE1, progress=False))


def _base_weight(ft_model, name):
    from safetensors.torch import load_file as load

    return load(str(ft_model / "model.safetensors"))[name + ".weight"]


def test_sparse_stage_trains_exactly_density_d_of_each_weight(ft_model, result):
    assert {u.name.rsplit(".", 1)[-1] for u in result.sparse_updates} == set(TARGETS)
    assert len(result.sparse_updates) == 2 * len(TARGETS)
    for u in result.sparse_updates:
        numel = u.shape[0] * u.shape[1]
        assert u.shape == tuple(_base_weight(ft_model, u.name).shape)
        assert u.index.numel() == round(DENSITY * numel) == torch.unique(u.index).numel()
        dense = u.dense()
        assert int((dense != 0).sum()) == u.index.numel()  # trained: every masked entry moved, nothing else
    losses = result.report["sparse"]["stage1_losses"]
    assert len(losses) == STAGE1 and sum(losses[-4:]) < sum(losses[:4])


def test_initial_lora_is_the_rank_r_svd_of_the_sparse_update(result):
    scale = result.report["lora"]["scale"]
    assert scale == 8 / RANK
    for u in result.sparse_updates:
        a0, b0 = result.initial_lora[u.name]
        assert a0.shape == (RANK, u.shape[1]) and b0.shape == (u.shape[0], RANK)
        dense = u.dense().double()
        uu, s, vh = torch.linalg.svd(dense, full_matrices=False)
        best = (uu[:, :RANK] * s[:RANK]) @ vh[:RANK]
        product = scale * b0.double() @ a0.double()
        assert torch.allclose(product, best, rtol=0, atol=1e-6 * float(s[0])), u.name
        assert torch.linalg.matrix_rank(product).item() == RANK
        # a sparse update is not low rank: the truncation really drops something
        assert (dense - best).norm() > 0.1 * dense.norm()
    assert 0 < result.report["sparse"]["svd_energy"]["min"] < 1


def test_output_is_an_ordinary_lora_adapter_that_trained_after_the_init(ft_model, result):
    out = result.adapter
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], sorted(cfg["target_modules"])) == ("LORA", RANK, 8, sorted(TARGETS))
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert len(tensors) == 2 * len(result.sparse_updates)
    moved = 0.0
    for u in result.sparse_updates:
        key = "base_model.model." + u.name
        a, b = tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"]
        a0, b0 = result.initial_lora[u.name]
        assert a.shape == a0.shape and b.shape == b0.shape
        moved += float((a - a0).norm() + (b - b0).norm())
    assert moved > 0  # stage 2 trained the factors
    losses = result.report["step_losses"][STAGE1:]
    assert len(losses) == STEPS - STAGE1 and sum(losses[-4:]) < sum(losses[:4])
    assert result.report["after"]["train"]["loss"] < result.report["sparse"]["train_loss_after_stage1_svd_init"]
    # it loads in PEFT and lorafleet serves it token for token (on the original base weights)
    engine = make_engine(ft_model, out.parent)
    prompts = [encode("item 3:"), encode("item 12:")]
    for prompt, tokens in zip(prompts, generate(engine, [(out.name, p, 6) for p in prompts])):
        assert tokens == peft_greedy(ft_model, out, prompt, 6)


def test_masks_are_fixed_random_or_largest_magnitude():
    w = torch.randn(30, 20)
    top = mask_index(w, 0.1, "magnitude", torch.Generator().manual_seed(0))
    assert set(top.tolist()) == set(w.abs().flatten().topk(60).indices.tolist())
    r1 = mask_index(w, 0.1, "random", torch.Generator().manual_seed(1))
    r2 = mask_index(w, 0.1, "random", torch.Generator().manual_seed(1))
    assert torch.equal(r1, r2) and r1.numel() == 60 and not torch.equal(r1, top)
    with pytest.raises(ValueError, match="density"):
        mask_index(w, 0.0, "random", torch.Generator())
