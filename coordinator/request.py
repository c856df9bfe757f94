"""The one request model: every front end (gRPC, `lorafleet run`, OpenAI HTTP) turns what it
received into `RequestFields`, and `RequestParser` turns those into a validated, tokenized
`Request`. Every check of a request's fields is here, with a message that names the field."""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..worker.step import MAX_LOGPROBS, SamplingParams
from .sequence import Request
from .tokenizer import Tokenizer

DEFAULT_MAX_NEW_TOKENS = 16
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class InvalidRequest(ValueError):
    """A request with a bad field; the message says which and what is allowed; `param` names the
    field where the front end's API has one by that name."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def check_adapter_name(name: str) -> str:
    if not ADAPTER_NAME.match(name):
        raise InvalidRequest(f"adapter name {name!r} is not valid: use letters, digits, '.', '_' or '-' "
                             "(starting with a letter or digit, at most 128)")
    return name


@dataclass(frozen=True)
class RequestFields:
    """What a client sent, before tokenizing; None means not given."""

    request_id: str
    adapter: str | None = None
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[dict] | None = None
    max_new_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int = 0  # top candidates per token to return (0: none)


class RequestParser:
    def __init__(self, tokenizer: Tokenizer | None, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size

    def parse(self, f: RequestFields) -> Request:
        if f.adapter is not None:
            check_adapter_name(f.adapter)
        max_new = DEFAULT_MAX_NEW_TOKENS if f.max_new_tokens is None else f.max_new_tokens
        if max_new < 1:
            raise InvalidRequest(f"max_new_tokens must be at least 1, got {max_new}")
        if len(f.stop) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_LENGTH for s in f.stop):
            raise InvalidRequest(f"stop: at most {MAX_STOP_STRINGS} non-empty strings of up to {MAX_STOP_LENGTH} characters")
        if f.stop and self.tokenizer is None:
            raise InvalidRequest("stop strings need a tokenizer.json in the model folder; use stop_token_ids")
        sampling = SamplingParams(temperature=f.temperature, top_p=f.top_p, top_k=f.top_k, seed=f.seed,
                                  logprobs=f.logprobs)
        check_sampling(sampling)
        prompt_ids = self._prompt_ids(f)
        self._check_ids("prompt token id", prompt_ids)
        self._check_ids("stop token id", f.stop_token_ids)
        return Request(request_id=f.request_id, prompt_ids=prompt_ids, max_new_tokens=max_new, adapter=f.adapter,
                       sampling=sampling, stop_token_ids=tuple(f.stop_token_ids), ignore_eos=f.ignore_eos,
                       stop=tuple(f.stop))

    def _prompt_ids(self, f: RequestFields) -> list[int]:
        given = [k for k in ("prompt", "prompt_token_ids", "messages") if getattr(f, k) is not None]
        if len(given) != 1:
            raise InvalidRequest("give exactly one of prompt, prompt_token_ids or messages"
                                 + (f" (got {', '.join(given)})" if given else " (the prompt is empty)"))
        if given[0] == "prompt_token_ids":
            ids = list(f.prompt_token_ids)
        elif self.tokenizer is None:
            raise InvalidRequest(f"{given[0]} needs a tokenizer.json in the model folder; send prompt_token_ids")
        elif given[0] == "prompt":
            ids = self.tokenizer.encode(f.prompt)
        else:
            try:
                ids = self.tokenizer.apply_chat_template(f.messages)
            except ValueError as e:
                raise InvalidRequest(f"messages: {e}") from e
        if not ids:
            raise InvalidRequest("the prompt is empty")
        return ids

    def _check_ids(self, what: str, ids) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequest(f"{what} {bad[0]} is outside the vocabulary [0, {self.vocab_size})")


def check_sampling(p: SamplingParams) -> None:
    if not p.temperature >= 0 or p.temperature > 100:
        raise InvalidRequest(f"temperature must be in [0, 100], got {p.temperature}", "temperature")
    if not 0 < p.top_p <= 1:
        raise InvalidRequest(f"top_p must be in (0, 1], got {p.top_p}", "top_p")
    if p.top_k < 0:
        raise InvalidRequest(f"top_k must be >= 0 (0 = all tokens), got {p.top_k}", "top_k")
    if p.seed is not None and not 0 <= p.seed < 2**63:
        raise InvalidRequest(f"seed must be in [0, 2^63), got {p.seed}", "seed")
    if not 0 <= p.logprobs <= MAX_LOGPROBS:
        raise InvalidRequest(f"logprobs: at most {MAX_LOGPROBS} top candidates per token, got {p.logprobs}", "logprobs")


# ------------------------------------------------------------- from JSON (`lorafleet run`)

JSON_FIELDS = {"id", "adapter", "prompt", "prompt_token_ids", "messages", "max_new_tokens", "temperature",
               "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos"}


def fields_from_json(obj, default_id: str) -> RequestFields:
    """A JSON object (one `lorafleet run` line) as RequestFields; raises InvalidRequest naming the field."""
    if not isinstance(obj, dict):
        raise InvalidRequest("each line must be a JSON object")
    unknown = sorted(set(obj) - JSON_FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown field {unknown[0]!r}; fields are {', '.join(sorted(JSON_FIELDS))}")
    adapter = obj.get("adapter")
    if adapter is not None and not isinstance(adapter, str):
        raise InvalidRequest("adapter must be a string (a subfolder of --adapters) or null")
    prompt = obj.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise InvalidRequest("prompt must be a string")
    messages = obj.get("messages")
    if messages is not None and not (isinstance(messages, list) and all(
            isinstance(m, dict) and {"role", "content"} <= set(m) for m in messages)):
        raise InvalidRequest("messages must be a list of {role, content} objects")
    stop = obj.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise InvalidRequest("stop must be a string or a list of strings")
    return RequestFields(
        request_id=str(obj.get("id", default_id)), adapter=adapter or None, prompt=prompt,
        prompt_token_ids=_int_list(obj, "prompt_token_ids") if obj.get("prompt_token_ids") is not None else None,
        messages=messages, max_new_tokens=_int(obj, "max_new_tokens", None),
        temperature=_num(obj, "temperature", 0.0), top_p=_num(obj, "top_p", 1.0), top_k=_int(obj, "top_k", 0),
        seed=_int(obj, "seed", None), stop=tuple(stop), stop_token_ids=tuple(_int_list(obj, "stop_token_ids")),
        ignore_eos=_bool(obj, "ignore_eos"),
    )


def _int(obj, key, default):
    v = obj.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidRequest(f"{key} must be an integer, got {v!r}", key)
    return v


def _num(obj, key, default):
    v = obj.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InvalidRequest(f"{key} must be a number, got {v!r}", key)
    return float(v)


def _bool(obj, key):
    v = obj.get(key, False)
    if not isinstance(v, bool):
        raise InvalidRequest(f"{key} must be true or false, got {v!r}", key)
    return v


def _int_list(obj, key):
    v = obj.get(key) or []
    if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        raise InvalidRequest(f"{key} must be a list of integers", key)
    return list(v)


# ------------------------------------------------------------- from the gRPC API

def fields_from_proto(r, request_id: str) -> RequestFields:
    """A lorafleet.v1.GenerateRequest as RequestFields (proto3 leaves unset scalars at zero)."""
    return RequestFields(
        request_id=request_id, adapter=r.adapter_id or None, prompt=r.prompt or None,
        prompt_token_ids=list(r.prompt_token_ids) or None,
        messages=[{"role": m.role, "content": m.content} for m in r.messages] or None,
        max_new_tokens=r.max_new_tokens or None, temperature=r.temperature,
        top_p=r.top_p if r.HasField("top_p") else 1.0, top_k=r.top_k, seed=r.seed if r.HasField("seed") else None,
        stop=tuple(r.stop), stop_token_ids=tuple(r.stop_token_ids), ignore_eos=r.ignore_eos,
    )


# ------------------------------------------------------------- from the OpenAI API

MAX_CHOICES = 16  # n, and prompts in one completions request, at most
OPENAI_REFUSED = {  # fields lorafleet does not implement: refused when set, not silently ignored
    "echo": False, "suffix": None, "best_of": 1, "logit_bias": {}, "presence_penalty": 0, "frequency_penalty": 0,
    "tools": None, "functions": None, "response_format": None,
}
_SEED_STRIDE = 0x9E3779B97F4A7C15  # choice j > 0 of a seeded request: seed + j * stride (mod 2^63)


@dataclass(frozen=True)
class OpenAIFields:
    """An OpenAI completions or chat request: one RequestFields per choice (prompt i's sample j at
    index i * n + j) and what shapes the response. Fields the API has and lorafleet does not
    implement are refused (OPENAI_REFUSED); fields it does not know are ignored, as vLLM does."""

    model: str
    choices: list[RequestFields]
    n: int
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # top candidates per token in the response; None: no logprobs
    tokens_as_ids: bool = False  # logprobs name tokens "token_id:<id>" (vLLM's return_tokens_as_token_ids)
    max_tokens_given: bool = True


def fields_from_openai(body, chat: bool, request_id: str, base_model: str) -> OpenAIFields:
    """A JSON body of POST /v1/completions (chat=False) or /v1/chat/completions as OpenAIFields;
    `model` names an adapter, or the base model by base_model. Raises InvalidRequest with the field."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model is required: the base model's id or an adapter's name (GET /v1/models)", "model")
    for key, default in OPENAI_REFUSED.items():
        if body.get(key) not in (None, default):
            raise InvalidRequest(f"{key} is not supported by lorafleet; leave it out", key)
    n = _int(body, "n", 1)
    if not 1 <= n <= MAX_CHOICES:
        raise InvalidRequest(f"n must be in [1, {MAX_CHOICES}], got {n}", "n")
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict)):
        raise InvalidRequest("stream_options is an object, allowed only with stream: true", "stream_options")
    include_usage = _bool(options, "include_usage") if options else False
    logprobs = _chat_logprobs(body) if chat else _completion_logprobs(body)
    max_key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, max_key, None)
    if max_tokens is not None and max_tokens < 1:
        raise InvalidRequest(f"{max_key} must be at least 1, got {max_tokens}", max_key)
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise InvalidRequest("stop must be a string or a list of strings", "stop")
    top_k = _int(body, "top_k", 0)
    seed = _int(body, "seed", None)
    common = dict(
        adapter=None if model == base_model else model, max_new_tokens=max_tokens,
        temperature=_num(body, "temperature", 1.0), top_p=_num(body, "top_p", 1.0), top_k=0 if top_k == -1 else top_k,
        stop=tuple(stop), stop_token_ids=tuple(_int_list(body, "stop_token_ids")), ignore_eos=_bool(body, "ignore_eos"),
        logprobs=0 if logprobs is None else max(1, logprobs))
    prompts = [{"messages": _messages(body.get("messages"))}] if chat else _prompts(body.get("prompt"))
    choices = [RequestFields(request_id=f"{request_id}-{i * n + j}", seed=_choice_seed(seed, j), **p, **common)
               for i, p in enumerate(prompts) for j in range(n)]
    return OpenAIFields(model, choices, n, stream, include_usage, logprobs,
                        _bool(body, "return_tokens_as_token_ids"), max_tokens is not None)


