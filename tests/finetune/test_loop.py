"""The training loop's savings are exact: the shared prefix run once, and gradient accumulation."""
from __future__ import annotations

import torch
from ft_task import TASK

from lorafleet.finetune.data import encode_messages, encode_prompt_completion
from lorafleet.finetune.loop import TrainSettings, labelled_logits, train
from lorafleet.finetune.model import load_base, load_tokenizer, peft_lora_model


def test_shared_prefix_gives_the_logits_of_full_forwards(ft_model):
    tok = load_tokenizer(ft_model)
    base = load_base(ft_model)
    system = {"role": "system", "content": "answer with one word"}
    rows = [encode_messages(tok, [system, {"role": "user", "content": p}, {"role": "assistant", "content": c}])
            for p, c in TASK[:5]]
    with torch.no_grad():
        logits, targets, row_of = labelled_logits(base, rows)
        for i, r in enumerate(rows):
            full = base(input_ids=torch.tensor([r.ids])).logits[0, :-1]
            want = full[[j - 1 for j in range(1, len(r.labels)) if r.labels[j] != -100]]
            assert torch.allclose(logits[row_of == i], want, atol=1e-4)
            assert targets[row_of == i].tolist() == [lab for lab in r.labels[1:] if lab != -100]


def test_gradient_accumulation_equals_the_bigger_batch(ft_model):
    tok = load_tokenizer(ft_model)
    examples = [encode_prompt_completion(tok, p, c) for p, c in TASK]
    results = []
    for batch_size, accum in ((4, 1), (2, 2)):
        model = peft_lora_model(load_base(ft_model), 4, 8, ("q_proj", "down_proj"), False, seed=0)
        losses = train(model, [p for p in model.parameters() if p.requires_grad], examples,
                       TrainSettings(steps=3, lr=1e-2, batch_size=batch_size, grad_accum=accum, seed=1))
        weights = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
        results.append((losses, weights))
    (l1, w1), (l2, w2) = results
    assert torch.allclose(torch.tensor(l1), torch.tensor(l2), atol=1e-5)
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1)
    assert l1[-1] < l1[0]
