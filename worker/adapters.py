"""Reads PEFT LoRA adapters and refuses, with a message, anything lorafleet cannot serve exactly."""
from __future__ import annotations

import json
import math
import os
import re
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import xxhash

from .config import ModelConfig

# The seven Llama projections, in the order they are packed into pages.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_MODULE = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>A|B)(?:\.[^.]+)?\.weight$")
_LAYER_TARGET = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(?P<block>self_attn|mlp)\.(?P<target>\w+)$")
# safetensors dtype names -> torch dtypes (the ones an adapter can hold; others are refused by name)
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
_MAX_HEADER = 100 * 2**20


class AdapterError(ValueError):
    """An adapter that cannot be served. The message names the adapter and the reason."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"adapter {name!r}: {reason}")
        self.adapter, self.reason = name, reason

    def __reduce__(self):  # crosses process boundaries (Ray) with its fields intact
        return AdapterError, (self.adapter, self.reason)


def target_shape(cfg: ModelConfig, target: str) -> tuple[int, int]:
    """(out_features, in_features) of a base projection."""
    h, q, kv, i = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    return {
        "q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
        "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i),
    }[target]


@dataclass
class LoraWeights:
    """One adapter's full (unsharded) weights on the CPU, in the dtype the file stores them in
    (views into the buffer the file was read into; packing casts each once, into its pages).

    ranks[target]: the rank of that target (the largest over layers; smaller layers are zero-padded).
    scales[target]: alpha / r, or alpha / sqrt(r) for rsLoRA.
    weights[(layer, target)] = (A (r, in), B (out, r)); a layer without the target has no entry.
    """

    name: str
    ranks: dict[str, int]
    scales: dict[str, float]
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    version: str = ""  # a hash of the config and the tensors as read: equal files, equal versions
    # (xxh3-128: it tells versions of a file apart; it is no defence against someone who can write
    # the adapter folder, who can serve anything through it anyway)

    @property
    def rank(self) -> int:
        return max(self.ranks.values())


def read_adapter(name: str, path: str | Path, cfg: ModelConfig, max_rank: int) -> LoraWeights:
    """Reads and checks a PEFT folder. Raises AdapterError; never unpickles anything.

    What the header and the config say is checked once for all files that share them (the
    adapters of one training recipe do: same tensors, shapes and offsets) and kept in `_LAYOUTS`;
    what the bytes say (finite weights, the version) is checked on every read.
    """
    path = Path(path)
    config = read_config(name, path)
    config_key = json.dumps(config, sort_keys=True)
    header, data = _read_file(name, path)
    layout = _LAYOUTS.get(name, header, data.numel(), config, config_key, cfg, max_rank)
    buffer = _Buffer(data)
    weights = {lt: (buffer.view(a), buffer.view(b)) for lt, (a, b) in layout.pairs.items()}
    # one pass over all the weights; only if it fails is each pair checked, to name the one at fault
    if not buffer.all_finite(layout.float_ranges):
        for (layer, target), (a, b) in weights.items():
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise AdapterError(name, f"layer {layer} {target}: weights contain NaN or Inf")
    version = xxhash.xxh3_128(config_key.encode())
    version.update(layout.described)
    version.update(memoryview(data.numpy()))
    return LoraWeights(name, dict(layout.ranks), dict(layout.scales), weights, version.hexdigest())


def read_config(name: str, path: Path) -> dict:
    """The folder's adapter_config.json, checked against what lorafleet serves. Raises AdapterError.

    The one check of a config: reading an adapter and listing a folder both use it.
    """
    if not path.is_dir():
        raise AdapterError(name, f"{path} is not a folder")
    cfg_path = path / "adapter_config.json"
    if not cfg_path.is_file():
        raise AdapterError(name, f"{path} has no adapter_config.json; expected a PEFT LoRA folder")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(name, f"adapter_config.json is not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise AdapterError(name, "adapter_config.json is not a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(name, f"peft_type {peft_type} is not supported; only LORA adapters are served")
    if config.get("use_dora"):
        raise AdapterError(name, "DoRA (use_dora=true) is not supported")
    if config.get("modules_to_save"):
        raise AdapterError(name, f"modules_to_save {config['modules_to_save']} is not supported: it replaces base weights, which all adapters share")
    if config.get("bias", "none") != "none":
        raise AdapterError(name, f"bias={config['bias']!r} is not supported (only 'none')")
    if config.get("lora_bias"):
        raise AdapterError(name, "lora_bias=true is not supported (it trains a bias on B)")
    if config.get("layer_replication"):
        raise AdapterError(name, "layer_replication is not supported")
    if config.get("fan_in_fan_out"):
        raise AdapterError(name, "fan_in_fan_out=true is not supported for Llama-family models")
    for key in ("lora_alpha", "r"):
        if key in config and (isinstance(config[key], bool) or not isinstance(config[key], (int, float))):
            raise AdapterError(name, f"{key} must be a number, got {config[key]!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise AdapterError(name, f"{key} must be an object of module pattern -> number, got {config[key]!r}")
    targets = config.get("target_modules")
    if targets is not None and not isinstance(targets, (str, list)):
        raise AdapterError(name, f"target_modules must be a list of module names, got {targets!r}")
    return config


def check_folder(name: str, path: Path) -> dict:
    """What listing can check without reading the weights: the config, and each lora_A's rank in the
    safetensors header against the config's r (PEFT refuses a file that disagrees). Raises AdapterError."""
    config = read_config(name, path)
    raw, _ = _read_file(name, path, with_data=False)
    try:
        header = json.loads(raw)
    except ValueError as e:
        raise AdapterError(name, f"adapter_model.safetensors cannot be read ({e})") from e
    if not isinstance(header, dict):
        raise AdapterError(name, "adapter_model.safetensors has a header that is not a JSON object")
    for key, meta in header.items():
        m = _KEY.match(key)
        if m is None or m["ab"] != "A" or not isinstance(meta, dict) or not meta.get("shape"):
            continue
        declared = _pattern_value(config.get("rank_pattern"), m["module"], config.get("r"))
        if declared is not None and meta["shape"][0] != declared:
            raise AdapterError(name, f"adapter_config.json says r={declared:g} for {m['module'].rsplit('.', 1)[-1]} "
                                     f"but its tensors have rank {meta['shape'][0]}")
    return config


