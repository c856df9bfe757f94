"""`make gpu-check`: the CUDA path on a real GPU, in under 8 minutes, one summary line per check.

1. kernels: the Triton kernels compiled for the GPU (TRITON_INTERPRET off) against the torch
   references, in bfloat16 and float16: LoRA shrink/expand (segment and token kernels) with mixed
   ranks, missing targets, shuffled pages and an all-gathered (TP) expand; paged attention and
   write_kv for prefill, decode and mixed steps, grouped-query ratios 1 and 4, head_dim 64 and 128.
   The cases are the ones tests/kernels builds (tests/kernels/conftest.py).
2. engine: lorafleet's engine on CUDA against transformers + PEFT on CUDA, for a tiny random
   Llama and its adapters (tests/peers.py builds both, tests/engines.py runs the engine): float32
   must be token-for-token equal; bfloat16's agreement on the first 8 tokens is reported.
3. offline: bench/offline.py's requests and adapters (bench/adapter_sets.py: q/k/v/o, rank 8/16) through the engine on
   CUDA, bfloat16, for a random ~1B-parameter Llama (TinyLlama's shape), with 0 / 8 / 64 adapters:
   output tokens per second.

With no CUDA device it says so in one line and exits with 2. Exit 1 when a check fails.

    .venv/bin/python bench/gpu_check.py [--only kernels engine offline] [--workdir DIR]
"""
from __future__ import annotations

import os

if __name__ == "__main__":  # before anything imports triton: compile for the GPU, for real (tests import
    os.environ["TRITON_INTERPRET"] = "0"  # this module beside the interpreter, so only when run)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
for folder in (REPO / "tests", REPO / "bench"):  # peers, engines (tests/) and offline (bench/)
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

CHECKS = ("kernels", "engine", "offline")
# The kernel tolerances of tests/kernels (test_triton_lora.py, test_triton_attention.py).
LORA_TOLERANCE = {torch.bfloat16: dict(atol=5e-2, rtol=3e-2), torch.float16: dict(atol=1e-2, rtol=1e-2)}
ATTENTION_TOLERANCE = {torch.bfloat16: dict(atol=4e-2, rtol=2e-2), torch.float16: dict(atol=5e-3, rtol=5e-3)}
# TinyLlama-1.1B's shape with the test tokenizer's 264 tokens: 0.99 B parameters.
ONE_B = dict(hidden=2048, intermediate=5632, layers=22, num_heads=32, num_kv_heads=4, max_position_embeddings=2048)


def no_cuda_message() -> str | None:
    """The one line printed when this machine cannot run the check, or None when it can."""
    if not torch.cuda.is_available():
        return f"gpu-check: no CUDA device (torch {torch.__version__}, torch.cuda.is_available() is False): nothing checked"
    return None


