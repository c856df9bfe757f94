"""lorafleet and vLLM's CPU build side by side, on the same requests and adapters (issue 16, item 5).

    make bench-vllm                                   # installs bench/.vllm-venv once, then runs this
    .venv/bin/python bench/vllm_side.py --quick       # smoke run
    .venv/bin/python bench/vllm_side.py --counts 0,8,64 --dtypes float32,bfloat16 --repeats 2

Systems, each timed with its model loaded and warmed up (start-up excluded on both sides):
- `vLLM (LoRA off)`: `vllm.LLM(...).generate` without `enable_lora`: vLLM's compiled base path;
- `vLLM`: `LLM(enable_lora=True, max_lora_rank=16, max_loras, max_cpu_loras)` with one `LoRARequest`
  per request (none at n = 0);
- `lorafleet (no adapters)`: the engine behind `lorafleet run` (`run_batch`), loaded without adapters;
- `lorafleet`: the same engine loaded with the adapter folder (no adapter named at n = 0).

vLLM lives in its own venv (bench/.vllm-venv), so it runs in a child process of that venv's
Python executing bench/vllm_runner.py (which never imports lorafleet); requests and results
travel as JSON files. One child per dtype and LoRA setting stays up for all its runs. Every
phase (base, then each n) runs lorafleet, then vLLM, repeat after repeat, so both systems see
the same machine; the tables quote medians over `--repeats`.

The workload is bench/offline.py's (`make_requests`) and the adapters bench/adapter_sets.py's
(`AdapterSet`, ranks 8/16 on q/k/v/o, cached under --workdir): 128 requests, prompts of 8-128
random tokens, 8-64 output tokens, greedy, ignore_eos. The same seed gives the same prompts and
lengths at every n; only the adapters drawn change. Output tokens/s counts generated tokens only.
Results go to bench/results/vllm/ (results.md, results.json, throughput.png when matplotlib is there).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from offline import (  # noqa: E402  (bench/ is this script's folder)
    RANKS, BenchConfig, Run, adapter_set, agreement, check_results, lorafleet_engine, make_requests,
    run_lorafleet_inprocess, vocab_size, without_adapters,
)

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
DEMO_MODEL = REPO / "cache" / "smollm2-135m-instruct"
VLLM_PYTHON = BENCH / ".vllm-venv" / "bin" / "python"
RUNNER = BENCH / "vllm_runner.py"
BASE = "base"  # the phase with LoRA off on both sides

LF, LF_BASE, VL, VL_BASE = "lorafleet", "lorafleet (no adapters)", "vLLM", "vLLM (LoRA off)"


def phase_label(phase) -> str:
    if phase == BASE:
        return "base, LoRA off"
    return "no adapter, LoRA on" if phase == 0 else f"{phase} adapter{'s' * (phase != 1)}"


# ---------------------------------------------------------------- vLLM child


class VllmChild:
    """One vllm.LLM in a child process of vLLM's venv, fed request files one at a time."""

    def __init__(self, python: Path, spec: dict, workdir: Path, tag: str, threads: int, kv_gib: float):
        self.workdir, self.tag, self.count = workdir, tag, 0
        spec_path = workdir / f"vllm-{tag}.json"
        spec_path.write_text(json.dumps(spec, indent=1))
        self.log_path = workdir / f"vllm-{tag}.log"
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": str(threads),
               "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}", "VLLM_CPU_KVCACHE_SPACE": f"{kv_gib:g}",
               "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.pop("PYTHONPATH", None)
        self.log = open(self.log_path, "w")
        started = time.perf_counter()
        self.proc = subprocess.Popen([str(python), str(RUNNER), str(spec_path)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, env=env, cwd=REPO)
        self._expect("ready")
        self.startup_s = time.perf_counter() - started
        print(f"vLLM {tag}: up in {self.startup_s:.0f} s (not timed)", file=sys.stderr, flush=True)

    def _expect(self, word: str) -> None:
        line = self.proc.stdout.readline()
        if line.strip() != word:
            self.close()
            tail = "".join(self.log_path.read_text(errors="replace").splitlines(keepends=True)[-30:])
            raise SystemExit(f"vLLM child {self.tag} exited (rc {self.proc.returncode}) instead of "
                             f"answering {word!r}; the end of {self.log_path}:\n{tail}")

    def run(self, system: str, requests: list[dict]) -> Run:
        self.count += 1
        req_path = self.workdir / f"vllm-{self.tag}-{self.count}-requests.json"
        res_path = self.workdir / f"vllm-{self.tag}-{self.count}-results.json"
        req_path.write_text(json.dumps(requests))
        res_path.unlink(missing_ok=True)
        self.proc.stdin.write(f"{req_path} {res_path}\n")
        self.proc.stdin.flush()
        self._expect("done")
        res = json.loads(res_path.read_text())
        results = [{"token_ids": res["outputs"][r["id"]]} for r in requests]
        outputs = check_results(system, requests, results)
        return Run(system, len(requests), res["tokens"], res["seconds"], res["cpu_seconds"], res["others"],
                   outputs=outputs)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def vllm_spec(cfg: BenchConfig, adapters: Path | None, n_max: int, max_len: int) -> dict:
    spec = {"model": cfg.model, "dtype": cfg.dtype, "seed": cfg.seed, "enable_lora": adapters is not None,
            "max_num_seqs": cfg.max_num_seqs, "max_num_batched_tokens": cfg.max_batched_tokens,
            "max_model_len": max_len, "adapters_dir": str(adapters) if adapters else None}
    if adapters is not None:
        slots = max(1, n_max)
        spec.update(max_lora_rank=max(RANKS), max_loras=min(slots, cfg.max_num_seqs), max_cpu_loras=slots)
    return spec


def warm_up_requests(requests: list[dict], adapter: str | None) -> list[dict]:
    """A few short requests of different prompt lengths, so lazy set-up happens before the clock."""
    picked = sorted(requests, key=lambda r: len(r["prompt_token_ids"]))[::max(1, len(requests) // 4)][:4]
    return [{**r, "id": f"warm-{i}", "adapter": adapter, "max_new_tokens": 2} for i, r in enumerate(picked)]


# ---------------------------------------------------------------- one dtype


def run_dtype(cfg: BenchConfig, args, adapters: Path, counts: list[int], repeats: int, records: list[dict],
              on_phase) -> None:
    """Every phase `repeats` times, lorafleet then vLLM; appends one record per timed run to `records`
    and calls on_phase() after each phase, so an interrupted run still leaves what it measured."""
    n_max = max(counts, default=0)
    plain = make_requests(replace(cfg, adapters=max(1, n_max)), vocab_size(cfg.model))
    workload = {BASE: without_adapters(plain)}
    for n in counts:
        workload[n] = without_adapters(plain) if n == 0 else make_requests(replace(cfg, adapters=n),
                                                                         vocab_size(cfg.model))
    max_len = cfg.prompt_len[1] + cfg.output_len[1] + 8
    workdir = Path(cfg.workdir)
    children, engines = {}, {}
    try:
        print(f"[{cfg.dtype}] starting vLLM (LoRA off) ...", file=sys.stderr, flush=True)
        children[BASE] = VllmChild(args.vllm_python, vllm_spec(cfg, None, 0, max_len), workdir,
                                   f"{cfg.dtype}-base", args.threads, args.kv_gib)
        children[BASE].run("warm-up", warm_up_requests(plain, None))
        if counts:
            print(f"[{cfg.dtype}] starting vLLM (LoRA on) ...", file=sys.stderr, flush=True)
            children["lora"] = VllmChild(args.vllm_python, vllm_spec(cfg, adapters, n_max, max_len), workdir,
                                         f"{cfg.dtype}-lora", args.threads, args.kv_gib)
            children["lora"].run("warm-up", warm_up_requests(plain, None))
        from lorafleet.coordinator.run import run_batch

        engines[BASE] = lorafleet_engine(cfg, None)
        run_batch(engines[BASE], warm_up_requests(plain, None), progress=False)
        if counts:
            engines["lora"] = lorafleet_engine(cfg, adapters)
            run_batch(engines["lora"], warm_up_requests(plain, None), progress=False)
        for rep in range(repeats):
            for phase, requests in workload.items():
                key = BASE if phase == BASE else "lora"
                lf_name, vl_name = (LF_BASE, VL_BASE) if phase == BASE else (LF, VL)
                print(f"[{cfg.dtype}] repeat {rep + 1}/{repeats}, {phase_label(phase)}: lorafleet, vLLM",
                      file=sys.stderr, flush=True)
                gc.collect()
                lf = run_lorafleet_inprocess(engines[key], lf_name, requests, None)
                vl = children[key].run(vl_name, requests)
                agree = agreement(lf, vl)
                for run in (lf, vl):
                    records.append({"dtype": cfg.dtype, "phase": phase, "repeat": rep, "system": run.system,
                                    "tokens": run.tokens, "seconds": run.seconds, "cpu_seconds": run.cpu_seconds,
                                    "others": run.others, "tokens_per_s": run.tokens_per_s, "agreement": agree})
                print(f"    lorafleet {lf.tokens_per_s:7.1f} tok/s   vLLM {vl.tokens_per_s:7.1f} tok/s   "
                      f"agree {agree['agree']}/{agree['requests']}", file=sys.stderr, flush=True)
                on_phase()
    finally:
        for engine in engines.values():
            engine.shutdown()
        for child in children.values():
            child.close()


# ---------------------------------------------------------------- report


def summarize(records: list[dict]) -> dict:
    """(dtype, system, phase) -> median tokens/s and the runs'; (dtype, phase) -> agreement of the last repeat."""
    cells, agree = {}, {}
    for r in records:
        cells.setdefault((r["dtype"], r["system"], r["phase"]), []).append(r)
        agree[(r["dtype"], r["phase"])] = r["agreement"]
    medians = {k: {"median_tokens_per_s": statistics.median(x["tokens_per_s"] for x in v),
                   "runs_tokens_per_s": [round(x["tokens_per_s"], 1) for x in v],
                   "max_cpu_used_by_others": max((x["others"] or 0) for x in v)} for k, v in cells.items()}
    return {"cells": medians, "agreement": agree}


def cell(summary: dict, dtype: str, system: str, phase) -> float | None:
    entry = summary["cells"].get((dtype, system, phase))
    return None if entry is None else entry["median_tokens_per_s"]


def ratios(summary: dict, dtype: str, counts: list[int]) -> list[tuple[str, float | None, str]]:
    """The ratios issue 16's targets name, for one dtype: (what, value, target)."""
    n = 64 if 64 in counts else max((c for c in counts if c > 0), default=None)
    vl_base, lf_base = cell(summary, dtype, VL_BASE, BASE), cell(summary, dtype, LF_BASE, BASE)
    out = []

    def ratio(a, b):
        return None if a is None or b is None or b == 0 else a / b

    out.append(("lorafleet no adapters / vLLM LoRA off", ratio(lf_base, vl_base), ">= 1.0"))
    if n is not None:
        lf_n, vl_n = cell(summary, dtype, LF, n), cell(summary, dtype, VL, n)
        target = dtype == "bfloat16" and n == 64
        out.append((f"lorafleet {n} adapters / vLLM LoRA off", ratio(lf_n, vl_base), ">= 0.9" if target else "-"))
        out.append((f"lorafleet {n} adapters / vLLM {n} adapters", ratio(lf_n, vl_n), ">= 5" if target else "-"))
        out.append((f"lorafleet {n} adapters / lorafleet no adapters", ratio(lf_n, lf_base),
                    ">= 0.9" if target else "-"))
    for c in counts:
        out.append((f"lorafleet / vLLM, {phase_label(c)}",
                    ratio(cell(summary, dtype, LF, c), cell(summary, dtype, VL, c)), "-"))
    return out


def fmt(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def report_markdown(cfg: BenchConfig, args, counts: list[int], dtypes: list[str], summary: dict,
                    versions: dict, command: str) -> str:
    phases = [BASE] + counts
    lines = [
        "# lorafleet and vLLM's CPU build, side by side (bench/vllm_side.py)", "",
        f"Command: `{command}`", "",
        f"Model {cfg.model}; {cfg.requests} requests, prompts {cfg.prompt_len[0]}-{cfg.prompt_len[1]}, outputs "
        f"{cfg.output_len[0]}-{cfg.output_len[1]} tokens, greedy, ignore_eos; adapters of rank "
        f"{'/'.join(map(str, RANKS))} on q/k/v/o; {args.threads} threads each; max {cfg.max_num_seqs} sequences, "
        f"{cfg.max_batched_tokens} tokens per step on both sides; start-up excluded; lorafleet and vLLM "
        f"alternated; medians of {args.repeats} run(s). Versions: "
        + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".", "",
        "Output tokens/s (median; every run's in results.json):", "",
        "| dtype | system | " + " | ".join(phase_label(p) for p in phases) + " |",
        "|---|---|" + "---|" * len(phases),
    ]
    for dtype in dtypes:
        for system, base_system in ((VL, VL_BASE), (LF, LF_BASE)):
            row = [fmt(cell(summary, dtype, base_system, BASE))]
            row += [fmt(cell(summary, dtype, system, p)) for p in counts]
            lines.append(f"| {dtype} | {system} | " + " | ".join(row) + " |")
    lines += ["", "Ratios (the issue's targets where it names one):", "", "| dtype | ratio | value | target |",
              "|---|---|---|---|"]
    for dtype in dtypes:
        for what, value, target in ratios(summary, dtype, counts):
            lines.append(f"| {dtype} | {what} | {fmt(value, 2)}{'x' if value is not None else ''} | {target} |")
    lines += ["", "Greedy agreement, lorafleet vs vLLM (last repeat): requests identical, and tokens equal before "
              "each request's first difference:", "", "| dtype | phase | requests | tokens |", "|---|---|---|---|"]
    for dtype in dtypes:
        for p in phases:
            a = summary["agreement"].get((dtype, p))
            if a:
                lines.append(f"| {dtype} | {phase_label(p)} | {a['agree']}/{a['requests']} | "
                             f"{a['tokens_before_first_difference']}/{a['tokens']} |")
    busy = max((v["max_cpu_used_by_others"] for v in summary["cells"].values()), default=0)
    lines += ["", f"Most CPU used by other processes during one timed run: {busy:.0%} of the machine."]
    if busy > 0.1:
        lines.append("Warning: over 10%; the figures are skewed by other work on this machine.")
    return "\n".join(lines) + "\n"


def plot(path: Path, counts: list[int], dtypes: list[str], summary: dict) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    phases = [BASE] + counts
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4), squeeze=False)
    width = 0.4
    for ax, dtype in zip(axes[0], dtypes):
        for k, (system, base_system) in enumerate(((LF, LF_BASE), (VL, VL_BASE))):
            values = [cell(summary, dtype, base_system if p == BASE else system, p) or 0 for p in phases]
            ax.bar([i + (k - 0.5) * width for i in range(len(phases))], values, width, label=system)
        ax.set_xticks(range(len(phases)), [phase_label(p).replace(", ", "\n") for p in phases], fontsize=8)
        ax.set_ylabel("output tokens/s")
        ax.set_title(dtype)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def vllm_versions(python: Path) -> dict:
    code = "import importlib.metadata as m; print(m.version('vllm-cpu'), m.version('torch'), m.version('transformers'))"
    try:
        out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.split()
        return {"vllm-cpu": out[0], "vLLM's torch": out[1], "vLLM's transformers": out[2]}
    except (subprocess.CalledProcessError, IndexError, OSError):
        return {}


# ---------------------------------------------------------------- main


def int_list(text: str) -> list[int]:
    return sorted({int(x) for x in text.split(",") if x.strip()})


def parse_args(argv: list[str] | None):
    from lorafleet.client.cli import token_range

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEMO_MODEL))
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "lorafleet-bench"),
                   help="adapters (re-used, shared with bench/offline.py), vLLM's logs and the JSON exchanged")
    p.add_argument("--out", default=str(BENCH / "results" / "vllm"), help="results.md, results.json, throughput.png")
    p.add_argument("--counts", type=int_list, default=[0, 1, 8, 64, 512],
                   help="adapter counts, comma separated (0: LoRA on, no adapter named)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--prompt-len", type=token_range, default=(8, 128))
    p.add_argument("--output-len", type=token_range, default=(8, 64))
    p.add_argument("--threads", type=int, default=2, help="torch threads for lorafleet, OMP threads for vLLM")
    p.add_argument("--max-num-seqs", type=int, default=64, help="both systems")
    p.add_argument("--max-batched-tokens", type=int, default=2048, help="both systems")
    p.add_argument("--pool-bytes", default="1GiB", help="lorafleet's page pool")
    p.add_argument("--kv-gib", type=float, default=1.0, help="VLLM_CPU_KVCACHE_SPACE (GiB) per vLLM process")
    p.add_argument("--vllm-python", type=Path, default=VLLM_PYTHON, help="the Python of vLLM's venv")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: n 0 and 8, float32, 16 short requests, once")
    args = p.parse_args(argv)
    if args.quick:
        args.counts, args.dtypes, args.repeats, args.requests = [0, 8], "float32", 1, 16
        args.prompt_len, args.output_len = (4, 16), (2, 8)
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if args.repeats < 1 or args.threads < 1 or any(c < 0 for c in args.counts):
        raise SystemExit("--repeats and --threads must be at least 1, --counts non-negative")
    if not args.vllm_python.is_file():
        raise SystemExit(f"{args.vllm_python}: no vLLM venv there (`make bench-vllm` makes bench/.vllm-venv)")
    return args


