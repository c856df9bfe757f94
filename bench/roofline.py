"""Roofline report: how close one engine step comes to this machine's matmul peak, and where its time goes.

For each --dtype, in one run (so the ratios between dtypes see the same machine):

1. the measured matmul peak: the engine's matmul (kernels/ops.py `linear`: F.linear, or oneDNN
   with the weight packed once where it packs) at the model's own projection shapes (q+k+v, o,
   gate+up, down, lm_head) for T = 16 .. 512 rows, in GFLOP/s; the peak is the best of them;
2. two steps of the real engine (coordinator/engine.py, in process, as `lorafleet run` drives it):
   a prefill-heavy step (--prefill-seqs prompts of --prompt-len tokens at once) and a decode-only
   step (--decode-seqs sequences, one token each), base model only or with --adapters;
   for each, the model FLOPs of the step (projections, attention, lm_head, LoRA), its time (the
   median of --repeats steps), and the achieved fraction of the peak;
3. a per-op time breakdown of one step: matmuls (`linear`), attention (write_kv + paged
   attention), LoRA (add_column_lora and each layer's row_output, whose all-reduce is a no-op at
   tp 1), norms/rotary/activation (add_rms_norm_ with the residual adds fused in, rotary,
   silu_mul, embedding, the cos/sin tables), sampling, host (schedule, Step -> tensors,
   postprocess) and the rest (splits, Python between the ops). Timers wrap the functions
   worker/model.py and worker/worker.py call, by rebinding their module-level names in this
   process only: nothing in the serving path changes, and nothing is timed when this script is
   not running. The timers add about 1 us per call (~300 calls per step of a 30-layer model).

Prints a table and writes it to --out (bench/results/roofline.md).

    .venv/bin/python bench/roofline.py --model cache/smollm2-135m-instruct --dtype bfloat16 float32
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "tests") not in sys.path:  # tests/engines.py: record_steps
    sys.path.insert(0, str(REPO / "tests"))
from engines import record_steps  # noqa: E402

DEMO_MODEL = REPO / "cache" / "smollm2-135m-instruct"
ROWS = (16, 64, 128, 256, 512)
# What engine steps and their ops are timed by; bench/ops.py sets time.thread_time (one thread).
clock = time.perf_counter


# ---------------------------------------------------------------- the matmul peak


def projection_shapes(cfg) -> dict[str, tuple[int, int]]:
    """name -> (out_features, in_features) of the fused projections worker/model.py multiplies by."""
    return {
        "qkv": (cfg.q_size + 2 * cfg.kv_size, cfg.hidden_size),
        "o": (cfg.hidden_size, cfg.q_size),
        "gate_up": (2 * cfg.intermediate_size, cfg.hidden_size),
        "down": (cfg.hidden_size, cfg.intermediate_size),
        "lm_head": (cfg.vocab_size, cfg.hidden_size),
    }


def time_call(fn, repeats: int, min_seconds: float = 0.02) -> float:
    """Seconds per call: the median of `repeats` measurements of enough calls to last min_seconds."""
    fn()
    start, calls = time.perf_counter(), 0
    while calls < 1000 and time.perf_counter() - start < min_seconds:  # how many calls one measurement takes
        fn()
        calls += 1
    calls = max(calls, 1)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


def matmul_rates(cfg, dtype: torch.dtype, repeats: int) -> dict[tuple[str, int], float]:
    """(projection, rows) -> GFLOP/s of the engine's matmul in dtype (kernels/ops.py: linear, the weight packed where it packs)."""
    from lorafleet.kernels.ops import linear, pack_weight

    gen = torch.Generator().manual_seed(0)
    rates = {}
    for name, (out_f, in_f) in projection_shapes(cfg).items():
        w = pack_weight((torch.randn(out_f, in_f, generator=gen) * in_f ** -0.5).to(dtype))
        for rows in ROWS:
            x = torch.randn(rows, in_f, generator=gen).to(dtype)
            seconds = time_call(lambda: linear(x, w), repeats)
            rates[(name, rows)] = 2 * rows * in_f * out_f / seconds / 1e9
    return rates


