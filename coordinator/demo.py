"""`lorafleet demo`: every adapter of the adapters folder answers a few questions, in one batch."""
from __future__ import annotations

from pathlib import Path

from ..worker.step import SamplingParams
from .config import EngineConfig
from .engine import Engine
from .run import Job, drive
from .sequence import Request

QUESTIONS = ("What is the capital of France?", "Give me one tip for writing clear code.")


def run_demo(cfg: EngineConfig, max_new_tokens: int = 48) -> int:
    engine = Engine(cfg)
    if engine.tokenizer is None:
        raise ValueError(f"{cfg.model_dir} has no tokenizer.json; the demo needs text")
    names = sorted(p.name for p in Path(cfg.adapters_dir).iterdir() if (p / "adapter_config.json").is_file()) if cfg.adapters_dir else []
    jobs = []
    for adapter in [None] + names:
        for q in QUESTIONS:
            ids = engine.tokenizer.apply_chat_template([{"role": "user", "content": q}])
            jobs.append((adapter, q, Job(Request(f"{adapter}:{q}", ids, max_new_tokens, adapter, SamplingParams()))))
    drive(engine, [job for _, _, job in jobs])
    for adapter, q, job in jobs:
        answer = (job.error or job.text).strip().replace("\n", " ")
        print(f"[{adapter or 'base model'}] {q}\n    {answer}\n")
    engine.shutdown()
    return 0