def write_report(args, base_cfg: BenchConfig, records: list[dict], command: str, versions: dict,
                 complete: bool) -> str:
    summary = summarize(records)
    text = report_markdown(base_cfg, args, args.counts, args.dtypes, summary, versions, command)
    if not complete:
        text += "\nPartial: the run stopped (or is still running) before every phase and repeat was measured.\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text)
    report = {"command": command, "complete": complete, "config": asdict(base_cfg), "counts": args.counts,
              "dtypes": args.dtypes, "repeats": args.repeats, "threads": args.threads, "kv_gib": args.kv_gib,
              "versions": versions,
              "medians": [{"dtype": d, "system": s, "phase": p, **v} for (d, s, p), v in summary["cells"].items()],
              "ratios": {d: [{"ratio": w, "value": v, "target": t} for w, v, t in ratios(summary, d, args.counts)]
                         for d in args.dtypes},
              "runs": records}
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the vLLM children and the engines are stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    torch.set_num_threads(args.threads)
    base_cfg = BenchConfig(model=args.model, workdir=args.workdir, adapters=max(1, max(args.counts, default=1)),
                           requests=args.requests, prompt_len=args.prompt_len, output_len=args.output_len,
                           pool_bytes=args.pool_bytes, max_num_seqs=args.max_num_seqs,
                           max_batched_tokens=args.max_batched_tokens, threads=args.threads, seed=args.seed)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    adapters = adapter_set(base_cfg).make(args.workdir, base_cfg.adapters)
    versions = {"torch (lorafleet)": torch.__version__, **vllm_versions(args.vllm_python)}
    command = " ".join(["bench/vllm_side.py"] + (sys.argv[1:] if argv is None else argv))
    records: list[dict] = []
    partial = lambda: write_report(args, base_cfg, records, command, versions, complete=False)  # noqa: E731
    for dtype in args.dtypes:
        run_dtype(replace(base_cfg, dtype=dtype), args, adapters, args.counts, args.repeats, records, partial)
    text = write_report(args, base_cfg, records, command, versions, complete=True)
    out = Path(args.out)
    plotted = plot(out / "throughput.png", args.counts, args.dtypes, summarize(records))
    print(text)
    print(f"written: {out}/results.md, results.json" + (", throughput.png" if plotted else
                                                        " (no plot: matplotlib is not installed here)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
