"""Test-side peers: the oracle that lorafleet is checked against.

Everything here uses the real libraries and their real on-disk formats:

* ``make_tiny_model`` builds a tiny random Llama-family model with
  ``transformers`` and saves it with ``save_pretrained`` (safetensors), plus a
  byte-level ``tokenizer.json`` built with ``tokenizers``.
* ``make_adapter`` builds a LoRA adapter with ``peft`` and saves it with
  ``save_pretrained`` (``adapter_config.json`` + ``adapter_model.safetensors``).
* ``make_bad_adapter`` builds adapters that lorafleet must refuse.
* ``peft_greedy`` / ``peft_logits`` run transformers (+ ``PeftModel``) and are
  the reference for greedy decoding.

The random models are deliberately well conditioned (large initializer range,
see ``DEFAULT_INIT_RANGE``) so that greedy decoding has clear top-1 margins and
two correct implementations agree token for token.  ``greedy_margins`` measures
this and ``tests/test_peers.py`` asserts it.

Import this module as ``import peers`` / ``from peers import ...`` from any
test file: ``tests/conftest.py`` puts ``tests/`` on ``sys.path`` (pytest's
default ``prepend`` import mode does too, as there is no
``tests/__init__.py``).  Every public function runs torch on one thread.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import warnings
import zlib
from pathlib import Path
from typing import Iterable, Sequence

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

__all__ = [
    "SPECIAL_TOKENS",
    "BYTE_OFFSET",
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "DEFAULT_VOCAB_SIZE",
    "DEFAULT_INIT_RANGE",
    "DEFAULT_ADAPTER_STRENGTH",
    "CHAT_TEMPLATE",
    "ALL_TARGETS",
    "ATTN_TARGETS",
    "MLP_TARGETS",
    "BAD_ADAPTER_KINDS",
    "LLAMA3_ROPE_SCALING",
    "make_tiny_model",
    "make_tokenizer",
    "make_adapter",
    "make_bad_adapter",
    "encode",
    "decode",
    "peft_greedy",
    "peft_greedy_with_margins",
    "peft_logits",
    "greedy_margins",
    "compare_greedy",
    "load_peer_model",
    "clear_peer_cache",
]

# --------------------------------------------------------------------------
# Quiet, single-threaded torch work
# --------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_one_thread():
    """Run tiny-model torch work on one thread, without progress bars/warnings.

    On the 2-core test machines, with other processes busy, two intra-op
    threads made a 64-token generate 10-30x slower than one.  One thread also
    keeps the oracle's float rounding independent of the caller's settings.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*save_embedding_layers.*")
            yield
    finally:
        torch.set_num_threads(old)


