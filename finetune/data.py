"""Training data: JSONL lines -> token ids and labels, with the loss only on what the model should say.

Two line formats (one JSON object per line; blank lines are ignored):

* ``{"prompt": "...", "completion": "..."}``: the prompt is tokenised as the server tokenises a
  text prompt (``tokenizer(prompt)``, special tokens as the tokenizer adds them), the completion
  without special tokens, followed by the eos token, so that the model learns to stop. The loss
  covers the completion and that eos.
* ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the model's chat template
  exactly as the server renders a chat (the prompt of assistant turn *i* is the conversation before
  it with the generation prompt). The loss covers the assistant turns only: each turn's content and
  its end-of-turn tokens, up to and including the eos token where the template puts one there (what
  the server stops at), not the system or user turns nor the template's "assistant" header.

The last labelled span of an example (the completion, or the last assistant turn) is its
*target*: greedy exact-match in the eval asks whether the model produces exactly it.

Nothing here imports torch; the tokenizer is a transformers tokenizer (``AutoTokenizer``).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

IGNORE = -100  # the label of a token that carries no loss (PyTorch's cross_entropy ignore_index)
ROLES = ("system", "user", "assistant")
ON_BAD_LINE = ("error", "skip")


class DataError(ValueError):
    """Bad training data: the message names the file, the line and what to fix."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One training row: input ids, labels (IGNORE where no loss), where it came from."""

    ids: tuple[int, ...]
    labels: tuple[int, ...]
    line: int = 0  # 1-based line number in its file (0: not from a file)
    target_start: int = 0  # the last labelled span (the eval's exact-match target) starts here

    @property
    def num_labels(self) -> int:
        return sum(1 for lab in self.labels if lab != IGNORE)


@dataclasses.dataclass(frozen=True)
class BadLine:
    line: int
    reason: str


@dataclasses.dataclass
class DataSet:
    path: str
    examples: list[Example]
    bad: list[BadLine]


class BadExample(DataError):
    """An example that cannot be used; its message is the reason (read_jsonl adds the line)."""


def _eos_id(tokenizer) -> int | None:
    return tokenizer.eos_token_id


def encode_prompt_completion(tokenizer, prompt: str, completion: str, line: int = 0) -> Example:
    """The served token ids of prompt + completion; labels on the completion and eos only."""
    prompt_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    eos = _eos_id(tokenizer)
    if eos is not None:
        completion_ids.append(eos)
    if not completion_ids:
        raise BadExample("the completion is empty and the tokenizer has no eos token: nothing to learn")
    ids = prompt_ids + completion_ids
    labels = [IGNORE] * len(prompt_ids) + completion_ids
    return Example(tuple(ids), tuple(labels), line, len(prompt_ids))


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    except Exception as e:  # noqa: BLE001 - a template may raise anything (jinja2 errors, raise_exception)
        raise BadExample(f"the model's chat template refused this conversation: {e}") from None
    # The server tokenises the rendered chat without adding special tokens (the template holds them).
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_messages(tokenizer, messages: list[dict], line: int = 0) -> Example:
    """The served token ids of a chat; labels on the assistant turns only (see the module doc)."""
    if not getattr(tokenizer, "chat_template", None):
        raise BadExample('this model\'s tokenizer has no chat template; use {"prompt", "completion"} lines')
    full = _render(tokenizer, messages, add_generation_prompt=False)
    labels = [IGNORE] * len(full)
    eos = _eos_id(tokenizer)
    target_start = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if full[: len(prompt)] != prompt or full[: len(upto)] != upto or len(upto) <= len(prompt):
            raise BadExample(f"the chat template renders assistant turn {i} differently inside the whole chat than after "
                       "its generation prompt, so its tokens are not the ones the server would see")
        end = len(upto)
        span = full[len(prompt):end]
        if eos is not None and eos in span:
            end = len(prompt) + span.index(eos) + 1  # the server stops at eos: what follows is never generated
        labels[len(prompt):end] = full[len(prompt):end]
        target_start = len(prompt)
    return Example(tuple(full), tuple(labels), line, target_start)


def _check_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise BadExample('"messages" must be a non-empty list of {"role", "content"} objects')
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) - {"role", "content"} or "role" not in m or "content" not in m:
            raise BadExample(f'messages[{i}] must be an object with exactly "role" and "content"')
        if m["role"] not in ROLES:
            raise BadExample(f"messages[{i}] has role {m['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise BadExample(f"messages[{i}].content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise BadExample("the conversation has no assistant message: nothing to learn")
    if out[-1]["role"] != "assistant":
        raise BadExample(f"the last message is from {out[-1]['role']!r}; a training conversation ends with the assistant's answer")
    return out


def encode_line(tokenizer, text: str, line: int, max_length: int) -> Example:
    """One JSONL line -> Example; raises BadExample with the reason."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadExample(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise BadExample(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        if "prompt" in obj or "completion" in obj:
            raise BadExample('give either "messages" or "prompt" and "completion", not both')
        example = encode_messages(tokenizer, _check_messages(obj["messages"]), line)
    elif "prompt" in obj or "completion" in obj:
        for key in ("prompt", "completion"):
            if key not in obj:
                raise BadExample(f'"{key}" is missing (a line holds "prompt" and "completion", or "messages")')
            if not isinstance(obj[key], str):
                raise BadExample(f'"{key}" must be a string, got {type(obj[key]).__name__}')
        if not obj["completion"]:
            raise BadExample('"completion" is empty')
        example = encode_prompt_completion(tokenizer, obj["prompt"], obj["completion"], line)
    else:
        keys = ", ".join(sorted(obj)) or "none"
        raise BadExample(f'expected "prompt" and "completion", or "messages" (keys found: {keys})')
    if len(example.ids) > max_length:
        labels = example.labels[:max_length]
        if all(lab == IGNORE for lab in labels):
            raise BadExample(f"{len(example.ids)} tokens, and truncating to --max-length {max_length} leaves no token to learn")
        example = Example(example.ids[:max_length], labels, line, min(example.target_start, max_length))
    if all(lab == IGNORE for lab in example.labels[1:]):
        raise BadExample("no token to learn after the first position: the prompt is empty (a first token has no context)")
    return example


def read_jsonl(path: str | Path, tokenizer, max_length: int, on_bad_line: str = "error",
               warn=None) -> DataSet:
    """Reads a JSONL file. A bad line raises DataError (``on_bad_line="error"``) or is reported
    through ``warn(message)`` and skipped (``"skip"``); a file with no usable line raises DataError."""
    if on_bad_line not in ON_BAD_LINE:
        raise ValueError(f"on_bad_line must be one of {ON_BAD_LINE}, got {on_bad_line!r}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    examples: list[Example] = []
    bad: list[BadLine] = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text, reason = None, "not valid UTF-8"
            if text is not None:
                if not text.strip():
                    continue
                try:
                    examples.append(encode_line(tokenizer, text, number, max_length))
                    continue
                except BadExample as e:
                    reason = str(e)
            if on_bad_line == "error":
                raise DataError(f"{path}:{number}: {reason} (pass --on-bad-line skip to skip such lines)")
            bad.append(BadLine(number, reason))
            if warn is not None:
                warn(f"{path}:{number}: skipped: {reason}")
    if not examples:
        raise DataError(f"{path}: no usable example" + (f" ({len(bad)} bad lines skipped)" if bad else " (the file is empty)"))
    return DataSet(str(path), examples, bad)
