"""The one output processor: a request's sampled tokens -> chunks of text, cut at its stop strings.

Every front end streams what this returns; `lorafleet run` keeps the last chunk's totals.
Text that could be the start of a stop string is held back until it cannot be, so no chunk
ever shows part of a stop string.
"""
from __future__ import annotations

from dataclasses import dataclass

from .sequence import Request
from .tokenizer import IncrementalDecoder, Tokenizer


@dataclass(frozen=True)
class Chunk:
    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # on the last chunk: length, stop or cancelled
    prompt_tokens: int = 0  # usage, on the last chunk
    completion_tokens: int = 0


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None, request: Request):
        self.request = request
        self.decoder = IncrementalDecoder(tokenizer) if tokenizer is not None else None
        self.stops = list(request.stop)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""
        self.sent_tokens = 0
        self.finished = False
        self.stopped_by_string = False  # the engine still runs the request: the caller aborts it

    def push(self, tokens: list[int], finish_reason: str | None = None) -> Chunk:
        """The next chunk for these new tokens; finish_reason is the engine's, on its last tokens."""
        if self.finished:
            raise RuntimeError("the request has already finished")
        self.sent_tokens += len(tokens)
        if self.decoder is not None:
            self.pending += self.decoder.push(tokens)
            if finish_reason is not None:
                self.pending += self.decoder.flush()
        cut = _find_stop(self.pending, self.stops)
        if cut is not None:
            self.pending, finish_reason = self.pending[:cut], "stop"
            self.stopped_by_string = True
        if finish_reason is not None:
            text, self.pending = self.pending, ""
            self.finished = True
            return Chunk(list(tokens), text, finish_reason, len(self.request.prompt_ids), self.sent_tokens)
        keep = min(self.hold, len(self.pending))
        text, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return Chunk(list(tokens), text)

    def cancel(self) -> Chunk:
        """The last chunk of a request that ends before the engine finished it (no more tokens)."""
        return self.push([], "cancelled")


def _find_stop(text: str, stops: list[str]) -> int | None:
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(cuts) if cuts else None