def _peer_call(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _quiet_one_thread():
            return fn(*args, **kwargs)

    return wrapper


# --------------------------------------------------------------------------
# Tokenizer: 8 special tokens, then the 256 bytes (byte b has id b + 8).
# --------------------------------------------------------------------------

SPECIAL_TOKENS = [
    "<pad>",
    "<s>",
    "</s>",
    "<unk>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
]
PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
BYTE_OFFSET = len(SPECIAL_TOKENS)
DEFAULT_VOCAB_SIZE = BYTE_OFFSET + 256  # 264

# A plain jinja chat template over the role tokens above.  The tokenizer does
# not add <s> by itself, so the template starts with it.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# Random weights ~ N(0, 0.2^2) make logits spread out (std of a few units)
# instead of the near-uniform logits of the usual 0.02.
DEFAULT_INIT_RANGE = 0.2
# A LoRA delta scale * B @ A is rescaled to this fraction of the Frobenius
# norm of the base weight it modifies: big enough to change greedy output.
DEFAULT_ADAPTER_STRENGTH = 0.35

ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
ALL_TARGETS = ATTN_TARGETS + MLP_TARGETS

BAD_ADAPTER_KINDS = (
    "bin",
    "dora",
    "modules_to_save",
    "embedding_target",
    "lm_head_target",
    "shape_mismatch",
    "nan",
    "inf",
    "no_weights",
    "bad_config",
    "not_lora",
)


def _byte_to_char() -> dict[int, str]:
    """The reversible byte -> printable unicode char table of byte-level BPE.

    Printable latin-1 bytes map to themselves; the others are shifted to
    code points 256 and up, in byte order.
    """
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table: dict[int, str] = {}
    shifted = 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def make_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE):
    """A byte-level ``tokenizers.Tokenizer`` with exactly ``vocab_size`` ids.

    Ids 0..7 are SPECIAL_TOKENS, ids 8..263 the bytes 0..255, and any ids past
    264 are extra special tokens ``<|extra_k|>``.  No merges, no automatic
    <s>: ``decode(encode(s)) == s`` for every string.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    if vocab_size < DEFAULT_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {DEFAULT_VOCAB_SIZE}, got {vocab_size}")
    specials = list(SPECIAL_TOKENS) + [
        f"<|extra_{k}|>" for k in range(vocab_size - DEFAULT_VOCAB_SIZE)
    ]
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for b, ch in _byte_to_char().items():
        vocab[ch] = BYTE_OFFSET + b
    for k, tok in enumerate(specials[len(SPECIAL_TOKENS):]):
        vocab[tok] = DEFAULT_VOCAB_SIZE + k
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size
    return tok


def _write_tokenizer(out_dir: Path, vocab_size: int, max_len: int) -> None:
    tok = make_tokenizer(vocab_size)
    tok.save(str(out_dir / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    special_map = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


@functools.lru_cache(maxsize=8)
def _tokenizer_for(vocab_size: int):
    return make_tokenizer(vocab_size)


def encode(text: str, vocab_size: int = DEFAULT_VOCAB_SIZE) -> list[int]:
    """Token ids of ``text`` (no <s> added) with the fixture tokenizer."""
    return _tokenizer_for(vocab_size).encode(text, add_special_tokens=False).ids


def decode(ids: Sequence[int], vocab_size: int = DEFAULT_VOCAB_SIZE, skip_special_tokens: bool = True) -> str:
    return _tokenizer_for(vocab_size).decode(list(ids), skip_special_tokens=skip_special_tokens)


# --------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------

# Real Llama 3.x checkpoints carry this block (with larger numbers); a small
# original_max_position_embeddings makes the scaling matter at test lengths.
LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


@_peer_call
def make_tiny_model(
    out_dir,
    *,
    model_type: str = "llama",
    num_heads: int = 4,
    num_kv_heads: int = 4,
    hidden: int = 64,
    intermediate: int = 128,
    layers: int = 2,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    tie_embeddings: bool = False,
    attention_bias: bool = False,
    rope_scaling: dict | None = None,
    rope_theta: float = 10000.0,
    max_position_embeddings: int = 512,
    max_shard_size: str | int | None = None,
    legacy_rope_keys: bool | None = None,
    init_range: float = DEFAULT_INIT_RANGE,
    seed: int = 0,
) -> Path:
    """Save a tiny random causal LM (float32, safetensors) with a tokenizer.

    ``model_type`` is "llama", "mistral" or "qwen2" (qwen2 always has q/k/v
    bias).  ``rope_scaling`` is a Hugging Face rope-scaling dict, e.g.
    ``LLAMA3_ROPE_SCALING``.

    transformers 5 writes rope settings as ``"rope_parameters": {"rope_type",
    "rope_theta", ...}``.  Checkpoints on the Hub (Llama 3, Qwen2, Mistral,
    SmolLM2) instead have top-level ``"rope_theta"`` and ``"rope_scaling"``.
    With ``legacy_rope_keys=True`` config.json is rewritten to that older form
    (transformers reads both); the default is legacy form exactly when
    ``rope_scaling`` is given.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rope_parameters = {"rope_type": "default", "rope_theta": float(rope_theta)}
    if rope_scaling:
        rope_parameters = {**rope_scaling, "rope_theta": float(rope_theta)}
        rope_parameters.setdefault("rope_type", rope_parameters.pop("type", "default"))
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        initializer_range=init_range,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie_embeddings,
        rope_parameters=rope_parameters,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    if model_type == "llama":
        config = LlamaConfig(attention_bias=attention_bias, mlp_bias=False, **common)
    elif model_type == "mistral":
        if attention_bias:
            raise ValueError("Mistral has no attention bias")
        config = MistralConfig(sliding_window=None, **common)
    elif model_type == "qwen2":
        config = Qwen2Config(use_sliding_window=False, sliding_window=None, **common)
    else:
        raise ValueError(f"unsupported model_type {model_type!r}")

    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG alone
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _condition_model(model, seed=seed)
    model.eval()
    kwargs = {}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out_dir, safe_serialization=True, **kwargs)

    if legacy_rope_keys is None:
        legacy_rope_keys = bool(rope_scaling)
    if legacy_rope_keys:
        _rewrite_rope_keys_legacy(out_dir / "config.json")
    _write_tokenizer(out_dir, vocab_size, max_position_embeddings)
    return out_dir


