"""The base model's shape, read from a Hugging Face `config.json`."""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)  # "auto": resolve_dtype picks the fast one for the device
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of native bfloat16 matmuls


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bfloat16 natively (AMX tiles or AVX512-BF16 dot products).

    cpuinfo: the text of /proc/cpuinfo (read here when None). Without it (not Linux) the answer
    is no: torch's CPU capability ("AVX512", "AVX2", ...) does not tell whether bfloat16 is native.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return any(flag in flags for flag in CPU_BF16_FLAGS)
    return False


def resolve_dtype(dtype: str, device: str = "cpu", cpuinfo: str | None = None) -> str:
    """The dtype to serve in: `dtype` itself, or for "auto" the fast one where it is exact enough.

    "auto" is bfloat16 on CUDA (float16 on a GPU without bfloat16, before Ampere) and on a CPU
    with AMX or AVX512-BF16 (3-6x the float32 matmul rate there), float32 on other CPUs.
    """
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(DTYPE_CHOICES)}")
        return dtype
    if str(device).startswith("cuda"):
        # where CUDA is not visible here (the GPUs are on Ray's other nodes), trust the GPU to have bfloat16
        if torch.cuda.is_available() and not torch.cuda.is_bf16_supported(including_emulation=False):
            return "float16"
        return "bfloat16"
    return "bfloat16" if cpu_has_native_bf16(cpuinfo) else "float32"

# How Ray places a replica's tp ranks (its placement group's strategy).
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


class ModelConfigError(ValueError):
    """The model folder cannot be served; the message says why."""


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    kind: str = "default"  # "default" or "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def inv_freq(self, head_dim: int) -> torch.Tensor:
        """Inverse frequencies, float32, shape (head_dim // 2,)."""
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        inv_freq = 1.0 / (self.theta ** exponents)
        if self.kind == "llama3":
            inv_freq = self._llama3_scaled(inv_freq)
        return inv_freq

    def _llama3_scaled(self, inv_freq: torch.Tensor) -> torch.Tensor:
        """Llama 3.1 frequency scaling: long wavelengths divided by `factor`, a smooth ramp between."""
        low_wavelen = self.original_max_position / self.low_freq_factor
        high_wavelen = self.original_max_position / self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / self.factor, inv_freq)
        smooth = (self.original_max_position / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position: int
    tie_embeddings: bool
    qkv_bias: bool
    rope: RopeConfig = field(default_factory=RopeConfig)
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ModelConfigError(f"{model_dir}: no config.json; expected a Hugging Face model folder")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ModelConfigError(f"{path}: not valid JSON ({e})") from e
        gen_path = Path(model_dir) / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
        return cls.from_dict(raw, gen, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, generation: dict | None = None, source: str = "config") -> "ModelConfig":
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelConfigError(
                f"{source}: model_type {model_type!r} is not supported; lorafleet serves {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if raw.get("hidden_act", "silu") != "silu":
            raise ModelConfigError(f"{source}: hidden_act {raw['hidden_act']!r} is not supported (only silu)")
        if raw.get("mlp_bias"):
            raise ModelConfigError(f"{source}: mlp_bias is not supported")
        if raw.get("use_sliding_window") or (model_type == "mistral" and raw.get("sliding_window")):
            # Sliding-window attention changes outputs past the window; refuse rather than serve it wrong.
            window = raw.get("sliding_window")
            if window is not None and window < raw.get("max_position_embeddings", 0):
                raise ModelConfigError(f"{source}: sliding-window attention (window {window}) is not supported")
        heads = raw["num_attention_heads"]
        hidden = raw["hidden_size"]
        head_dim = raw.get("head_dim") or hidden // heads
        generation = generation or {}
        eos = generation.get("eos_token_id", raw.get("eos_token_id"))
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            model_type=model_type,
            vocab_size=raw["vocab_size"],
            hidden_size=hidden,
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            max_position=raw.get("max_position_embeddings", 2048),
            tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(raw.get("attention_bias", False)),
            rope=_rope_from(raw, source),
            eos_token_ids=eos_ids,
            bos_token_id=raw.get("bos_token_id"),
        )


def _rope_from(raw: dict, source: str) -> RopeConfig:
    """Reads both the transformers-5 `rope_parameters` and the older `rope_theta` + `rope_scaling`."""
    params = dict(raw.get("rope_parameters") or {})
    params.update(raw.get("rope_scaling") or {})
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return RopeConfig(theta=theta)
    if kind != "llama3":
        raise ModelConfigError(f"{source}: rope scaling {kind!r} is not supported (default and llama3 are)")
    return RopeConfig(
        theta=theta,
        kind="llama3",
        factor=params["factor"],
        low_freq_factor=params.get("low_freq_factor", 1.0),
        high_freq_factor=params.get("high_freq_factor", 4.0),
        original_max_position=params.get("original_max_position_embeddings", raw.get("max_position_embeddings", 8192)),
    )


@dataclass(frozen=True)
class WorkerConfig:
    """What one worker process needs; validated once, passed down."""

    model_dir: str
    dtype: str = "auto"  # resolved once (resolve_dtype): the field always holds a concrete dtype
    device: str = "cpu"
    pool_bytes: int | None = 512 * 2**20  # None: pool_fraction of free device memory (CUDA)
    pool_fraction: float = 0.9
    max_lora_rank: int = 256
    # the row-parallel projections' output with its LoRA communication (worker/lora.py's
    # row_parallel_output when None); bench/ablations.py injects the unfused one to measure it
    row_output: Callable | None = None
    placement_strategy: str = "PACK"  # of a replica's Ray placement group (RayWorkerGroup)
    warm_rows: int = 0  # the base matmuls are prepared at load for steps of 1 .. warm_rows tokens (decode sizes)

    def __post_init__(self):
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ValueError(f"placement strategy {self.placement_strategy!r}: choose one of {', '.join(PLACEMENT_STRATEGIES)}")
        object.__setattr__(self, "dtype", resolve_dtype(self.dtype, self.device))
        if self.pool_bytes is not None and self.pool_bytes <= 0:
            raise ValueError("pool_bytes must be positive")
        if not 0 < self.pool_fraction <= 1:
            raise ValueError("pool_fraction must be in (0, 1]")
        if self.max_lora_rank < 1:
            raise ValueError("max_lora_rank must be at least 1")
        if self.warm_rows < 0:
            raise ValueError("warm_rows must be >= 0")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]