# ---------------------------------------------------------------- FLOPs of a step


def step_flops(cfg, step, adapter_ranks: dict[str, dict[str, int]]) -> dict[str, float]:
    """FLOPs of one Step: the projections of every token, attention over each token's context,
    the lm_head of each sequence's last token, and each token's LoRA (2 r (in + out) per target)."""
    shapes = projection_shapes(cfg)
    layer_linear = sum(2 * o * i for name, (o, i) in shapes.items() if name != "lm_head")
    tokens = sum(len(w.token_ids) for w in step.seqs)
    # token k of a sequence sits at position start + k and attends to start + k + 1 keys: QK^T and PV
    keys = sum(w.start + k + 1 for w in step.seqs for k in range(len(w.token_ids)))
    attention = 4 * keys * cfg.num_heads * cfg.head_dim * cfg.num_layers
    dims = {"q_proj": (cfg.hidden_size, cfg.q_size), "k_proj": (cfg.hidden_size, cfg.kv_size),
            "v_proj": (cfg.hidden_size, cfg.kv_size), "o_proj": (cfg.q_size, cfg.hidden_size),
            "gate_proj": (cfg.hidden_size, cfg.intermediate_size), "up_proj": (cfg.hidden_size, cfg.intermediate_size),
            "down_proj": (cfg.intermediate_size, cfg.hidden_size)}
    lora = 0
    for w in step.seqs:
        for target, r in adapter_ranks.get(w.adapter, {}).items():
            lora += 2 * r * sum(dims[target]) * len(w.token_ids) * cfg.num_layers
    return {
        "tokens": tokens,
        "projections": layer_linear * tokens * cfg.num_layers,
        "lm_head": 2 * len(step.seqs) * shapes["lm_head"][0] * shapes["lm_head"][1],
        "attention": attention,
        "lora": lora,
    }


# ---------------------------------------------------------------- timers around the ops

OPS = ("matmul", "attention", "lora", "norm/rotary/activation", "sampling", "host")


class OpTimers:
    """Wall time per op kind, accumulated while `active` (CPU ops are synchronous, so wall time is theirs)."""

    def __init__(self):
        self.seconds = defaultdict(float)
        self.active = False

    def wrap(self, kind: str, fn):
        def timed(*args, **kwargs):
            if not self.active:
                return fn(*args, **kwargs)
            start = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[kind] += clock() - start

        timed.__wrapped__ = fn
        return timed


class _TimedFunctional:
    """Stands in for torch.nn.functional inside worker/model.py: the embedding is timed."""

    def __init__(self, timers: OpTimers):
        self.embedding = timers.wrap("norm/rotary/activation", F.embedding)

    def __getattr__(self, name):
        return getattr(F, name)