def load_module(name: str, path: Path):
    """A module from a file path (tests/kernels/conftest.py and tests/conftest.py share a name)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def to_device(obj, device):
    """A copy of a test case (dataclasses of tensors, dicts, lists) with every tensor on `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_device(v, device) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        # fields named _x are caches built from the tensors (CPU plans, checked tables): start them afresh
        changes = {f.name: f.default if f.name.startswith("_") else to_device(getattr(obj, f.name), device)
                   for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **changes)
    return obj


def close(got: torch.Tensor, want: torch.Tensor, tol: dict) -> str | None:
    """None when got is within tol of want (both compared in float32 on the CPU), else why not."""
    try:
        torch.testing.assert_close(got.detach().float().cpu(), want.detach().float().cpu(), **tol)
    except AssertionError as e:
        return str(e).splitlines()[0] + " " + " ".join(str(e).splitlines()[1:3])
    return None


# ---------------------------------------------------------------- 1. kernels


def lora_cases(cases_module):
    """(label, case on the CPU, mode) for the LoRA kernels, in each dtype."""
    build, tokens_of = cases_module.build_lora_case, cases_module.tokens_of
    prefill = tokens_of([(0, 40), (-1, 3), (1, 1), (2, 5), (-1, 1), (0, 1)])
    decode = tokens_of([(1, 1), (-1, 1), (0, 1), (2, 1), (2, 1), (-1, 1), (0, 1), (1, 1)])
    gen = torch.Generator().manual_seed(16)
    choices = torch.tensor([0, 1, 8, 16, 64, 128])
    mixed = choices[torch.randint(0, len(choices), (16, 3), generator=gen)].tolist()
    mixed[0] = [1, 0, 128]
    many = torch.randint(-1, 16, (64,), generator=gen).tolist()
    for dtype in LORA_TOLERANCE:
        name = str(dtype).replace("torch.", "")
        for mode, tokens in (("segment", prefill), ("token", decode)):
            for rank in (8, 64):
                yield f"lora {name} {mode} rank {rank}", build([[rank] * 3] * 3, tokens, dtype=dtype, seed=rank), mode
            yield (f"lora {name} {mode} mixed ranks", build(mixed, many, dtype=dtype, layout="interleaved", seed=3,
                                                             in_dim=256, out_dims=(256, 64, 64), page_dim=384), mode)
        yield (f"lora {name} tp-gathered expand", build([[4, 0, 8], [16, 8, 2]], prefill[:12], dtype=dtype,
                                                         max_rank=20, shards=2, seed=13), "segment")


def check_lora(case, mode: str, device: str = "cuda", kernels=None) -> str | None:
    """kernels: the module with shrink/expand(..., mode=) under test (kernels/triton_lora.py)."""
    from lorafleet.kernels.lora import _expand_reference, _shrink_reference

    if kernels is None:
        from lorafleet.kernels import triton_lora as kernels

    tol = LORA_TOLERANCE[case.x.dtype]
    cpu32 = dataclasses.replace(case, x=case.x.float(), y=case.y.float(), pool=case.pool.float())
    want_s = _shrink_reference(cpu32.x, cpu32.pool, cpu32.batch, cpu32.group)
    gpu = to_device(case, device)
    s = kernels.shrink(gpu.x, gpu.pool, gpu.batch, gpu.group, mode=mode)
    if case.group.shards == 1:
        problem = close(s, want_s, tol)
        if problem:
            return "shrink: " + problem
        s_in = want_s.to(case.x.dtype)
    else:  # the TP expand takes an all-gathered s of its own shape
        s_in = torch.randn(case.x.shape[0], len(case.group.out_dims), case.group.shards * case.group.max_rank,
                           generator=torch.Generator().manual_seed(5)).to(case.x.dtype)
    want_y = _expand_reference(cpu32.y.clone(), s_in.float(), cpu32.pool, cpu32.batch, cpu32.group)
    y = gpu.y.clone()
    kernels.expand(y, s_in.to(device), gpu.pool, gpu.batch, gpu.group, mode=mode)
    problem = close(y, want_y, tol)
    return "expand: " + problem if problem else None


def attention_cases(cases_module):
    steps = {"prefill": [(70, 70), (40, 23), (2, 2)], "decode": [(5, 1), (1, 1), (37, 1), (9, 1), (300, 1)],
             "mixed": [(9, 1), (70, 30), (33, 1), (3, 3), (1, 1)]}
    for dtype in ATTENTION_TOLERANCE:
        name = str(dtype).replace("torch.", "")
        for step, seqs in steps.items():
            for ratio, head_dim in ((1, 64), (4, 128)):
                case = cases_module.build_attention_case(seqs, num_kv_heads=2, ratio=ratio, head_dim=head_dim,
                                                         dtype=dtype, seed=ratio)
                yield f"attention {name} {step} ratio {ratio} d {head_dim}", case
            # the worker's kept table: more rows and columns than the step uses, its rows shuffled, stale cells
            case = cases_module.build_attention_case(seqs, num_kv_heads=2, ratio=4, head_dim=128, extra_rows=9,
                                                     extra_cols=40, dtype=dtype, seed=5)
            yield f"attention {name} {step} ratio 4 d 128, rows of a larger table", case


def check_attention(case, device: str = "cuda", kernels=None) -> str | None:
    """kernels: the module with paged_attention and write_kv under test (kernels/triton_attention.py)."""
    from lorafleet.kernels.attention import _attention_reference

    if kernels is None:
        from lorafleet.kernels import triton_attention as kernels

    tol = ATTENTION_TOLERANCE[case.q.dtype]
    want = _attention_reference(case.q.float(), case.pool.float(), case.batch, case.num_kv_heads)
    gpu = to_device(case, device)
    problem = close(kernels.paged_attention(gpu.q, gpu.pool, gpu.batch, gpu.num_kv_heads), want, tol)
    if problem:
        return "paged_attention: " + problem
    # write_kv: the new tokens' K and V written again into a cleared copy of their pages land unchanged
    kv_size = case.num_kv_heads * case.q.shape[2]
    slots = gpu.batch.slots
    rows = gpu.pool[slots, :2 * kv_size].clone()
    pool = gpu.pool.clone()
    pool[slots] = 0
    k = rows[:, :kv_size].view(-1, case.num_kv_heads, case.q.shape[2])
    v = rows[:, kv_size:].view(-1, case.num_kv_heads, case.q.shape[2])
    kernels.write_kv(pool, k, v, slots)
    return None if torch.equal(pool[slots, :2 * kv_size], rows) else "write_kv: the pages differ from what was written"


def run_kernels(args) -> tuple[bool, str]:
    cases_module = load_module("lorafleet_kernel_cases", REPO / "tests" / "kernels" / "conftest.py")
    results = []
    for label, case, mode in lora_cases(cases_module):
        results.append((label, guarded(check_lora, case, mode)))
    for label, case in attention_cases(cases_module):
        results.append((label, guarded(check_attention, case)))
    failed = [(label, why) for label, why in results if why]
    for label, why in failed[:5]:
        print(f"  FAILED {label}: {why}", file=sys.stderr)
    return not failed, (f"{len(results) - len(failed)}/{len(results)} cases equal the torch reference "
                        f"(bfloat16 and float16; LoRA segment and token kernels, mixed ranks, shuffled pages, "
                        f"TP expand; paged attention and write_kv, GQA 1 and 4, d 64 and 128, rows of a larger table)")


def guarded(fn, *args) -> str | None:
    try:
        return fn(*args)
    except Exception as e:  # a compile error is a failed case, reported with the others
        return f"{type(e).__name__}: {e}".splitlines()[0] + "\n" + traceback.format_exc(limit=-2)


# ---------------------------------------------------------------- 2. engine against PEFT


def peft_greedy_on(device: str, model_dir, adapter_dir, prompt: list[int], n: int, dtype: torch.dtype) -> list[int]:
    """tests/peers.py's oracle (the same cached transformers + PEFT model, copied) run on `device`."""
    import peers

    model = copy.deepcopy(peers.load_peer_model(model_dir, adapter_dir, dtype)).to(device)
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                             max_new_tokens=n, eos_token_id=None, pad_token_id=peers.PAD_ID, temperature=None,
                             top_p=None, top_k=None, repetition_penalty=None)
    return out[0, ids.shape[1]:].tolist()


def run_engine(args, device: str = "cuda") -> tuple[bool, str]:
    import engines
    import peers

    specs = load_module("lorafleet_test_fixtures", REPO / "tests" / "conftest.py")
    root = Path(args.workdir) / "engine"
    model = peers.make_tiny_model(root / "model", **specs.TINY_MODEL_SPECS["llama_gqa"])
    adapters = {name: peers.make_adapter(model, root / "adapters" / name, seed=100 + i, **kw)
                for i, (name, kw) in enumerate(specs.TINY_ADAPTER_SPECS.items())}
    rng = random.Random(0)
    names = [None, *adapters]
    requests = [(names[i % len(names)], [rng.randrange(3, 250) for _ in range(rng.randrange(1, 40))], rng.randrange(4, 20))
                for i in range(2 * len(names))]
    join_at = [rng.randrange(0, 6) for _ in requests]
    results = {}
    for dtype in ("float32", "bfloat16"):
        engine = engines.make_engine(model, root / "adapters", device=device, dtype=dtype, pool_bytes=256 * 2**20)
        try:
            got = engines.generate(engine, requests, join_at)
        finally:
            engine.shutdown()
        want = [peft_greedy_on(device, model, adapters[a] if a else None, p, n, getattr(torch, dtype))
                for a, p, n in requests]
        k = 8 if dtype == "bfloat16" else None
        results[dtype] = sum(g[:k] == w[:k] for g, w in zip(got, want))
    total = len(requests)
    return results["float32"] == total, (
        f"float32: {results['float32']}/{total} requests token-for-token equal to PEFT on {device} "
        f"(tiny GQA Llama, {len(adapters)} adapters of ranks 1-64 and base-only, joining at different steps); "
        f"bfloat16: {results['bfloat16']}/{total} agree on their first 8 tokens")


# ---------------------------------------------------------------- 3. the offline benchmark


def run_offline(args, device: str = "cuda", shape: dict = ONE_B) -> tuple[bool, str]:
    import offline
    import peers

    from lorafleet.coordinator.config import EngineConfig
    from lorafleet.coordinator.engine import Engine

    work = Path(args.workdir) / "offline"
    model = work / "llama-1b"
    if not (model / "config.json").is_file():
        peers.make_tiny_model(model, **shape, seed=7)
    lines, ok = [], True
    for count in args.adapters:
        cfg = offline.BenchConfig(model=str(model), workdir=str(work), adapters=max(count, 1), requests=args.requests,
                                  dtype="bfloat16", max_num_seqs=args.max_num_seqs)
        adapters = offline.adapter_set(cfg).make(cfg.workdir, count) if count else None
        requests = offline.make_requests(cfg, offline.vocab_size(str(model)))
        if not count:
            requests = offline.without_adapters(requests)
        engine = Engine(EngineConfig(model_dir=str(model), adapters_dir=str(adapters) if adapters else None,
                                     dtype="bfloat16", device=device, pool_bytes=None if device == "cuda" else 256 * 2**20,
                                     pool_fraction=0.5, max_num_seqs=args.max_num_seqs, prefix_cache=False))
        try:
            offline.run_lorafleet_inprocess(engine, "warm-up", requests[:8], None)
            run = offline.run_lorafleet_inprocess(engine, f"{count} adapters", requests, None)
        except SystemExit as e:  # a failed or short request
            ok = False
            lines.append(f"{count} adapters: {e}")
            continue
        finally:
            engine.shutdown()
        lines.append(f"{count} adapters {run.tokens_per_s:.0f} tok/s ({run.tokens} tokens, {run.seconds:.1f} s)")
    return ok, (f"bfloat16, random {llama_parameters(shape) / 1e9:.2f}B-parameter Llama, {args.requests} requests "
                f"(warm-up excluded): " + "; ".join(lines))


def llama_parameters(shape: dict, vocab_size: int = 264) -> int:
    """Parameters of a Llama of make_tiny_model's keyword arguments (untied embeddings, no biases)."""
    h, i, heads, kv = shape["hidden"], shape["intermediate"], shape["num_heads"], shape["num_kv_heads"]
    head_dim = h // heads
    layer = h * (heads + 2 * kv) * head_dim + heads * head_dim * h + 3 * h * i + 2 * h
    return shape["layers"] * layer + 2 * vocab_size * h + h


# ---------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=CHECKS, default=list(CHECKS))
    p.add_argument("--workdir", default=None, help="where the models and adapters go (default: a temporary folder)")
    p.add_argument("--adapters", type=int, nargs="+", default=[0, 8, 64], help="adapter counts of the offline check")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--max-num-seqs", type=int, default=64)
    args = p.parse_args(argv)
    if args.requests < 1 or args.max_num_seqs < 1 or min(args.adapters) < 0:
        p.error("--requests and --max-num-seqs must be at least 1, adapter counts at least 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    message = no_cuda_message()
    if message:
        print(message)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("gpu-check: TRITON_INTERPRET is set: run bench/gpu_check.py itself, so the kernels are compiled")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 on both sides of the engine check
    print(f"gpu-check on {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    failed = 0
    with tempfile.TemporaryDirectory(prefix="lorafleet-gpu-check-") as tmp:
        args.workdir = args.workdir or tmp
        for name in args.only:
            start = time.perf_counter()
            try:
                ok, summary = {"kernels": run_kernels, "engine": run_engine, "offline": run_offline}[name](args)
            except Exception as e:
                traceback.print_exc()
                ok, summary = False, f"crashed: {type(e).__name__}: {e}"
            failed += not ok
            print(f"{'PASS' if ok else 'FAIL'} {name} ({time.perf_counter() - start:.0f} s): {summary}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
