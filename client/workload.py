"""Request schedules for the load generator: the S-LoRA paper's synthetic workload, or a trace.

A schedule is a list of `WorkloadRequest`, each with its arrival time in seconds after the
start of the run. Both sources make it from `generate(count, vocab_size)`, reproducibly from
their seed.

The synthetic workload (S-LoRA, arXiv 2311.03285, §7.1):

- Adapter popularity. With n adapters and exponent alpha in (0, 1], a request's adapter index is
  i = floor(n * U ** (1 / alpha)) for U uniform on [0, 1): the index follows the power
  distribution with density alpha * x ** (alpha - 1) on [0, 1), scaled to n buckets, so

      P(adapter i) = ((i + 1) / n) ** alpha - (i / n) ** alpha,    i = 0 .. n - 1.

  alpha = 1 is uniform; a smaller alpha is more skewed towards adapter 0 (for n = 100 and
  alpha = 0.1, adapter 0 takes 63% of the requests). This is the distribution of numpy's
  `power(alpha)` that the S-LoRA paper's generator uses.
- Arrivals are a Gamma process: the gaps between consecutive arrivals are independent
  Gamma(shape = 1 / cv**2, scale = 1 / (rate * shape)) seconds, so their mean is 1 / rate and
  their coefficient of variation (std / mean) is cv. cv = 1 is a Poisson process, cv = 0 a fixed
  gap. The first request arrives one gap after the start.
- Input and output lengths (tokens) are uniform integers in inclusive ranges; prompts are random
  token ids in [min_token_id, vocab_size), and `ignore_eos` makes each output exactly as long as
  drawn.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_STREAMS = ("adapters", "arrivals", "input_lengths", "output_lengths", "tokens")


@dataclass(frozen=True)
class WorkloadRequest:
    arrival: float  # seconds after the start of the run
    adapter: str | None  # None: the base model
    prompt: str | None  # text, or None when prompt_token_ids is the prompt
    prompt_token_ids: tuple[int, ...]
    max_new_tokens: int
    ignore_eos: bool

    def generate_kwargs(self) -> dict:
        """The keyword arguments of `Client.generate` / `AsyncClient.generate` for this request."""
        prompt = {"prompt": self.prompt} if self.prompt is not None else {"prompt_token_ids": self.prompt_token_ids}
        return {"adapter": self.adapter, **prompt, "max_new_tokens": self.max_new_tokens,
                "ignore_eos": self.ignore_eos}


def numbered_adapters(n: int, name_format: str = "adapter-{i:03d}") -> tuple[str, ...]:
    """The names of adapters 0 .. n-1, e.g. ('adapter-000', 'adapter-001', ...)."""
    return tuple(name_format.format(i=i) for i in range(n))


def adapter_popularity(n: int, alpha: float) -> np.ndarray:
    """P(adapter i) = ((i + 1) / n) ** alpha - (i / n) ** alpha for i in 0 .. n-1 (sums to 1)."""
    edges = (np.arange(n + 1) / n) ** alpha
    return np.diff(edges)


def sample_adapter_indices(rng: np.random.Generator, n: int, alpha: float, size: int) -> np.ndarray:
    """`size` adapter indices in [0, n) drawn with `adapter_popularity(n, alpha)`."""
    u = rng.random(size)
    return np.minimum((n * u ** (1.0 / alpha)).astype(np.int64), n - 1)


def gamma_arrivals(rng: np.random.Generator, rate: float, cv: float, size: int) -> np.ndarray:
    """`size` arrival times in seconds: cumulative sums of Gamma gaps with mean 1/rate and CV cv."""
    if cv == 0:
        gaps = np.full(size, 1.0 / rate)
    else:
        shape = 1.0 / cv**2
        gaps = rng.gamma(shape, 1.0 / (rate * shape), size)
    return np.cumsum(gaps)


def _check_range(name: str, bounds: tuple[int, int], low: int) -> None:
    lo, hi = bounds
    if not (low <= lo <= hi):
        raise ValueError(f"{name} must be (lo, hi) with {low} <= lo <= hi, got {bounds}")


@dataclass(frozen=True)
class SyntheticWorkload:
    """The S-LoRA synthetic workload (see the module docstring for the exact distributions).

    adapters: the adapter names, most popular first; empty sends every request to the base model.
    alpha: popularity exponent in (0, 1]; 1 is uniform, smaller is more skewed.
    rate: mean arrivals per second. cv: coefficient of variation of the gaps (>= 0).
    input_range, output_range: inclusive (lo, hi) token counts of prompts and outputs.
    """

    adapters: tuple[str, ...] = ()
    alpha: float = 1.0
    rate: float = 2.0
    cv: float = 1.0
    input_range: tuple[int, int] = (8, 512)
    output_range: tuple[int, int] = (8, 512)
    min_token_id: int = 0
    ignore_eos: bool = True
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "adapters", tuple(self.adapters))
        object.__setattr__(self, "input_range", tuple(self.input_range))
        object.__setattr__(self, "output_range", tuple(self.output_range))
        if not 0 < self.alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1] (1 is uniform), got {self.alpha}")
        if not self.rate > 0:
            raise ValueError(f"rate must be positive requests per second, got {self.rate}")
        if not self.cv >= 0:
            raise ValueError(f"cv must be >= 0, got {self.cv}")
        if len(set(self.adapters)) != len(self.adapters):
            raise ValueError("adapter names must be distinct")
        _check_range("input_range", self.input_range, 1)
        _check_range("output_range", self.output_range, 1)
        if self.min_token_id < 0:
            raise ValueError(f"min_token_id must be >= 0, got {self.min_token_id}")

    def generate(self, count: int, vocab_size: int) -> list[WorkloadRequest]:
        """The first `count` requests of this workload; prompt token ids lie in [min_token_id, vocab_size)."""
        if vocab_size <= self.min_token_id:
            raise ValueError(f"vocab_size {vocab_size} leaves no token id >= min_token_id {self.min_token_id}")
        rngs = dict(zip(_STREAMS, map(np.random.default_rng, np.random.SeedSequence(self.seed).spawn(len(_STREAMS)))))
        arrivals = gamma_arrivals(rngs["arrivals"], self.rate, self.cv, count)
        input_lengths = rngs["input_lengths"].integers(self.input_range[0], self.input_range[1] + 1, count)
        output_lengths = rngs["output_lengths"].integers(self.output_range[0], self.output_range[1] + 1, count)
        if self.adapters:
            names = [self.adapters[i] for i in sample_adapter_indices(rngs["adapters"], len(self.adapters),
                                                                      self.alpha, count)]
        else:
            names = [None] * count
        tokens = rngs["tokens"].integers(self.min_token_id, vocab_size, int(input_lengths.sum())).tolist()
        ends = np.cumsum(input_lengths).tolist()
        return [
            WorkloadRequest(
                arrival=float(arrivals[k]), adapter=names[k], prompt=None,
                prompt_token_ids=tuple(tokens[ends[k] - int(input_lengths[k]):ends[k]]),
                max_new_tokens=int(output_lengths[k]), ignore_eos=self.ignore_eos,
            )
            for k in range(count)
        ]


_TRACE_FIELDS = {"timestamp", "adapter", "prompt", "prompt_token_ids", "prompt_tokens", "output_tokens"}


@dataclass(frozen=True)
class TraceWorkload:
    """Replay of a JSONL trace, one request per line:

        {"timestamp": 12.5, "adapter": "sql", "prompt_tokens": 120, "output_tokens": 64}
        {"timestamp": 12.9, "adapter": null, "prompt": "Hello", "output_tokens": 16}

    timestamp: seconds, any origin; requests keep their gaps (divided by `speedup`) and the
    earliest arrives at 0. adapter: a name, or null / "" / absent for the base model. The prompt
    is one of `prompt` (text), `prompt_token_ids`, or `prompt_tokens` (a count: that many random
    token ids in [min_token_id, vocab_size), seeded). output_tokens: max_new_tokens (default
    `max_new_tokens`).
    """

    path: str
    speedup: float = 1.0
    max_new_tokens: int = 128
    min_token_id: int = 0
    ignore_eos: bool = True
    seed: int = 0

    def __post_init__(self):
        if not self.speedup > 0:
            raise ValueError(f"speedup must be positive, got {self.speedup}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.min_token_id < 0:
            raise ValueError(f"min_token_id must be >= 0, got {self.min_token_id}")

    def generate(self, count: int, vocab_size: int) -> list[WorkloadRequest]:
        """The `count` earliest requests of the trace, in arrival order."""
        lines = sorted(read_trace(self.path), key=lambda line: line["timestamp"])[:count]
        if not lines:
            return []
        start = lines[0]["timestamp"]
        rng = np.random.default_rng(self.seed)
        return [self._request(line, start, rng, vocab_size) for line in lines]

    def _request(self, line: dict, start: float, rng: np.random.Generator, vocab_size: int) -> WorkloadRequest:
        prompt, token_ids = line.get("prompt"), tuple(line.get("prompt_token_ids", ()))
        if "prompt_tokens" in line:
            if vocab_size <= self.min_token_id:
                raise ValueError(f"vocab_size {vocab_size} leaves no token id >= min_token_id {self.min_token_id}")
            token_ids = tuple(rng.integers(self.min_token_id, vocab_size, line["prompt_tokens"]).tolist())
        return WorkloadRequest(
            arrival=(line["timestamp"] - start) / self.speedup, adapter=line.get("adapter") or None,
            prompt=prompt, prompt_token_ids=token_ids,
            max_new_tokens=line.get("output_tokens", self.max_new_tokens), ignore_eos=self.ignore_eos,
        )


def read_trace(path: str) -> list[dict]:
    """The checked lines of a JSONL trace (blank lines skipped); ValueError names the bad line."""
    lines = []
    for number, text in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if text.strip():
            try:
                lines.append(_check_trace_line(json.loads(text)))
            except (ValueError, TypeError) as e:
                raise ValueError(f"{path}:{number}: {e}") from None
    return lines


def _check_trace_line(line) -> dict:
    if not isinstance(line, dict):
        raise ValueError("each line must be a JSON object")
    unknown = sorted(set(line) - _TRACE_FIELDS)
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}; fields are {', '.join(sorted(_TRACE_FIELDS))}")
    if not isinstance(line.get("timestamp"), (int, float)) or isinstance(line["timestamp"], bool):
        raise ValueError("timestamp (seconds, a number) is required")
    if line.get("adapter") is not None and not isinstance(line["adapter"], str):
        raise ValueError("adapter must be a string or null")
    prompts = [k for k in ("prompt", "prompt_token_ids", "prompt_tokens") if k in line]
    if len(prompts) != 1:
        raise ValueError("give exactly one of prompt, prompt_token_ids or prompt_tokens")
    if "prompt" in line and not (isinstance(line["prompt"], str) and line["prompt"]):
        raise ValueError("prompt must be a non-empty string")
    if "prompt_token_ids" in line and not (_is_int_list(line["prompt_token_ids"]) and line["prompt_token_ids"]):
        raise ValueError("prompt_token_ids must be a non-empty list of integers")
    for key in ("prompt_tokens", "output_tokens"):
        if key in line and not (_is_int(line[key]) and line[key] >= 1):
            raise ValueError(f"{key} must be a positive integer")
    return line


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_int_list(value) -> bool:
    return isinstance(value, list) and all(_is_int(v) for v in value)