@contextmanager
def op_timers(engine):
    """Rebinds the names worker/model.py and worker/worker.py call (this process only); restores them."""
    from lorafleet.worker import model as model_module
    from lorafleet.worker import worker as worker_module

    timers = OpTimers()
    patches = [
        (model_module, "F", _TimedFunctional(timers)),
        (model_module, "linear", timers.wrap("matmul", model_module.linear)),
        (model_module, "paged_attention", timers.wrap("attention", model_module.paged_attention)),
        (model_module, "write_kv", timers.wrap("attention", model_module.write_kv)),
        (model_module, "add_column_lora", timers.wrap("lora", model_module.add_column_lora)),
        (model_module, "add_rms_norm_", timers.wrap("norm/rotary/activation", model_module.add_rms_norm_)),
        (model_module, "rotary", timers.wrap("norm/rotary/activation", model_module.rotary)),
        (model_module, "silu_mul", timers.wrap("norm/rotary/activation", model_module.silu_mul)),
        (worker_module, "sample", timers.wrap("sampling", worker_module.sample)),
        (worker_module, "forward_batch", timers.wrap("host", worker_module.forward_batch)),
        (engine.scheduler, "schedule", timers.wrap("host", engine.scheduler.schedule)),
        (engine.scheduler, "postprocess", timers.wrap("host", engine.scheduler.postprocess)),
    ]
    saved = [(obj, name, obj.__dict__.get(name, None), name in obj.__dict__) for obj, name, _ in patches]
    model = engine.executor.worker.model
    rope = model.rope
    model.rope = timers.wrap("norm/rotary/activation", rope)  # the cos/sin tables, once per step
    # o and down: each layer's row_output adds the LoRA delta (its all-reduce is a no-op at tp 1)
    row_outputs = [layer.row_output for layer in model.layers]
    for layer, fn in zip(model.layers, row_outputs):
        layer.row_output = timers.wrap("lora", fn)
    for obj, name, value in patches:
        setattr(obj, name, value)
    try:
        yield timers
    finally:
        del model.rope
        for layer, fn in zip(model.layers, row_outputs):
            layer.row_output = fn
        for obj, name, old, had in saved:
            if had:
                setattr(obj, name, old)
            else:
                delattr(obj, name)


# ---------------------------------------------------------------- steps of the real engine


def make_engine(model: str, adapters: str | None, dtype: str, max_num_seqs: int, max_batched_tokens: int,
                pool_bytes: int = 512 * 2**20):
    from lorafleet.coordinator.config import EngineConfig
    from lorafleet.coordinator.engine import Engine

    engine = Engine(EngineConfig(model_dir=model, adapters_dir=adapters, dtype=dtype, pool_bytes=pool_bytes,
                                 max_num_seqs=max_num_seqs, max_batched_tokens=max_batched_tokens))
    if engine.cfg.device != "cpu" or engine.cfg.tp != 1:
        raise SystemExit("bench/roofline.py times the in-process CPU engine (tp 1)")
    return engine


def adapter_names(adapters: str | None) -> list[str | None]:
    if adapters is None:
        return [None]
    names = sorted(p.name for p in Path(adapters).iterdir() if (p / "adapter_config.json").is_file())
    if not names:
        raise SystemExit(f"--adapters {adapters}: no PEFT adapter folders inside")
    return names


def adapter_ranks(engine, names) -> dict[str, dict[str, int]]:
    import json

    ranks = {}
    for name in names:
        if name is not None:
            cfg = json.loads((Path(engine.cfg.adapters_dir) / name / "adapter_config.json").read_text())
            ranks[name] = {t: cfg["r"] for t in cfg["target_modules"]}
    return ranks


def add_requests(engine, tag: str, count: int, prompt_len: int, new_tokens: int, names, rng: random.Random):
    from lorafleet.coordinator.sequence import Request

    vocab = engine.model.vocab_size
    return [admit(engine, Request(f"{tag}-{i}", [rng.randrange(10, vocab) for _ in range(prompt_len)], new_tokens,
                                  names[i % len(names)], ignore_eos=True)) for i in range(count)]


def admit(engine, request):
    """Reads the request's adapter on this thread first, as `lorafleet run` does (the engine admits
    only requests whose adapter is host-ready), stepping while host memory must free up."""
    for _ in range(10_000):
        if request.adapter is None or engine.ensure_adapter(request.adapter) is not None:
            return engine.add(request)
        engine.step()
    raise RuntimeError(f"adapter {request.adapter} never fit in host memory")


def drain(engine, max_steps: int = 100_000) -> None:
    for _ in range(max_steps):
        if not engine.has_work():
            return
        engine.step()
    raise RuntimeError(f"the engine did not finish within {max_steps} steps")


