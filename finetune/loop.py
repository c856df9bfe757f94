"""The one training loop of lorafleet (the demo adapters and `lorafleet finetune` both use it),
and the evaluation: loss and greedy exact-match.

The loss is next-token cross-entropy averaged over the labelled tokens of one optimizer step
(all its micro-batches together). Two savings, both exact: the token prefix that every row of a
micro-batch shares (a chat template's system prompt and more) runs once and its keys and values
are repeated over the batch (gradients flow through them); and the LM head runs only where there
is a label. Rows are right-padded after the shared prefix.

Greedy exact-match is computed by teacher forcing: greedy decoding reproduces a target exactly if
and only if, at every target position, the argmax given the gold prefix is the gold token. So one
forward pass gives both the eval loss and the exact-match (a near-tie aside).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

from .data import IGNORE, Example


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    steps: int
    lr: float = 2e-3
    batch_size: int = 4
    grad_accum: int = 1
    seed: int = 0
    weight_decay: float = 0.0
    clip: float = 1.0
    warmup_fraction: float = 1 / 8  # linear warmup, then linear decay to min_lr_ratio
    min_lr_ratio: float = 0.1

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


def steps_for_epochs(n_examples: int, epochs: float, batch_size: int, grad_accum: int) -> int:
    return max(1, math.ceil(n_examples * epochs / (batch_size * grad_accum)))


def lr_factor(step: int, steps: int, warmup_fraction: float = 1 / 8, min_ratio: float = 0.1) -> float:
    warmup = max(1, int(steps * warmup_fraction))
    if step < warmup:
        return (step + 1) / warmup
    return max(min_ratio, (steps - step) / (steps - warmup + 1))


def batches(n_examples: int, batch_size: int, count: int, seed: int) -> list[list[int]]:
    """Example indices of ``count`` micro-batches: reshuffled epochs, fixed by the seed."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < count * batch_size:
        order += torch.randperm(n_examples, generator=gen).tolist()
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(count)]


def _causal_lm(model):
    """The transformers causal LM inside a PEFT model (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if get is not None else model


def labelled_logits(model, rows: Sequence[Example]):
    """(logits at the labelled positions, their targets, the row of each), one forward pass."""
    import torch

    causal_lm = _causal_lm(model)
    device = causal_lm.lm_head.weight.device
    first_label = min(next(i for i, lab in enumerate(r.labels) if lab != IGNORE) for r in rows)
    shared = 0
    # Stop one short of the first label: the hidden state there predicts it.
    while shared < first_label - 1 and len({r.ids[shared] for r in rows}) == 1:
        shared += 1
    cache = None
    if shared:
        prefix = torch.tensor([rows[0].ids[:shared]], device=device)
        cache = causal_lm.model(input_ids=prefix, use_cache=True).past_key_values
        cache.batch_repeat_interleave(len(rows))
    pad = causal_lm.config.pad_token_id
    width = max(len(r.ids) for r in rows) - shared
    input_ids = torch.full((len(rows), width), pad if pad is not None else 0, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(rows), shared + width), dtype=torch.long)
    attention[:, :shared] = 1
    for i, r in enumerate(rows):
        n = len(r.ids) - shared
        input_ids[i, :n] = torch.tensor(r.ids[shared:])
        labels[i, :n] = torch.tensor(r.labels[shared:])
        attention[i, shared:shared + n] = 1
    hidden = causal_lm.model(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                             past_key_values=cache, use_cache=cache is not None).last_hidden_state
    targets = labels[:, 1:].to(device)
    keep = targets != IGNORE
    logits = causal_lm.lm_head(hidden[:, :-1][keep]).float()
    row_of = torch.arange(len(rows), device=device)[:, None].expand_as(targets)[keep]
    return logits, targets[keep], row_of


def train(model, params, examples: Sequence[Example], settings: TrainSettings,
          on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """AdamW on ``params`` for ``settings.steps`` steps over ``examples``; returns each step's loss.

    ``model`` is a PEFT model or a causal LM whose trainable parameters are ``params``.
    ``on_step(step, loss)`` is called after every optimizer step (progress bars, logs).
    """
    import torch
    import torch.nn.functional as F

    if not examples:
        raise ValueError("no training examples")
    params = list(params)
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, settings.steps, settings.warmup_fraction, settings.min_lr_ratio))
    micro = batches(len(examples), settings.batch_size, settings.steps * settings.grad_accum, settings.seed)
    model.train()
    losses: list[float] = []
    try:
        for step in range(settings.steps):
            group = [[examples[i] for i in b] for b in micro[step * settings.grad_accum:(step + 1) * settings.grad_accum]]
            total = sum(r.num_labels - (r.labels[0] != IGNORE) for rows in group for r in rows)
            step_loss = 0.0
            for rows in group:
                logits, targets, _ = labelled_logits(model, rows)
                loss = F.cross_entropy(logits, targets, reduction="sum") / total
                loss.backward()
                step_loss += loss.item()
            if settings.clip:
                torch.nn.utils.clip_grad_norm_(params, settings.clip)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if not math.isfinite(step_loss):
                raise ValueError(f"the training loss became {step_loss} at step {step + 1}; lower --lr")
            losses.append(step_loss)
            if on_step is not None:
                on_step(step, step_loss)
    finally:
        model.eval()
    return losses


@dataclasses.dataclass(frozen=True)
class EvalResult:
    loss: float  # mean cross-entropy per labelled token
    exact_match: float  # fraction of examples whose target greedy decoding reproduces exactly
    examples: int
    tokens: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def evaluate(model, examples: Sequence[Example], batch_size: int = 8) -> EvalResult:
    import torch
    import torch.nn.functional as F

    loss_sum, tokens, matched = 0.0, 0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                rows = list(examples[start:start + batch_size])
                logits, targets, row_of = labelled_logits(model, rows)
                loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
                tokens += targets.numel()
                right = logits.argmax(-1) == targets
                for i, r in enumerate(rows):
                    # positions (in the shifted targets) that belong to this row's target span
                    mine = right[row_of == i]
                    in_target = _target_mask(r)
                    matched += bool(mine[in_target].all())
    finally:
        model.train(was_training)
    return EvalResult(loss_sum / max(tokens, 1), matched / len(examples), len(examples), tokens)


def _target_mask(r: Example):
    """Among a row's labelled positions (after the shift by one), those of its target span."""
    import torch

    positions = [j for j in range(1, len(r.labels)) if r.labels[j] != IGNORE]
    return torch.tensor([j >= r.target_start for j in positions], dtype=torch.bool)