def _read_file(name: str, path: Path, with_data: bool = True) -> tuple[bytes, torch.Tensor | None]:
    """adapter_model.safetensors as the bytes of its JSON header and its data, read in one call into
    one buffer (a few hundred get_tensor calls on an mmap cost several times more); without
    with_data, the header alone (data None)."""
    st = path / "adapter_model.safetensors"
    if not st.is_file():
        pickled = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
        if pickled:
            raise AdapterError(name, f"{pickled[0]} is pickled; lorafleet never unpickles weights. Re-save it with safetensors (save_pretrained(safe_serialization=True))")
        raise AdapterError(name, "adapter_model.safetensors is missing")
    try:
        with open(st, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) != 8:
                raise ValueError("the file is shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise ValueError(f"header length {n} does not fit the file of {size} bytes")
            header = f.read(n)
            if not with_data:
                return header, None
            data = torch.empty(size - 8 - n, dtype=torch.uint8)
            if data.numel() and f.readinto(memoryview(data.numpy())) != data.numel():
                raise ValueError("the file ended early")
    except (ValueError, OSError) as e:
        raise AdapterError(name, f"adapter_model.safetensors cannot be read ({e})") from e
    return header, data


class _Tensor(NamedTuple):
    """One tensor of a safetensors file: where its bytes lie in the data."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class _Layout:
    """What a safetensors header and an adapter config say, checked against the base model."""

    pairs: dict[tuple[int, str], tuple[_Tensor, _Tensor]]  # (layer, target) -> (A, B)
    ranks: dict[str, int]
    scales: dict[str, float]
    float_ranges: tuple[tuple[torch.dtype, int, int], ...]  # the bytes of the floating-point tensors, adjacent ones joined
    described: bytes  # the tensors' names, shapes and dtypes, for the version


class _Layouts:
    """The checked layouts of the last few distinct (header, data size, config) a store read.

    Thread-safe (loader threads); a check that fails raises, naming the adapter, and keeps nothing."""

    def __init__(self, size: int = 16):
        self.size = size
        self._items: OrderedDict[tuple, _Layout] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, name: str, header: bytes, data_size: int, config: dict, config_key: str,
            cfg: ModelConfig, max_rank: int) -> _Layout:
        key = (header, data_size, config_key, cfg, max_rank)
        with self._lock:
            layout = self._items.get(key)
            if layout is not None:
                self._items.move_to_end(key)
                return layout
        layout = _check_layout(name, header, data_size, config, cfg, max_rank)
        with self._lock:
            self._items[key] = layout
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return layout

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


_LAYOUTS = _Layouts()


def _check_layout(name: str, header: bytes, data_size: int, config: dict, cfg: ModelConfig, max_rank: int) -> _Layout:
    """Every check of what a header and a config say: tensors, pairs, shapes, ranks and scales.
    Raises AdapterError naming `name`."""
    try:
        tensors = _parse_header(header, data_size)
    except (ValueError, KeyError, TypeError) as e:
        raise AdapterError(name, f"adapter_model.safetensors cannot be read ({e})") from e
    pairs = _pair_tensors(name, tensors, cfg)
    ranks: dict[str, int] = {}
    scales: dict[str, float] = {}
    checked = {}
    for (layer, target), (a, b) in sorted(pairs.items()):
        r = _check_pair(name, layer, target, a, b, cfg, max_rank)
        module = f"model.layers.{layer}.{_MODULE[target]}.{target}"
        declared = _pattern_value(config.get("rank_pattern"), module, config.get("r"))
        if declared is not None and r != declared:  # PEFT builds r-sized layers and refuses the file
            raise AdapterError(name, f"adapter_config.json says r={declared:g} for {target} but its tensors in layer {layer} have rank {r}")
        scale = _scale(config, module, r)
        if target in scales and scales[target] != scale:
            raise AdapterError(name, f"{target} has different scales in different layers; per-layer rank_pattern/alpha_pattern is not supported")
        scales[target] = scale
        ranks[target] = max(ranks.get(target, 0), r)
        checked[(layer, target)] = (a, b)
    if not checked:
        raise AdapterError(name, "adapter_model.safetensors holds no LoRA weights")
    # Zero-padding a smaller rank keeps the product exact but changes alpha/r: refuse mixed ranks per target.
    for (layer, target), (a, _) in checked.items():
        if a.shape[0] != ranks[target]:
            raise AdapterError(name, f"{target} has rank {a.shape[0]} in layer {layer} but {ranks[target]} elsewhere; per-layer ranks are not supported")
    floats = sorted((str(t.dtype), t.begin, t.end, t.dtype) for t in tensors.values() if t.dtype.is_floating_point)
    float_ranges: list[list] = []
    for _, begin, end, dtype in floats:
        if float_ranges and float_ranges[-1][0] == dtype and float_ranges[-1][2] == begin:
            float_ranges[-1][2] = end
        else:
            float_ranges.append([dtype, begin, end])
    described = repr(sorted((key, t.shape, t.dtype) for key, t in tensors.items())).encode()
    return _Layout(checked, ranks, scales, tuple(map(tuple, float_ranges)), described)


def _parse_header(header: bytes, data_size: int) -> dict[str, _Tensor]:
    """The safetensors header (JSON), checked field by field against data of data_size bytes.
    Nothing is executed or unpickled."""
    meta_of = json.loads(header)
    if not isinstance(meta_of, dict):
        raise ValueError("the header is not a JSON object")
    tensors = {}
    for key, meta in meta_of.items():
        if key == "__metadata__":
            continue
        if not isinstance(meta, dict) or meta.get("dtype") not in _ST_DTYPES:
            raise ValueError(f"tensor {key!r} has an unknown dtype {meta.get('dtype') if isinstance(meta, dict) else meta!r}")
        dtype, shape, offsets = _ST_DTYPES[meta["dtype"]], meta.get("shape"), meta.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise ValueError(f"tensor {key!r} has a bad shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_size):
            raise ValueError(f"tensor {key!r} has bad data_offsets {offsets!r}")
        begin, end = offsets
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"tensor {key!r}: {end - begin} bytes for shape {shape} of {meta['dtype']}")
        tensors[key] = _Tensor(dtype, tuple(shape), begin, end)
    return tensors


class _Buffer:
    """A file's data, seen as tensors."""

    def __init__(self, data: torch.Tensor):
        self.data = data
        self._typed: dict[torch.dtype, torch.Tensor] = {}  # the whole buffer seen as each dtype

    def view(self, t: _Tensor) -> torch.Tensor:
        return self.flat(t.dtype, t.begin, t.end).view(t.shape)

    def flat(self, dtype: torch.dtype, begin: int, end: int) -> torch.Tensor:
        """The bytes [begin, end) as a flat tensor of dtype: a view, or a copy if they are misaligned for it."""
        size = dtype.itemsize
        if begin % size:
            return self.data[begin:end].clone().view(dtype)
        typed = self._typed.get(dtype)
        if typed is None:
            typed = self._typed[dtype] = self.data[:self.data.numel() // size * size].view(dtype)
        return typed[begin // size:end // size]

    def all_finite(self, ranges) -> bool:
        """True if every value in the (dtype, begin, end) ranges is finite. A NaN or Inf makes a sum
        NaN or Inf; a False can also be an overflowing sum of finite values, so False only means:
        check each."""
        for dtype, begin, end in ranges:
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            if not math.isfinite(self.flat(dtype, begin, end).sum(dtype=acc).item()):
                return False
        return True


def _pair_tensors(name: str, tensors: dict[str, _Tensor], cfg: ModelConfig) -> dict:
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if "lora_embedding" in key or "embed_tokens" in key:
            raise AdapterError(name, "embedding (embed_tokens) targets are not supported")
        m = _KEY.match(key)
        if not m:
            raise AdapterError(name, f"tensor {key!r} is not a LoRA A/B weight (modules_to_save or bias weights are not supported)")
        module = m["module"]
        if module.endswith("lm_head"):
            raise AdapterError(name, "lm_head targets are not supported")
        lt = _LAYER_TARGET.match(module)
        if not lt or lt["target"] not in TARGETS or _MODULE[lt["target"]] != lt["block"]:
            raise AdapterError(name, f"target module {module!r} is not one of the Llama projections {', '.join(TARGETS)}")
        layer = int(lt["layer"])
        if layer >= cfg.num_layers:
            raise AdapterError(name, f"{module}: the base model has only {cfg.num_layers} layers")
        pairs.setdefault((layer, lt["target"]), {})[m["ab"]] = t
    for (layer, target), ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(name, f"layer {layer} {target} has lora_{''.join(ab)} but not both A and B")
    return {k: (v["A"], v["B"]) for k, v in pairs.items()}


def _check_pair(name, layer, target, a: _Tensor, b: _Tensor, cfg: ModelConfig, max_rank: int) -> int:
    out_f, in_f = target_shape(cfg, target)
    where = f"layer {layer} {target}"
    if len(a.shape) != 2 or len(b.shape) != 2:
        raise AdapterError(name, f"{where}: LoRA weights must be 2-D matrices")
    r = a.shape[0]
    if r < 1 or r > max_rank:
        raise AdapterError(name, f"rank {r} is above the server's maximum of {max_rank} (--max-lora-rank)")
    if a.shape != (r, in_f) or b.shape != (out_f, r):
        raise AdapterError(name, f"{where}: shapes A {a.shape}, B {b.shape} do not match the base model (expected A ({r}, {in_f}), B ({out_f}, {r})); was it trained for another model?")
    if not a.dtype.is_floating_point or not b.dtype.is_floating_point:
        raise AdapterError(name, f"{where}: weights must be floating point, got {a.dtype}")
    return r


def _pattern_value(patterns: dict, module: str, default):
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def _scale(config: dict, module: str, r: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
    if config.get("use_rslora"):
        return alpha / r ** 0.5
    return alpha / r
