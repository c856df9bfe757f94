"""The arguments of `lorafleet finetune` (torch-free, so building the parser costs nothing) and the
command itself."""
from __future__ import annotations

import argparse

from .data import ON_BAD_LINE
from .model import DTYPES, parse_targets
from .run import METHODS, FinetuneConfig, finetune
from .sparse import MASKS


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def _density(text: str) -> float:
    value = _positive(float)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"is a fraction of each weight in (0, 1], e.g. 0.01; got {text}")
    return value


def _targets(text: str) -> tuple[str, ...]:
    try:
        return parse_targets(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_finetune_args(p: argparse.ArgumentParser) -> None:
    p.description = ("Train a LoRA adapter (PEFT format) on a JSONL file of {\"prompt\", \"completion\"} or "
                     "{\"messages\": [...]} lines; the loss covers only the completion / the assistant turns. "
                     "Needs: pip install lorafleet[train]")
    p.add_argument("--model", required=True, help="Hugging Face base model folder (the one the server serves)")
    p.add_argument("--data", required=True, help="training data, JSONL")
    p.add_argument("--output", required=True, help="adapter folder to write (a subfolder of the server's --adapters to serve it)")
    p.add_argument("--eval", default=None, help="eval data, JSONL: loss and greedy exact-match before and after")
    p.add_argument("--on-bad-line", choices=ON_BAD_LINE, default="error",
                   help="a bad data line stops the run (error, the default) or is reported and skipped (skip)")
    lora = p.add_argument_group("LoRA")
    lora.add_argument("--rank", type=_positive(int), default=16, help="LoRA rank r (default 16)")
    lora.add_argument("--alpha", type=_positive(float), default=None, help="lora_alpha (default 2 * rank)")
    lora.add_argument("--targets", type=_targets, default=parse_targets("all"),
                      help="comma-separated among q,k,v,o,gate,up,down (default: all seven)")
    lora.add_argument("--rslora", action="store_true", help="scale alpha/sqrt(r) instead of alpha/r")
    train = p.add_argument_group("training")
    length = train.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=_positive(float), default=None, help="passes over the data (default 3)")
    length.add_argument("--max-steps", type=_positive(int), default=None, help="optimizer steps instead of epochs")
    train.add_argument("--lr", type=_positive(float), default=2e-4, help="peak learning rate (default 2e-4)")
    train.add_argument("--batch-size", type=_positive(int), default=4)
    train.add_argument("--grad-accum", type=_positive(int), default=1, help="micro-batches per optimizer step")
    train.add_argument("--max-length", type=_positive(int), default=None,
                       help="tokens per example at most; longer ones are cut (default: the model's context, <= 2048)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--dtype", choices=DTYPES, default="float32", help="base model dtype while training")
    train.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    method = p.add_argument_group("method")
    method.add_argument("--method", choices=METHODS, default="lora",
                        help="lora, or sparse-lora: a sparse stage, then LoRA from its truncated SVD (SLoRA)")
    method.add_argument("--density", type=_density, default=None,
                        help="sparse-lora: fraction of each targeted weight the sparse stage trains (default 0.01)")
    method.add_argument("--mask", choices=MASKS, default="random",
                        help="sparse-lora: which entries: a fixed random mask or the largest-magnitude ones")
    method.add_argument("--sparse-steps", type=_positive(int), default=None,
                        help="sparse-lora: steps of the sparse stage, out of the total (default half)")
    method.add_argument("--sparse-lr", type=_positive(float), default=None,
                        help="sparse-lora: learning rate of the sparse stage (default --lr)")
    push = p.add_argument_group("loading into a running server")
    push.add_argument("--push-to", default=None, metavar="HOST:PORT",
                      help="when done, load the adapter into this server (LoadAdapter), replacing one of the same name")
    push.add_argument("--push-name", default=None, help="the adapter's name there (default: the --output folder's name)")
    push.add_argument("--push-path", default="", help="its folder relative to the server's adapters folder (default: the name)")
    push.add_argument("--admin-token-file", default=None, help="file holding the server's admin token")
    push.add_argument("--tls-ca", default=None, metavar="PEM", help="CA of the server's TLS certificate")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder")


def config_from_args(args) -> FinetuneConfig:
    return FinetuneConfig(
        model=args.model, data=args.data, output=args.output, eval=args.eval, rank=args.rank, alpha=args.alpha,
        targets=args.targets, rslora=args.rslora, epochs=args.epochs, max_steps=args.max_steps, lr=args.lr,
        batch_size=args.batch_size, grad_accum=args.grad_accum, max_length=args.max_length, seed=args.seed,
        dtype=args.dtype, device=args.device, method=args.method, density=args.density, mask=args.mask,
        sparse_steps=args.sparse_steps, sparse_lr=args.sparse_lr, on_bad_line=args.on_bad_line,
        overwrite=args.overwrite, push_to=args.push_to, push_name=args.push_name, push_path=args.push_path,
        admin_token_file=args.admin_token_file, tls_ca=args.tls_ca, progress=not args.quiet,
    )


def run(args) -> int:
    finetune(config_from_args(args))
    return 0
