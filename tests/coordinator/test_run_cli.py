"""`lorafleet run`: the offline JSONL contract that outside checks rely on."""
from __future__ import annotations

import json
import subprocess

import pytest
from engines import adapters_root
from peers import encode, peft_greedy
from servers import LORAFLEET


def _run(model, adapters, lines, tmp_path, *extra) -> tuple[list[dict], str]:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    done = subprocess.run([LORAFLEET, "run", "--model", str(model), "--adapters", str(adapters), "--input", str(src),
                           "--output", str(out), "--dtype", "float32", *extra], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return [json.loads(x) for x in out.read_text().splitlines()], done.stderr


LINES = [
    {"id": "ids", "adapter": "r16_all", "prompt_token_ids": [9, 10, 11, 12], "max_new_tokens": 6, "temperature": 0, "ignore_eos": True},
    {"id": "text", "adapter": None, "prompt": "héllo", "max_new_tokens": 5, "ignore_eos": True},
    {"id": "chat", "adapter": "r8_mlp", "messages": [{"role": "user", "content": "hi"}], "max_new_tokens": 3, "ignore_eos": True},
    {"id": "sampled", "adapter": "r3_attn", "prompt_token_ids": [5, 6], "max_new_tokens": 8, "temperature": 0.7, "top_p": 0.9, "top_k": 20, "seed": 3, "ignore_eos": True},
    {"id": "stops", "adapter": "r1_v", "prompt_token_ids": [5, 6], "max_new_tokens": 30, "stop_token_ids": []},
    {"id": "missing", "adapter": "nope", "prompt_token_ids": [1], "max_new_tokens": 2},
    {"id": "both", "prompt": "a", "prompt_token_ids": [1], "max_new_tokens": 2},
    {"id": "neg", "prompt_token_ids": [1], "max_new_tokens": -1},
    {"id": "typo", "prompt_token_ids": [1], "max_tokens": 3},
    "{not json",
]


def test_jsonl_contract(tiny_models, tiny_adapters, tmp_path):
    model = tiny_models["llama_gqa"]
    results, stderr = _run(model, adapters_root(tiny_adapters), LINES, tmp_path)
    by_id = {r["id"]: r for r in results}
    assert len(results) == len(LINES)
    assert by_id["ids"]["token_ids"] == peft_greedy(model, tiny_adapters["r16_all"], [9, 10, 11, 12], 6)
    assert by_id["ids"]["finish_reason"] == "length"
    assert by_id["ids"]["usage"] == {"prompt_tokens": 4, "completion_tokens": 6}
    assert by_id["text"]["token_ids"] == peft_greedy(model, None, encode("héllo"), 5)
    assert isinstance(by_id["text"]["text"], str)
    assert len(by_id["chat"]["token_ids"]) == 3 and len(by_id["sampled"]["token_ids"]) == 8
    stops = by_id["stops"]
    assert stops["finish_reason"] in ("stop", "length")
    if stops["finish_reason"] == "stop":
        assert stops["token_ids"][-1] == 2  # the model's eos
    assert "not found" in by_id["missing"]["error"]
    assert "exactly one of" in by_id["both"]["error"]
    assert "max_new_tokens must be at least 1" in by_id["neg"]["error"]
    assert "unknown field 'max_tokens'" in by_id["typo"]["error"]
    assert "not valid JSON" in results[-1]["error"]
    assert "lorafleet run" in stderr  # the progress bar and the summary go to stderr


def test_prompts_longer_than_max_batched_tokens_run(tiny_models, tiny_adapters, tmp_path):
    """--max-batched-tokens bounds a step, not a prompt: prompts of 200 and 500 tokens run in
    chunks of 16 and equal PEFT; only prompt + max_new_tokens beyond the context (512) is refused."""
    model = tiny_models["llama_gqa"]
    long, longer = [(7 * i) % 240 + 5 for i in range(200)], [(11 * i) % 240 + 5 for i in range(500)]
    lines = [{"id": "long", "adapter": "r16_all", "prompt_token_ids": long, "max_new_tokens": 4, "ignore_eos": True},
             {"id": "short", "prompt_token_ids": [9, 10], "max_new_tokens": 12, "ignore_eos": True},
             {"id": "longer", "prompt_token_ids": longer, "max_new_tokens": 3, "ignore_eos": True},
             {"id": "over", "prompt_token_ids": longer, "max_new_tokens": 13, "ignore_eos": True}]
    results, _ = _run(model, adapters_root(tiny_adapters), lines, tmp_path, "--max-batched-tokens", "16")
    by_id = {r["id"]: r for r in results}
    assert by_id["long"]["token_ids"] == peft_greedy(model, tiny_adapters["r16_all"], long, 4)
    assert by_id["short"]["token_ids"] == peft_greedy(model, None, [9, 10], 12)
    assert by_id["longer"]["token_ids"] == peft_greedy(model, None, longer, 3)
    assert "context of 512" in by_id["over"]["error"]


@pytest.mark.slow
def test_tp2_run_equals_tp1(tiny_models, tiny_adapters, tmp_path):
    lines = [line for line in LINES if isinstance(line, dict) and "error" not in line][:5]
    tp1, _ = _run(tiny_models["llama_gqa"], adapters_root(tiny_adapters), lines, tmp_path)
    tp2, _ = _run(tiny_models["llama_gqa"], adapters_root(tiny_adapters), lines, tmp_path, "--tp", "2")
    assert tp1 == tp2


def test_tp_not_dividing_heads_is_a_clear_error(tiny_models, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt_token_ids": [1], "max_new_tokens": 1}\n')
    done = subprocess.run([LORAFLEET, "run", "--model", str(tiny_models["llama_gqa"]), "--input", str(src),
                           "--output", str(tmp_path / "o.jsonl"), "--tp", "3"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "tp=3 does not divide the model's 4 attention heads" in done.stderr


def test_scheduling_flags_keep_the_tokens(tiny_models, tiny_adapters, tmp_path):
    """--no-prefix-cache and --adapter-affinity change what is computed and in which order, never the
    tokens; a negative affinity is a clear error (exit 2)."""
    shared = [9, 10, 11, 12, 13, 14, 15, 16]
    lines = [{"id": i, "adapter": a, "prompt_token_ids": shared + [20 + i], "max_new_tokens": 5, "ignore_eos": True}
             for i, a in enumerate(["r16_all", "r8_mlp", "r16_all", None, "r8_mlp", "r16_all"])]
    root = adapters_root(tiny_adapters)
    default, _ = _run(tiny_models["llama_gqa"], root, lines, tmp_path)
    other, _ = _run(tiny_models["llama_gqa"], root, lines, tmp_path, "--no-prefix-cache", "--adapter-affinity", "4",
                    "--max-num-seqs", "2")
    assert [r["token_ids"] for r in default] == [r["token_ids"] for r in other]
    assert default[0]["token_ids"] == peft_greedy(tiny_models["llama_gqa"], tiny_adapters["r16_all"], shared + [20], 5)
    done = subprocess.run([LORAFLEET, "run", "--model", str(tiny_models["llama_gqa"]), "--input", str(tmp_path / "in.jsonl"),
                           "--output", str(tmp_path / "o.jsonl"), "--adapter-affinity", "-1"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert "--adapter-affinity must be >= 0 steps" in done.stderr