def measure_steps(engine, cfg, args, names, kind: str) -> dict:
    """Median time, FLOPs and op breakdown of `repeats` steps of one kind ("prefill" or "decode")."""
    rng = random.Random(1)
    ranks = adapter_ranks(engine, names)
    add_requests(engine, "warm", args.decode_seqs, 8, 2, names, rng)  # adapters into the pool, code paths warm
    drain(engine)
    steps = record_steps(engine)
    samples = []
    if kind == "decode":  # one batch: its prefill first, then `repeats` decode steps are measured
        seqs = add_requests(engine, "d", args.decode_seqs, args.decode_context, args.repeats + 1, names, rng)
        for _ in range(100):
            if all(s.output_ids for s in seqs):
                break
            engine.step()
        else:
            raise RuntimeError("the decode batch did not finish its prefill in 100 steps")
    with op_timers(engine) as timers:
        for _ in range(args.repeats):
            if kind == "prefill":
                add_requests(engine, "p", args.prefill_seqs, args.prompt_len, 1, names, rng)
            timers.seconds.clear()
            steps.clear()
            timers.active = True
            start = clock()
            engine.step()
            total = clock() - start
            timers.active = False
            (step,) = steps
            if kind == "decode" and (len(step.seqs) != args.decode_seqs or any(len(w.token_ids) != 1 for w in step.seqs)):
                raise RuntimeError(f"the decode step has {len(step.seqs)} of {args.decode_seqs} sequences, or more than one token "
                                   f"of one: the pool ran short (KV of every sequence and one adapter per sequence; "
                                   f"raise --pool-bytes, now {args.pool_bytes} bytes)")
            if kind == "prefill" and sum(len(w.token_ids) for w in step.seqs) < args.prefill_seqs * args.prompt_len:
                raise RuntimeError("the prefill step did not take every prompt: raise --max-batched-tokens")
            samples.append((total, dict(timers.seconds), step_flops(cfg, step, ranks)))
            if kind == "prefill":
                drain(engine)
    drain(engine)
    median = statistics.median(s[0] for s in samples)
    pick = min(samples, key=lambda s: abs(s[0] - median))  # the breakdown of the step nearest the median
    return {"seconds": median, "ops": pick[1], "flops": pick[2], "picked_seconds": pick[0]}


# ---------------------------------------------------------------- the report


