"""Where a serving process spends its CPU, by thread: the replica's thread (schedule, steps), the
adapter loader, and the front end (the asyncio loop, gRPC's threads, everything else).

The replica core runs on a thread of the server process. What the front end's threads take
bounds what moving the engine into its own process (as vLLM does, to keep the front end's
GIL out of the step) could give back: this measures that share under the serving workload.

    .venv/bin/python bench/thread_cpu.py --model cache/smollm2-135m-instruct --adapters DIR [--n 100]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

BIN = Path(sys.executable).parent
TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> Counter:
    """CPU seconds of each thread of `pid`, by thread name."""
    seconds: Counter = Counter()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        seconds[name] += (int(fields[11]) + int(fields[12])) / TICK
    return seconds


def group(name: str) -> str:
    if name.startswith("replica-"):
        return "replica thread (scheduler + steps)"
    if name.startswith("adapter-loader"):
        return "adapter loader"
    if name.startswith("watchdog-"):
        return "watchdog"
    return "front end and the rest (asyncio loop, gRPC, metrics)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--adapters", required=True)
    p.add_argument("--n", type=int, default=100, help="adapters the load test uses")
    p.add_argument("--rate", type=float, default=10.0)
    p.add_argument("--duration", type=float, default=60.0)
    args = p.parse_args(argv)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    server = subprocess.Popen([str(BIN / "lorafleet"), "serve", "--model", args.model, "--adapters", args.adapters,
                               "--port", "0", "--metrics-port", "-1"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        info = None
        while info is None and time.monotonic() < deadline:
            line = server.stdout.readline()
            if not line:
                raise SystemExit("the server exited before it was ready")
            if line.startswith("{") and json.loads(line).get("event") == "ready":
                info = json.loads(line)
        before = thread_cpu(server.pid)
        started = time.monotonic()
        subprocess.run([str(BIN / "lorafleet"), "loadtest", "--target", f"127.0.0.1:{info['port']}", "--no-progress",
                        "--num-adapters", str(args.n), "--adapter-format", "adapter-{i:04d}", "--rate", str(args.rate),
                        "--duration", str(args.duration), "--requests", str(int(args.rate * args.duration)),
                        "--input-range", "8:64", "--output-range", "8:32"], check=True, env=env,
                       stdout=subprocess.DEVNULL, timeout=args.duration + 120)
        wall = time.monotonic() - started
        used = thread_cpu(server.pid) - before
    finally:
        server.terminate()
        server.wait(60)
    groups: Counter = Counter()
    for name, seconds in used.items():
        groups[group(name)] += seconds
    total = sum(groups.values())
    print(f"server CPU over {wall:.0f} s of load (n={args.n}, {args.rate:g} requests/s): {total:.1f} s")
    for name, seconds in groups.most_common():
        print(f"  {name:55s} {seconds:7.1f} s  {100 * seconds / total:5.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
