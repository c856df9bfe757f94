"""`lorafleet finetune` (plain LoRA) on a tiny random Llama: the loss falls, the adapter is a PEFT
adapter that lorafleet serves token for token like PEFT, and the eval's exact-match rises."""
from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from ft_task import TASK
from engines import generate, make_engine
from peers import encode, load_peer_model, peft_greedy
from safetensors.torch import load_file

from lorafleet.coordinator.cli import main

STEPS = 60
LOSS_FACTOR = 8  # the training loss must fall at least this many times within STEPS steps


@pytest.fixture(scope="module")
def trained(ft_model, task_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("ft_run")
    out = root / "adapters" / "words"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["finetune", "--model", str(ft_model), "--data", str(task_file), "--eval", str(task_file),
                     "--output", str(out), "--rank", "8", "--alpha", "16", "--targets", "q,k,v,o,gate,up,down",
                     "--max-steps", str(STEPS), "--lr", "1e-2", "--batch-size", "4", "--seed", "3"])
    assert code == 0, err.getvalue()
    return out, json.loads((out / "finetune_report.json").read_text()), err.getvalue()


def test_training_loss_falls_by_the_stated_factor(trained):
    _, report, printed = trained
    before, after = report["before"]["train"]["loss"], report["after"]["train"]["loss"]
    assert after * LOSS_FACTOR <= before, f"train loss {before:.3f} -> {after:.3f} (not {LOSS_FACTOR}x lower)"
    assert len(report["step_losses"]) == STEPS
    assert f"train loss {before:.4f} -> {after:.4f}" in printed  # printed as well as written


def test_adapter_is_a_standard_peft_folder(ft_model, trained):
    out, report, _ = trained
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "finetune_report.json"}
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", 8, 16)
    assert sorted(cfg["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert len(tensors) == 2 * 7 * 2  # A and B of 7 targets in 2 layers
    assert all(t.shape[0] == 8 for k, t in tensors.items() if "lora_A" in k)
    # PEFT loads it, and on the training data computes the loss the report claims.
    from lorafleet.finetune.data import encode_prompt_completion
    from lorafleet.finetune.loop import evaluate
    from lorafleet.finetune.model import load_tokenizer

    tok = load_tokenizer(ft_model)
    examples = [encode_prompt_completion(tok, p, c) for p, c in TASK]
    assert evaluate(load_peer_model(ft_model, out), examples).loss == pytest.approx(report["after"]["train"]["loss"], rel=1e-4)


def test_lorafleet_serves_it_like_peft(ft_model, trained):
    out, _, _ = trained
    engine = make_engine(ft_model, out.parent)
    prompts = [encode(p) for p, _ in TASK[:8]] + [encode("something else entirely")]
    got = generate(engine, [("words", p, 6) for p in prompts] + [(None, prompts[0], 6)])
    for prompt, tokens in zip(prompts, got):
        assert tokens == peft_greedy(ft_model, out, prompt, 6)
    assert got[0] != got[-1]  # the adapter changes what the base model says


def test_exact_match_rises_and_means_greedy_reproduces_the_completion(ft_model, trained):
    out, report, _ = trained
    before, after = report["before"]["eval"], report["after"]["eval"]
    assert before["exact_match"] == 0.0 and after["exact_match"] >= 0.5
    assert after["exact_match"] > before["exact_match"] and after["loss"] < before["loss"]
    # The eval's exact-match (teacher-forced argmax) against real greedy decoding with PEFT.
    hits = 0
    for prompt, completion in TASK:
        target = encode(completion) + [2]  # and eos
        hits += peft_greedy(ft_model, out, encode(prompt), len(target)) == target
    assert hits / len(TASK) == after["exact_match"]


def test_report_records_the_run(trained, task_file):
    _, report, _ = trained
    assert report["method"] == "lora" and report["data"] == str(task_file)
    assert report["examples"] == {"train": 16, "eval": 16, "skipped_lines": []}
    assert report["lora"]["scale"] == 2.0 and report["training"]["steps"] == STEPS
    assert torch.isfinite(torch.tensor(report["step_losses"])).all()
