"""`lorafleet run`: an offline batch from JSONL to JSONL through the engine."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from tqdm import tqdm

from ..worker.adapters import AdapterError
from ..worker.step import SamplingParams
from .adapters import AdapterNotFound, AdapterPathDenied
from .engine import Engine, InvalidRequest
from .scheduler import RequestTooLarge
from .sequence import Request, Sequence

REQUEST_ERRORS = (InvalidRequest, RequestTooLarge, AdapterError, AdapterNotFound, AdapterPathDenied)
_FIELDS = {"id", "adapter", "prompt", "prompt_token_ids", "messages", "max_new_tokens", "temperature",
           "top_p", "top_k", "seed", "stop_token_ids", "ignore_eos"}


@dataclass
class _Line:
    id: object
    seq: Sequence | None = None
    error: str | None = None


def parse_request(engine: Engine, obj, number: int) -> Request:
    """One input line as a Request; raises InvalidRequest with the field at fault."""
    if isinstance(obj, InvalidRequest):
        raise obj
    if not isinstance(obj, dict):
        raise InvalidRequest("each line must be a JSON object")
    unknown = sorted(set(obj) - _FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown field {unknown[0]!r}; fields are {', '.join(sorted(_FIELDS))}")
    prompt_ids = _prompt_ids(engine, obj)
    adapter = obj.get("adapter")
    if adapter is not None and not isinstance(adapter, str):
        raise InvalidRequest("adapter must be a string (a subfolder of --adapters) or null")
    return Request(
        request_id=str(obj.get("id", number)),
        prompt_ids=prompt_ids,
        max_new_tokens=_int(obj, "max_new_tokens", 16),
        adapter=adapter or None,
        sampling=SamplingParams(
            temperature=_num(obj, "temperature", 0.0), top_p=_num(obj, "top_p", 1.0),
            top_k=_int(obj, "top_k", 0), seed=_int(obj, "seed", None),
        ),
        stop_token_ids=tuple(_int_list(obj, "stop_token_ids")),
        ignore_eos=_bool(obj, "ignore_eos"),
    )


def _prompt_ids(engine: Engine, obj: dict) -> list[int]:
    given = [k for k in ("prompt_token_ids", "prompt", "messages") if obj.get(k) is not None]
    if len(given) != 1:
        raise InvalidRequest("give exactly one of prompt_token_ids, prompt or messages")
    if given[0] == "prompt_token_ids":
        return _int_list(obj, "prompt_token_ids")
    if engine.tokenizer is None:
        raise InvalidRequest(f"{given[0]} needs a tokenizer.json in the model folder; send prompt_token_ids")
    if given[0] == "prompt":
        if not isinstance(obj["prompt"], str):
            raise InvalidRequest("prompt must be a string")
        return engine.tokenizer.encode(obj["prompt"])
    messages = obj["messages"]
    if not isinstance(messages, list) or not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in messages):
        raise InvalidRequest("messages must be a list of {role, content} objects")
    try:
        return engine.tokenizer.apply_chat_template(messages)
    except ValueError as e:
        raise InvalidRequest(str(e)) from e


def _int(obj, key, default):
    v = obj.get(key, default)
    if v is default:
        return v
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidRequest(f"{key} must be an integer, got {v!r}")
    return v


def _num(obj, key, default):
    v = obj.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InvalidRequest(f"{key} must be a number, got {v!r}")
    return float(v)


def _bool(obj, key):
    v = obj.get(key, False)
    if not isinstance(v, bool):
        raise InvalidRequest(f"{key} must be true or false, got {v!r}")
    return v


def _int_list(obj, key):
    v = obj.get(key) or []
    if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        raise InvalidRequest(f"{key} must be a list of integers")
    return list(v)


def run_batch(engine: Engine, objs: list, progress: bool = True) -> list[dict]:
    """Runs every request to completion; returns one result per input, in input order."""
    lines: list[_Line] = []
    for number, obj in enumerate(objs):
        line = _Line(obj.get("id", number) if isinstance(obj, dict) else number)
        try:
            line.seq = engine.add(parse_request(engine, obj, number))
        except REQUEST_ERRORS as e:
            line.error = str(e)
        lines.append(line)
    total = sum(1 for ln in lines if ln.seq)
    with tqdm(total=total, unit="req", file=sys.stderr, disable=not progress, desc="lorafleet run") as bar:
        while engine.has_work():
            done = sum(1 for out in engine.step() if out.finished)
            bar.update(done)
    return [_result(engine, ln) for ln in lines]


def _result(engine: Engine, line: _Line) -> dict:
    if line.error is not None:
        return {"id": line.id, "error": line.error}
    seq = line.seq
    result = {"id": line.id, "token_ids": seq.output_ids}
    if engine.tokenizer is not None:
        result["text"] = engine.tokenizer.decode(seq.output_ids)
    result["finish_reason"] = seq.finish_reason
    result["usage"] = {"prompt_tokens": len(seq.request.prompt_ids), "completion_tokens": len(seq.output_ids)}
    return result


def read_jsonl(path: str) -> list:
    """Every non-empty line, parsed; a line that is not JSON becomes an InvalidRequest in its place."""
    objs: list = []
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                objs.append(json.loads(text))
            except json.JSONDecodeError as e:
                objs.append(InvalidRequest(f"line {number} is not valid JSON: {e}"))
    return objs
