"""The finetune tests' synthetic task (a helper module: `conftest` is a name two folders share)."""
from __future__ import annotations

import json
from pathlib import Path

# 16 prompts, each mapped to a fixed completion: learnable by memorisation, impossible before.
WORDS = ("apple", "river", "stone", "cloud", "tiger", "piano", "ocean", "maple",
         "candle", "rocket", "violet", "desert", "lemon", "falcon", "copper", "meadow")
TASK = [(f"item {i}:", f" {w}") for i, w in enumerate(WORDS)]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path