def _choice_seed(seed: int | None, j: int) -> int | None:
    """Choice 0 keeps the seed (n=1 and n=2 agree on it); the others get distinct derived ones."""
    if seed is None or j == 0:
        return seed
    return (seed + j * _SEED_STRIDE) % 2**63


def _completion_logprobs(body) -> int | None:
    logprobs = _int(body, "logprobs", None)
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise InvalidRequest(f"logprobs must be in [0, {MAX_LOGPROBS}], got {logprobs}", "logprobs")
    return logprobs


def _chat_logprobs(body) -> int | None:
    top = _int(body, "top_logprobs", None)
    if top is not None and not 0 <= top <= MAX_LOGPROBS:
        raise InvalidRequest(f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {top}", "top_logprobs")
    if not _bool(body, "logprobs"):
        if top:
            raise InvalidRequest("top_logprobs needs logprobs: true", "top_logprobs")
        return None
    return top or 0


def _prompts(prompt) -> list[dict]:
    """A string, a list of strings, a list of token ids or a list of lists of token ids."""
    def ids(v) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)

    if isinstance(prompt, str):
        prompts = [{"prompt": prompt}]
    elif ids(prompt):
        prompts = [{"prompt_token_ids": list(prompt)}]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = [{"prompt": p} for p in prompt]
    elif isinstance(prompt, list) and prompt and all(ids(p) for p in prompt):
        prompts = [{"prompt_token_ids": list(p)} for p in prompt]
    else:
        raise InvalidRequest("prompt must be a string, a list of strings, a list of token ids or a list of "
                             "lists of token ids, none of them empty", "prompt")
    if len(prompts) > MAX_CHOICES:
        raise InvalidRequest(f"at most {MAX_CHOICES} prompts in one request, got {len(prompts)}", "prompt")
    return prompts


def _messages(messages) -> list[dict]:
    """[{role, content}] where content is a string or a list of {type: text, text} parts."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidRequest(f"messages[{i}] must be an object with a string role", "messages")
        content = m.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise InvalidRequest(f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        elif not isinstance(content, str):
            raise InvalidRequest(f"messages[{i}].content must be a string or a list of text parts", "messages")
        out.append({"role": m["role"], "content": content})
    return out