def _condition_model(model: torch.nn.Module, seed: int) -> None:
    """Make the random model's greedy decoding well conditioned.

    * Norm weights become random around 1 (so an implementation that forgets
      a norm weight is caught), biases random and small.
    * Everything else keeps transformers' N(0, init_range^2) init.
    """
    gen = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def _rewrite_rope_keys_legacy(config_path: Path) -> None:
    cfg = json.loads(config_path.read_text())
    rp = dict(cfg.pop("rope_parameters", None) or {})
    theta = rp.pop("rope_theta", 10000.0)
    cfg["rope_theta"] = theta
    rope_type = rp.get("rope_type", "default")
    if rope_type == "default":
        cfg["rope_scaling"] = None
    else:
        rp["rope_type"] = rope_type
        cfg["rope_scaling"] = rp
    config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------
# Adapters
# --------------------------------------------------------------------------


def _name_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


def _load_base(model_dir, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(Path(model_dir).resolve()), dtype=dtype)
    model.eval()
    return model


def _randomize_lora(peft_model, adapter_name: str, seed: int, strength: float) -> None:
    """Random A and B with ||scale * B @ A||_F = strength * ||W||_F per module."""
    from peft.tuners.lora import LoraLayer

    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
                continue
            if adapter_name in getattr(module, "lora_embedding_A", {}):
                continue
            a = module.lora_A[adapter_name].weight
            b = module.lora_B[adapter_name].weight
            gen = torch.Generator().manual_seed(_name_seed(seed, name))
            a_new = torch.randn(a.shape, generator=gen) / math.sqrt(a.shape[1])
            b_new = torch.randn(b.shape, generator=gen)
            scale = module.scaling[adapter_name]
            w = module.get_base_layer().weight.float()
            delta = scale * (b_new @ a_new)
            b_new *= strength * w.norm() / delta.norm()
            a.copy_(a_new)
            b.copy_(b_new)


@_peer_call
def make_adapter(
    model_dir,
    out_dir,
    *,
    r: int,
    lora_alpha: float,
    target_modules: Iterable[str],
    use_rslora: bool = False,
    seed: int = 0,
    strength: float = DEFAULT_ADAPTER_STRENGTH,
    **lora_kwargs,
) -> Path:
    """Save a PEFT LoRA adapter for the model in ``model_dir``.

    ``LoraConfig(init_lora_weights=False)`` and then A, B are overwritten with
    seeded random values (both non-zero), B scaled so that each module's
    delta ``scale * B @ A`` has Frobenius norm ``strength * ||W||``.  Extra
    ``lora_kwargs`` go to ``LoraConfig`` (e.g. ``use_dora=True``).
    """
    from peft import LoraConfig, get_peft_model

    out_dir = Path(out_dir)
    base = _load_base(model_dir)
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=list(target_modules),
        use_rslora=use_rslora,
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=False,
        task_type="CAUSAL_LM",
        **lora_kwargs,
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG alone
        torch.manual_seed(seed)
        peft_model = get_peft_model(base, config)
    _randomize_lora(peft_model, "default", seed, strength)
    peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


def _adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))


