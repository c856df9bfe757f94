"""`lorafleet finetune` as a function: read the data, train (LoRA or sparse LoRA), evaluate before
and after, save a PEFT adapter folder with a JSON report in it, and optionally load it into a
running server."""
from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

from .data import ON_BAD_LINE, DataError, read_jsonl
from .model import ALL_TARGETS, DTYPES, TARGETS
from .sparse import MASKS

METHODS = ("lora", "sparse-lora")
REPORT = "finetune_report.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
INSTALL_HINT = "pip install lorafleet[train]"


class FinetuneError(ValueError):
    """A problem with the user's input or environment; the message says what to fix."""


@dataclasses.dataclass
class FinetuneConfig:
    model: str
    data: str
    output: str
    eval: str | None = None
    rank: int = 16
    alpha: float | None = None  # default: 2 * rank
    targets: tuple[str, ...] = ALL_TARGETS
    rslora: bool = False
    epochs: float | None = None  # default 3 when max_steps is not given either
    max_steps: int | None = None
    lr: float = 2e-4
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int | None = None  # default: the model's context, at most 2048
    seed: int = 0
    dtype: str = "float32"
    device: str = "auto"
    method: str = "lora"
    density: float | None = None  # sparse-lora only; default 0.01
    mask: str = "random"
    sparse_steps: int | None = None  # sparse-lora: stage-1 steps out of the total; default half
    sparse_lr: float | None = None  # sparse-lora: stage-1 learning rate; default lr
    on_bad_line: str = "error"
    overwrite: bool = False
    push_to: str | None = None
    push_name: str | None = None  # default: the output folder's name
    push_path: str = ""  # relative to the server's adapters folder; default: the name
    admin_token_file: str | None = None
    tls_ca: str | None = None
    progress: bool = True

    def check(self) -> None:
        def positive(name, value, kind=int):
            if value is not None and (not isinstance(value, (int, float)) or value <= 0 or (kind is int and int(value) != value)):
                raise FinetuneError(f"--{name.replace('_', '-')} must be a positive {'integer' if kind is int else 'number'}, got {value}")

        for name in ("rank", "max_steps", "batch_size", "grad_accum", "sparse_steps"):
            positive(name, getattr(self, name))
        for name in ("alpha", "epochs", "lr", "sparse_lr"):
            positive(name, getattr(self, name), float)
        if self.max_length is not None and self.max_length < 2:
            raise FinetuneError(f"--max-length must be at least 2 tokens, got {self.max_length}")
        if self.epochs is not None and self.max_steps is not None:
            raise FinetuneError("give --epochs or --max-steps, not both")
        if self.method not in METHODS:
            raise FinetuneError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.method != "sparse-lora":
            given = [f for f, v in (("--density", self.density), ("--sparse-steps", self.sparse_steps),
                                    ("--sparse-lr", self.sparse_lr)) if v is not None]
            if given:
                raise FinetuneError(f"{', '.join(given)} apply to --method sparse-lora only")
        if self.density is not None and not 0 < self.density <= 1:
            raise FinetuneError(f"--density must be in (0, 1] (e.g. 0.01 for 1% of each weight), got {self.density}")
        if self.mask not in MASKS:
            raise FinetuneError(f"--mask must be one of {', '.join(MASKS)}, got {self.mask!r}")
        if self.dtype not in DTYPES:
            raise FinetuneError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.on_bad_line not in ON_BAD_LINE:
            raise FinetuneError(f"--on-bad-line must be one of {', '.join(ON_BAD_LINE)}, got {self.on_bad_line!r}")
        bad = [t for t in self.targets if t not in ALL_TARGETS]
        if bad or not self.targets:
            raise FinetuneError(f"targets must be among {', '.join(TARGETS)}, got {list(self.targets)}")
        if self.push_to is None and (self.push_name or self.push_path or self.admin_token_file):
            raise FinetuneError("--push-name, --push-path and --admin-token-file go with --push-to SERVER")
        if self.admin_token_file is not None and not Path(self.admin_token_file).is_file():
            raise FinetuneError(f"--admin-token-file {self.admin_token_file}: no such file")


@dataclasses.dataclass
class FinetuneResult:
    adapter: Path
    report: dict
    sparse_updates: list | None = None  # sparse-lora: stage 1's [SparseUpdate]
    initial_lora: dict | None = None  # sparse-lora: module name -> (A, B) at the start of stage 2


def _quiet_libraries() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # weight-loading bars; ours is the training bar


