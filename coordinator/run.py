"""`lorafleet run`: an offline batch from JSONL to JSONL through one engine on this thread."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from tqdm import tqdm

from ..worker.adapters import AdapterError
from .adapters import AdapterNotFound, AdapterPathDenied
from .engine import Engine
from .output import OutputProcessor
from .request import InvalidRequest, fields_from_json
from .scheduler import RequestTooLarge
from .sequence import Request, Sequence

REQUEST_ERRORS = (InvalidRequest, RequestTooLarge, AdapterError, AdapterNotFound, AdapterPathDenied)


@dataclass
class Job:
    """One request of a batch and what became of it."""

    request: Request
    seq: Sequence | None = None
    processor: OutputProcessor | None = None
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None


def drive(engine: Engine, jobs: list[Job], window: int | None = None, on_finish=None, max_steps: int = 10_000_000) -> None:
    """Runs every job to completion. Jobs enter the engine in order, at most `window` queued at a time
    (default 2 x max_num_seqs), so only the adapters of those are held in host memory; an adapter
    is read here, before its first request enters the scheduler."""
    window = window or 2 * engine.cfg.max_num_seqs
    pending, running, held = iter(jobs), {}, None
    for _ in range(max_steps):
        while len(engine.scheduler.waiting) < window:
            job = held or next(pending, None)
            if job is None:
                break
            held = None if _admit(engine, job, running, on_finish) else job
            if held is not None:
                break  # its adapter waits for host memory that the running requests hold
        if not engine.has_work():
            if held is not None:  # a bug: nothing runs that could free host memory
                raise RuntimeError(f"request {held.request.request_id} waits for host memory that no request holds")
            return  # the loop above admitted every job left
        for out in engine.step():
            job = running.get(out.seq.seq_id)
            chunk = job.processor.push([out.token], out.seq.finish_reason if out.finished else None)
            job.text += chunk.text
            if chunk.finish_reason is not None:
                job.finish_reason = chunk.finish_reason
                if job.processor.stopped_by_string:
                    engine.abort(out.seq, "stop")
                del running[out.seq.seq_id]
                if on_finish:
                    on_finish(job)
    raise RuntimeError(f"the batch did not finish within {max_steps} steps")


def _admit(engine: Engine, job: Job, running: dict, on_finish) -> bool:
    """False if the job must wait for host memory; True once it runs or has failed."""
    try:
        if job.request.adapter is not None and engine.ensure_adapter(job.request.adapter) is None:
            return False
        job.seq = engine.add(job.request)
    except REQUEST_ERRORS as e:
        job.error = str(e)
        if on_finish:
            on_finish(job)
        return True
    job.processor = OutputProcessor(engine.tokenizer, job.request)
    running[job.seq.seq_id] = job
    return True


def run_batch(engine: Engine, objs: list, progress: bool = True) -> list[dict]:
    """Runs every request to completion; returns one result per input, in input order."""
    results: list[dict | None] = [None] * len(objs)
    jobs, ids = [], {}
    for number, obj in enumerate(objs):
        line_id = obj.get("id", number) if isinstance(obj, dict) else number
        try:
            if isinstance(obj, InvalidRequest):
                raise obj
            job = Job(engine.parse(fields_from_json(obj, str(number))))
        except InvalidRequest as e:
            results[number] = {"id": line_id, "error": str(e)}
            continue
        ids[id(job)] = (number, line_id)
        jobs.append(job)
    with tqdm(total=len(jobs), unit="req", file=sys.stderr, disable=not progress, desc="lorafleet run") as bar:
        def finished(job: Job) -> None:
            number, line_id = ids[id(job)]
            results[number] = _result(engine, job, line_id)
            bar.update(1)

        drive(engine, jobs, on_finish=finished)
    return results


def _result(engine: Engine, job: Job, line_id) -> dict:
    if job.error is not None:
        return {"id": line_id, "error": job.error}
    seq = job.seq
    result = {"id": line_id, "token_ids": seq.output_ids}
    if engine.tokenizer is not None:
        result["text"] = job.text
    result["finish_reason"] = job.finish_reason
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
