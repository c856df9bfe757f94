"""The vLLM side of bench/vllm_side.py, run by the Python of vLLM's own venv (bench/.vllm-venv).

It never imports lorafleet (that venv does not have it). One process holds one `vllm.LLM`
(model loaded and compiled once, before any clock) and serves jobs exchanged as JSON files:

    python bench/vllm_runner.py ENGINE.json

ENGINE.json: {"model", "dtype", "enable_lora", "max_lora_rank", "max_loras", "max_cpu_loras",
"max_num_seqs", "max_num_batched_tokens", "max_model_len", "adapters_dir", "seed"}.
Protocol on stdin/stdout (stdout carries only these lines; vLLM's own logging goes to stderr):
the runner prints `ready`; then for each line `REQUESTS.json RESULTS.json` read from stdin it
generates the requests (lorafleet's request format: id, adapter or null, prompt_token_ids,
max_new_tokens; greedy, ignore_eos), writes RESULTS.json ({"seconds", "cpu_seconds", "others",
"tokens", "outputs": {id: token ids}}) and prints `done`. An empty line or EOF ends it.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from machine import machine_busy_seconds  # imported while bench/ is still on the path

# Python puts this script's folder first on sys.path; bench/kernels.py would then shadow the `kernels`
# package that transformers probes for while vLLM imports. Nothing else here needs bench/ on the path.
_HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if p and str(Path(p).resolve()) != _HERE]


def adapter_ids(adapters_dir: str | None) -> dict[str, int]:
    """Each adapter folder's LoRARequest id: its index in the sorted listing, plus one (0 means no LoRA)."""
    if not adapters_dir:
        return {}
    names = sorted(p.name for p in Path(adapters_dir).iterdir() if (p / "adapter_config.json").is_file())
    return {name: i + 1 for i, name in enumerate(names)}


class Runner:
    def __init__(self, spec: dict):
        from vllm import LLM

        self.spec = spec
        self.ids = adapter_ids(spec.get("adapters_dir"))
        kwargs = dict(
            model=spec["model"], dtype=spec["dtype"], seed=spec.get("seed", 0),
            max_num_seqs=spec["max_num_seqs"], max_num_batched_tokens=spec["max_num_batched_tokens"],
            max_model_len=spec["max_model_len"],
            # the same prompts run many times: a prefix cache would turn repeats into cache hits
            enable_prefix_caching=False,
        )
        if spec["enable_lora"]:
            kwargs.update(enable_lora=True, max_lora_rank=spec["max_lora_rank"], max_loras=spec["max_loras"],
                          max_cpu_loras=spec["max_cpu_loras"])
        self.llm = LLM(**kwargs)

    def lora(self, name: str | None):
        from vllm.lora.request import LoRARequest

        if name is None:
            return None
        if name not in self.ids:
            raise SystemExit(f"vllm_runner: adapter {name!r} is not in {self.spec.get('adapters_dir')}")
        return LoRARequest(name, self.ids[name], str(Path(self.spec["adapters_dir"]) / name))

    def generate(self, requests: list[dict]) -> list[list[int]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=r["prompt_token_ids"]) for r in requests]
        params = [SamplingParams(temperature=0.0, max_tokens=r["max_new_tokens"], ignore_eos=True)
                  for r in requests]
        kwargs = {}
        if self.spec["enable_lora"]:
            kwargs["lora_request"] = [self.lora(r.get("adapter")) for r in requests]
        elif any(r.get("adapter") for r in requests):
            raise SystemExit("vllm_runner: a request names an adapter but this engine has LoRA off")
        outputs = self.llm.generate(prompts, params, use_tqdm=False, **kwargs)
        return [list(o.outputs[0].token_ids) for o in outputs]

    def run(self, requests: list[dict]) -> dict:
        busy, own, start = machine_busy_seconds(), sum(os.times()[:2]), time.perf_counter()
        tokens = self.generate(requests)
        seconds = time.perf_counter() - start
        cpu = sum(os.times()[:2]) - own
        after = machine_busy_seconds()
        others = None
        if busy is not None and after is not None:
            others = max(0.0, (after - busy) - cpu) / (seconds * (os.cpu_count() or 1))
        return {"seconds": seconds, "cpu_seconds": cpu, "others": others, "tokens": sum(map(len, tokens)),
                "outputs": {r["id"]: t for r, t in zip(requests, tokens)}}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever vLLM prints goes to stderr; stdout is the protocol's
    runner = Runner(json.loads(Path(argv[0]).read_text()))
    protocol.write("ready\n")
    for line in sys.stdin:
        if not line.strip():
            break
        requests_path, results_path = line.split()
        result = runner.run(json.loads(Path(requests_path).read_text()))
        tmp = Path(results_path + ".tmp")
        tmp.write_text(json.dumps(result))
        tmp.rename(results_path)
        protocol.write("done\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