def require_train_packages() -> None:
    missing = []
    for name in ("transformers", "peft"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise FinetuneError(f"lorafleet finetune needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                            f"not installed: {INSTALL_HINT}")


def _say(message: str) -> None:
    print(f"lorafleet finetune: {message}", file=sys.stderr, flush=True)


def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise FinetuneError(f"--output {output} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise FinetuneError(f"--output {output} is not empty; pass --overwrite to replace it")


def _max_length(model_dir: Path, given: int | None) -> int:
    if given is not None:
        return given
    cfg = json.loads((model_dir / "config.json").read_text())
    return min(2048, int(cfg.get("max_position_embeddings") or 2048))


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, file=sys.stderr, disable=not enabled, dynamic_ncols=True, leave=True)

    def on_step(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")

    return bar, on_step


def _publish(partial: Path, output: Path) -> None:
    """Swap the finished folder in, so a server never sees half an adapter."""
    old = output.parent / f".{output.name}.old"
    if old.exists():
        shutil.rmtree(old)
    if output.exists():
        os.replace(output, old)
    os.replace(partial, output)
    if old.exists():
        shutil.rmtree(old)


def push_adapter(target: str, name: str, path: str, token_file: str | None, tls_ca: str | None,
                 timeout: float = 300.0):
    """Loads the adapter into a running server, replacing a loaded one of the same name."""
    import grpc

    from ..client.sdk import Client, LoraFleetError

    token = Path(token_file).read_text().strip() if token_file else None
    with Client(target, tls_ca=tls_ca, admin_token=token, timeout=timeout) as client:
        try:
            client.unload_adapter(name)  # the server may hold older weights under this name
            replaced = True
        except LoraFleetError as e:
            if e.code != grpc.StatusCode.NOT_FOUND:
                raise
            replaced = False
        return client.load_adapter(name, path), replaced


def finetune(config: FinetuneConfig) -> FinetuneResult:
    config.check()
    require_train_packages()
    _quiet_libraries()
    from .model import check_model_dir

    started = time.monotonic()
    model_dir = check_model_dir(config.model).resolve()
    output = Path(config.output).resolve()
    _check_output(output, config.overwrite)
    push_name = config.push_name or output.name

    import torch

    from . import loop, model, sparse

    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = model.load_tokenizer(model_dir)
    max_length = _max_length(model_dir, config.max_length)
    warn = _say
    train_set = read_jsonl(config.data, tokenizer, max_length, config.on_bad_line, warn)
    eval_set = read_jsonl(config.eval, tokenizer, max_length, config.on_bad_line, warn) if config.eval else None
    examples = train_set.examples
    _say(f"{len(examples)} training examples from {config.data}"
         + (f" ({len(train_set.bad)} bad lines skipped)" if train_set.bad else "")
         + (f", {len(eval_set.examples)} eval examples from {config.eval}" if eval_set else ""))

    total = config.max_steps or loop.steps_for_epochs(len(examples), config.epochs or 3.0,
                                                      config.batch_size, config.grad_accum)
    alpha = config.alpha if config.alpha is not None else 2.0 * config.rank
    scale = model.lora_scale(config.rank, alpha, config.rslora)
    steps1 = 0
    if config.method == "sparse-lora":
        if total < 2:
            raise FinetuneError("--method sparse-lora needs at least 2 steps (one per stage); raise --max-steps or --epochs")
        steps1 = config.sparse_steps if config.sparse_steps is not None else total // 2
        if not 1 <= steps1 < total:
            raise FinetuneError(f"--sparse-steps must be between 1 and {total - 1} (the total is {total} steps)")
    base = model.load_base(model_dir, config.dtype, device)
    if config.method == "sparse-lora":
        sparse.check_rank(base, config.targets, config.rank)
    else:
        model.target_linears(base, config.targets)

    def measure(m) -> dict:
        out = {"train": loop.evaluate(m, examples, config.batch_size).as_dict()}
        if eval_set is not None:
            out["eval"] = loop.evaluate(m, eval_set.examples, config.batch_size).as_dict()
        return out

    before = measure(base)  # the base model: a fresh LoRA (B = 0) computes exactly this
    report: dict = {
        "method": config.method,
        "model": str(model_dir),
        "data": str(Path(config.data).resolve()),
        "eval_data": str(Path(config.eval).resolve()) if config.eval else None,
        "examples": {"train": len(examples), "eval": len(eval_set.examples) if eval_set else 0,
                     "skipped_lines": [dataclasses.asdict(b) for b in train_set.bad]
                     + ([dict(dataclasses.asdict(b), file="eval") for b in eval_set.bad] if eval_set else [])},
        "lora": {"r": config.rank, "lora_alpha": alpha, "use_rslora": config.rslora, "scale": scale,
                 "target_modules": list(config.targets)},
        "training": {"steps": total, "lr": config.lr, "batch_size": config.batch_size,
                     "grad_accum": config.grad_accum, "max_length": max_length, "seed": config.seed,
                     "dtype": config.dtype, "device": device},
    }
    result = FinetuneResult(adapter=output, report=report)
    settings = dict(lr=config.lr, batch_size=config.batch_size, grad_accum=config.grad_accum, seed=config.seed)
    if config.method == "sparse-lora":
        density = config.density if config.density is not None else 0.01
        stage1 = loop.TrainSettings(steps=steps1, **dict(settings, lr=config.sparse_lr or config.lr))
        bar, on_step = _progress(steps1, config.progress, "sparse stage")
        try:
            updates, losses1 = sparse.sparse_stage(base, examples, config.targets, density, config.mask, stage1, on_step)
        finally:
            bar.close()
        peft_model = model.peft_lora_model(base, config.rank, alpha, config.targets, config.rslora, config.seed)
        energies = sparse.init_lora_from_sparse(peft_model, updates, config.rank, scale)
        result.sparse_updates = updates
        result.initial_lora = {
            name: (peft_model.get_base_model().get_submodule(name).lora_A["default"].weight.detach().clone().cpu(),
                   peft_model.get_base_model().get_submodule(name).lora_B["default"].weight.detach().clone().cpu())
            for name in (u.name for u in updates)}
        at_init = loop.evaluate(peft_model, examples, config.batch_size).loss
        stage2 = loop.TrainSettings(steps=total - steps1, **settings)
        bar, on_step = _progress(stage2.steps, config.progress, "lora stage")
        try:
            losses2 = loop.train(peft_model, [p for p in peft_model.parameters() if p.requires_grad],
                                 examples, stage2, on_step)
        finally:
            bar.close()
        values = sum(u.values.numel() for u in updates)
        report["sparse"] = {
            "density": density, "mask": config.mask, "stage1_steps": steps1, "stage2_steps": stage2.steps,
            "stage1_lr": stage1.lr, "trained_entries": values,
            "stage1_losses": losses1,
            "train_loss_after_stage1_svd_init": at_init,
            "svd_energy": {"min": min(energies.values()), "mean": sum(energies.values()) / len(energies)},
        }
        losses = losses1 + losses2
    else:
        peft_model = model.peft_lora_model(base, config.rank, alpha, config.targets, config.rslora, config.seed)
        bar, on_step = _progress(total, config.progress, "finetune")
        try:
            losses = loop.train(peft_model, [p for p in peft_model.parameters() if p.requires_grad],
                                examples, loop.TrainSettings(steps=total, **settings), on_step)
        finally:
            bar.close()
    after = measure(peft_model)
    report["step_losses"] = losses
    report["before"], report["after"] = before, after
    report["seconds"] = round(time.monotonic() - started, 2)

    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.parent / f".{output.name}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    try:
        save_adapter(peft_model, partial, model_dir)
        report["adapter"] = str(output)
        _write_report(partial, report)
        _publish(partial, output)
    finally:
        if partial.exists():
            shutil.rmtree(partial)
    _summary(report)
    _say(f"adapter saved to {output} (report: {output / REPORT})")

    if config.push_to:
        from ..client.sdk import LoraFleetError

        try:
            info, replaced = push_adapter(config.push_to, push_name, config.push_path, config.admin_token_file, config.tls_ca)
        except LoraFleetError as e:
            raise FinetuneError(f"loading the adapter into {config.push_to} failed: {e.code.name}: {e.message} "
                                f"(the adapter is saved in {output})") from None
        report["pushed"] = {"server": config.push_to, "name": info.name, "rank": info.rank,
                            "residence": info.residence, "replaced": replaced}
        _write_report(output, report)
        _say(f"{'replaced' if replaced else 'loaded'} adapter {info.name!r} on {config.push_to}: try "
             f"lorafleet generate --target {config.push_to} --adapter {info.name} ...")
    return result


def save_adapter(peft_model, folder: Path, model_dir: Path) -> None:
    """PEFT's save_pretrained (safetensors), with the base model's path, without PEFT's generic card."""
    peft_model.save_pretrained(str(folder), safe_serialization=True)
    config_path = folder / "adapter_config.json"
    cfg = json.loads(config_path.read_text())
    cfg["base_model_name_or_path"] = str(model_dir)
    config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (folder / "README.md").unlink(missing_ok=True)
    for path in folder.iterdir():
        path.chmod(0o644)  # safetensors writes its file owner-only
    missing = [n for n in ADAPTER_FILES if not (folder / n).is_file()]
    if missing:
        raise FinetuneError(f"PEFT did not write {', '.join(missing)}")


def _write_report(folder: Path, report: dict) -> None:
    tmp = folder / f".{REPORT}.partial"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, folder / REPORT)


def _summary(report: dict) -> None:
    b, a = report["before"], report["after"]
    _say(f"train loss {b['train']['loss']:.4f} -> {a['train']['loss']:.4f}, "
         f"exact-match {b['train']['exact_match']:.1%} -> {a['train']['exact_match']:.1%}")
    if "eval" in b:
        _say(f"eval  loss {b['eval']['loss']:.4f} -> {a['eval']['loss']:.4f}, "
             f"exact-match {b['eval']['exact_match']:.1%} -> {a['eval']['exact_match']:.1%}")
    if math.isnan(a["train"]["loss"]):
        raise FinetuneError("the trained adapter gives a NaN loss; lower --lr")


__all__ = ["FinetuneConfig", "FinetuneError", "FinetuneResult", "finetune", "require_train_packages",
           "push_adapter", "save_adapter", "DataError"]