def report(args) -> str:
    from lorafleet.worker.config import DTYPES, ModelConfig

    torch.set_num_threads(args.threads)
    cfg = ModelConfig.from_dir(args.model)
    variants = [("base", None)] + ([(f"{len(adapter_names(args.adapters))} adapters", args.adapters)] if args.adapters else [])
    lines = [f"# Roofline: {Path(args.model).name}, {torch.get_num_threads()} torch thread(s)", "",
             f"torch {torch.__version__}; `{' '.join(sys.argv)}`", "",
             f"Steps: prefill-heavy = {args.prefill_seqs} prompts of {args.prompt_len} tokens in one step; "
             f"decode-only = {args.decode_seqs} sequences of {args.decode_context}+ tokens, one new token each; "
             f"base: no adapter" + (f"; with adapters: {', '.join(adapter_names(args.adapters))}, round robin over "
                                    f"the requests" if args.adapters else "") + ". "
             f"Times are medians of {args.repeats}; the machine is shared, so compare ratios within one run.", ""]
    peaks, results = {}, {}
    for name in args.dtype:
        dtype = DTYPES[name]
        rates = matmul_rates(cfg, dtype, args.repeats)
        peaks[name] = (max(rates.values()), max(rates, key=rates.get), rates)
        for label, folder in variants:
            engine = make_engine(args.model, folder, name, max(args.decode_seqs, args.prefill_seqs),
                                 max(2048, args.prefill_seqs * args.prompt_len, args.decode_seqs * args.decode_context),
                                 args.pool_bytes)
            try:
                for kind in ("prefill", "decode"):
                    results.setdefault(name, {})[f"{kind}, {label}"] = measure_steps(
                        engine, cfg, args, adapter_names(folder), kind)
            finally:
                engine.shutdown()
        print(f"{name}: done", file=sys.stderr)

    lines += ["## Matmul rate of the engine's linear at the model's shapes (GFLOP/s)", ""]
    header = "| dtype | projection | " + " | ".join(f"T={t}" for t in ROWS) + " |"
    lines += [header, "|" + "---|" * (2 + len(ROWS))]
    for name, (_, _, rates) in peaks.items():
        for proj in projection_shapes(cfg):
            lines.append(f"| {name} | {proj} | " + " | ".join(f"{rates[(proj, t)]:.0f}" for t in ROWS) + " |")
    lines += ["", "Peak (best of the table): " + "; ".join(
        f"{name} {peak:.0f} GFLOP/s ({where[0]}, T={where[1]})" for name, (peak, where, _) in peaks.items()), ""]

    lines += ["## Steps of the engine against the peak", "",
              "| dtype | step | tokens | model GFLOP | of which LoRA | step ms | achieved GFLOP/s | of peak | "
              "matmul GFLOP/s (linear alone) | matmul of peak |", "|" + "---|" * 10]
    for name, by_kind in results.items():
        peak = peaks[name][0]
        for kind, r in by_kind.items():
            fl = r["flops"]
            total = fl["projections"] + fl["lm_head"] + fl["attention"] + fl["lora"]
            achieved = total / r["seconds"] / 1e9
            mm = (fl["projections"] + fl["lm_head"]) / max(r["ops"].get("matmul", 0.0), 1e-12) / 1e9
            lines.append(f"| {name} | {kind} | {fl['tokens']} | {total / 1e9:.2f} | {fl['lora'] / 1e9:.3f} | "
                         f"{r['seconds'] * 1e3:.1f} | {achieved:.0f} | {achieved / peak:.0%} | {mm:.0f} | {mm / peak:.0%} |")
    if len(results) > 1:
        first, *rest = list(results)
        for other in rest:
            for kind in results[first]:
                ratio = results[other][kind]["seconds"] / results[first][kind]["seconds"]
                lines.append("")
                lines.append(f"{kind} step: {other} takes {ratio:.2f}x the time of {first} (same run)")
    lines += ["", "## Where one step's time goes (ms, and share of the step)", "",
              "One step, the one nearest the median; \"rest\" is its time outside the timed calls.", "",
              "| dtype | step | " + " | ".join(OPS) + " | rest (splits, Python) | total |",
              "|" + "---|" * (len(OPS) + 4)]
    for name, by_kind in results.items():
        for kind, r in by_kind.items():
            ops, total = r["ops"], r["picked_seconds"]
            rest = total - sum(ops.values())
            cells = " | ".join(f"{ops.get(op, 0.0) * 1e3:.1f} ({ops.get(op, 0.0) / total:.0%})" for op in OPS)
            lines.append(f"| {name} | {kind} | {cells} | {rest * 1e3:.1f} ({rest / total:.0%}) | {total * 1e3:.1f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    from lorafleet.coordinator.cli import parse_bytes
    from lorafleet.worker.config import DTYPES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(DEMO_MODEL))
    p.add_argument("--adapters", default=None, help="a folder of PEFT adapters to spread over the requests (default: none)")
    p.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"], choices=list(DTYPES))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--prefill-seqs", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--decode-seqs", type=int, default=64)
    p.add_argument("--decode-context", type=int, default=64, help="prompt length of the decoding sequences")
    p.add_argument("--pool-bytes", type=parse_bytes, default=512 * 2**20,
                   help="the page pool (e.g. 2GiB): the decode step's sequences and their adapters must fit at once")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "roofline.md"))
    args = p.parse_args(argv)
    if min(args.repeats, args.prefill_seqs, args.prompt_len, args.decode_seqs, args.decode_context, args.threads) < 1:
        p.error("counts must be at least 1")
    if not (Path(args.model) / "config.json").is_file():
        p.error(f"--model {args.model}: no config.json (run `make demo`, or pass a model folder)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    text = report(args)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