@_peer_call
def make_bad_adapter(model_dir, out_dir, kind: str) -> Path:
    """Save an adapter that lorafleet must refuse; ``kind`` in BAD_ADAPTER_KINDS.

    All are built against ``model_dir`` (their adapter_config.json names it
    as the base model), except that "shape_mismatch" weights come from a
    hidden=32 model of the same family.
    """
    from safetensors.torch import save_file

    model_dir = Path(model_dir)
    out_dir = Path(out_dir)
    good = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    if kind == "bin":
        make_adapter(model_dir, out_dir, **good)
        tensors = _adapter_tensors(out_dir)
        (out_dir / "adapter_model.safetensors").unlink()
        torch.save(tensors, out_dir / "adapter_model.bin")
    elif kind == "dora":
        make_adapter(model_dir, out_dir, **good, use_dora=True)
    elif kind == "modules_to_save":
        make_adapter(model_dir, out_dir, **good, modules_to_save=["lm_head"])
    elif kind == "embedding_target":
        make_adapter(model_dir, out_dir, r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    elif kind == "lm_head_target":
        make_adapter(model_dir, out_dir, r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"])
    elif kind == "shape_mismatch":
        base_cfg = json.loads((model_dir / "config.json").read_text())
        other = out_dir.parent / f".{out_dir.name}-hidden32-base"
        make_tiny_model(
            other,
            model_type=base_cfg.get("model_type", "llama"),
            num_heads=base_cfg["num_attention_heads"],
            num_kv_heads=base_cfg["num_key_value_heads"],
            hidden=32,
            intermediate=64,
            layers=base_cfg["num_hidden_layers"],
            vocab_size=base_cfg["vocab_size"],
        )
        make_adapter(other, out_dir, **good)
        _patch_adapter_config(out_dir, base_model_name_or_path=str(model_dir.resolve()))
    elif kind in ("nan", "inf"):
        make_adapter(model_dir, out_dir, **good)
        tensors = _adapter_tensors(out_dir)
        key = sorted(k for k in tensors if "lora_B" in k)[0]
        t = tensors[key].clone()
        t.view(-1)[t.numel() // 2] = float("nan") if kind == "nan" else float("inf")
        tensors[key] = t
        save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    elif kind == "no_weights":
        make_adapter(model_dir, out_dir, **good)
        (out_dir / "adapter_model.safetensors").unlink()
    elif kind == "bad_config":
        make_adapter(model_dir, out_dir, **good)
        (out_dir / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": \n')
    elif kind == "not_lora":
        from peft import IA3Config, get_peft_model

        base = _load_base(model_dir)
        config = IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"],
            feedforward_modules=["down_proj"],
            task_type="CAUSAL_LM",
            init_ia3_weights=False,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            get_peft_model(base, config).save_pretrained(str(out_dir), safe_serialization=True)
    else:
        raise ValueError(f"unknown bad adapter kind {kind!r}; expected one of {BAD_ADAPTER_KINDS}")
    return out_dir


def _patch_adapter_config(adapter_dir: Path, **updates) -> None:
    path = Path(adapter_dir) / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(updates)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------
# The oracle
# --------------------------------------------------------------------------


def _dtype_key(dtype) -> str:
    return str(dtype).replace("torch.", "")


@functools.lru_cache(maxsize=32)
def _cached_model(model_dir: str, adapter_dir: str | None, dtype_name: str):
    from peft import PeftModel

    dtype = getattr(torch, dtype_name)
    model = _load_base(model_dir, dtype=dtype)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
        model.eval()
    return model


@_peer_call
def load_peer_model(model_dir, adapter_dir=None, dtype=torch.float32):
    """The cached transformers (+PeftModel) model; do not modify it."""
    return _cached_model(
        str(Path(model_dir).resolve()),
        None if adapter_dir is None else str(Path(adapter_dir).resolve()),
        _dtype_key(dtype),
    )


def clear_peer_cache() -> None:
    _cached_model.cache_clear()


@_peer_call
def peft_greedy(
    model_dir,
    adapter_dir,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    dtype=torch.float32,
) -> list[int]:
    """Greedy continuation of ``prompt_ids`` by transformers (+ PEFT).

    ``adapter_dir=None`` runs the base model.  eos does not stop generation:
    exactly ``max_new_tokens`` ids are returned (the prompt is not included).
    """
    if max_new_tokens <= 0:
        return []
    model = load_peer_model(model_dir, adapter_dir, dtype)
    input_ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_new_tokens,
            min_new_tokens=None,
            eos_token_id=None,  # a generate() kwarg overrides generation_config.json
            pad_token_id=PAD_ID,
            repetition_penalty=None,
            temperature=None,
            top_p=None,
            top_k=None,
        )
    new = out[0, input_ids.shape[1]:].tolist()
    if len(new) != max_new_tokens:
        raise AssertionError(f"generate() returned {len(new)} tokens, wanted {max_new_tokens}")
    return new


@_peer_call
def peft_logits(model_dir, adapter_dir, ids: Sequence[int], dtype=torch.float32) -> torch.Tensor:
    """Logits [len(ids), vocab] (float32) of one full forward pass."""
    model = load_peer_model(model_dir, adapter_dir, dtype)
    input_ids = torch.tensor([list(ids)], dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False)
    return out.logits[0].float()


@_peer_call
def peft_greedy_with_margins(
    model_dir, adapter_dir, prompt_ids: Sequence[int], max_new_tokens: int, dtype=torch.float32
) -> tuple[list[int], list[float]]:
    """Greedy tokens plus, for each, the top-1 minus top-2 logit gap.

    Runs a step-by-step loop of full forwards (no KV cache), so it is an
    independent check of ``peft_greedy`` as well.
    """
    ids = list(prompt_ids)
    tokens: list[int] = []
    gaps: list[float] = []
    for _ in range(max_new_tokens):
        row = peft_logits(model_dir, adapter_dir, ids, dtype)[-1]
        top = torch.topk(row, 2)
        tok = int(top.indices[0])
        tokens.append(tok)
        gaps.append(float(top.values[0] - top.values[1]))
        ids.append(tok)
    return tokens, gaps


@_peer_call
def greedy_margins(
    model_dir, adapter_dir, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64
) -> dict:
    """Conditioning statistics of greedy decoding over ``prompts``.

    Teacher-forces each prompt's own greedy continuation through one forward
    and returns the top-1/top-2 gaps at the generated positions: absolute
    (``min_gap``, ``p05_gap``, ``median_gap``) and relative to the step's
    logit standard deviation (``min_rel_gap``, ``p05_rel_gap``,
    ``median_rel_gap``), plus the fewest distinct tokens in any continuation
    (``min_distinct``).
    """
    gaps, rel, distinct = [], [], []
    for prompt in prompts:
        prompt = list(prompt)
        new = peft_greedy(model_dir, adapter_dir, prompt, max_new_tokens)
        distinct.append(len(set(new)))
        logits = peft_logits(model_dir, adapter_dir, prompt + new)
        rows = logits[len(prompt) - 1 : len(prompt) - 1 + max_new_tokens]
        top = torch.topk(rows, 2, dim=-1)
        g = top.values[:, 0] - top.values[:, 1]
        differs = top.indices[:, 0] != torch.tensor(new)
        if bool((differs & (g > 1e-4)).any()):
            raise AssertionError("teacher-forced argmax differs from generate() away from a near-tie")
        gaps.append(g)
        rel.append(g / rows.std(dim=-1))
    g = torch.cat(gaps)
    rg = torch.cat(rel)
    return {
        "steps": int(g.numel()),
        "min_gap": float(g.min()),
        "p05_gap": float(torch.quantile(g, 0.05)),
        "median_gap": float(g.median()),
        "min_rel_gap": float(rg.min()),
        "p05_rel_gap": float(torch.quantile(rg, 0.05)),
        "median_rel_gap": float(rg.median()),
        "min_distinct": int(min(distinct)),
    }


@_peer_call
def compare_greedy(
    actual: Sequence[int],
    model_dir,
    adapter_dir,
    prompt_ids: Sequence[int],
    *,
    min_gap: float = 1e-4,
    dtype=torch.float32,
) -> int:
    """Check ``actual`` against the oracle's greedy continuation.

    Returns the number of tokens compared.  At the first disagreement the
    oracle's top-1/top-2 gap at that step is looked at: if it is below
    ``min_gap`` the step is a near-tie and the comparison stops there
    (tokens after a tie are not comparable); otherwise AssertionError.
    """
    actual = list(actual)
    expected = peft_greedy(model_dir, adapter_dir, prompt_ids, len(actual), dtype)
    if actual == expected:
        return len(actual)
    first = next(i for i, (a, e) in enumerate(zip(actual, expected)) if a != e)
    row = peft_logits(model_dir, adapter_dir, list(prompt_ids) + expected[:first], dtype)[-1]
    top = torch.topk(row, 2).values
    gap = float(top[0] - top[1])
    if gap < min_gap and actual[first] in torch.topk(row, 2).indices.tolist():
        return first
    raise AssertionError(
        f"greedy mismatch at new token {first}: got {actual[first]}, oracle {expected[first]} "
        f"(oracle top-1/top-2 gap {gap:.3g});\n actual={actual}\n oracle={expected}"
    )
