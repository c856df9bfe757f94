import os

# Must happen before anything imports triton (the @triton.jit decorators look
# for a driver when they run) or transformers/huggingface_hub.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray reads these at import: an embedded Ray then listens on loopback only, without auth tokens.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

# `import peers` from any test file, whatever pytest's import mode.
# `import bench.ablations`: the benchmarks' variants, which tests hold to the same outputs.
for _dir in (str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)):
    if _dir not in sys.path:
        sys.path.insert(0, _dir)

import pytest  # noqa: E402

# tests/peers.py imports torch; it is imported inside the fixtures so that
# collecting torch-free tests (the scheduler's) does not import torch.
_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
_MLP = ["gate_proj", "up_proj", "down_proj"]
_LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

# name -> make_tiny_model keyword arguments.  Every model has its own seed, so
# no two fixture models share weights.
TINY_MODEL_SPECS = {
    # multi-head attention, tied input/output embeddings
    "llama_mha": dict(model_type="llama", num_heads=4, num_kv_heads=4, tie_embeddings=True, seed=1),
    # grouped-query attention, untied
    "llama_gqa": dict(model_type="llama", num_heads=4, num_kv_heads=2, seed=2),
    # Qwen2: q/k/v biases, GQA
    "qwen2": dict(model_type="qwen2", num_heads=4, num_kv_heads=2, seed=3),
    # Llama 3 rope scaling; config.json in the Hub's form (rope_theta + rope_scaling)
    "llama3_rope": dict(
        model_type="llama",
        num_heads=4,
        num_kv_heads=2,
        rope_scaling=_LLAMA3_ROPE_SCALING,
        rope_theta=500000.0,
        seed=4,
    ),
    "mistral": dict(model_type="mistral", num_heads=4, num_kv_heads=2, seed=5),
    # several model-0000k-of-0000n.safetensors + model.safetensors.index.json
    "sharded": dict(model_type="llama", num_heads=4, num_kv_heads=2, max_shard_size="100KB", seed=6),
}

# name -> make_adapter keyword arguments, all for tiny_models["llama_gqa"].
TINY_ADAPTER_SPECS = {
    "r1_v": dict(r=1, lora_alpha=1, target_modules=["v_proj"]),
    "r2_q": dict(r=2, lora_alpha=8, target_modules=["q_proj"]),
    "r8_k": dict(r=8, lora_alpha=16, target_modules=["k_proj"]),
    "r2_up": dict(r=2, lora_alpha=4, target_modules=["up_proj"]),
    "r3_attn": dict(r=3, lora_alpha=16, target_modules=_ATTN),
    "r8_mlp": dict(r=8, lora_alpha=32, target_modules=_MLP),
    "r4_o_down": dict(r=4, lora_alpha=8, target_modules=["o_proj", "down_proj"]),
    "r16_all": dict(r=16, lora_alpha=32, target_modules=_ATTN + _MLP),
    "r64_all": dict(r=64, lora_alpha=16, target_modules=_ATTN + _MLP),
    "r8_rslora_all": dict(r=8, lora_alpha=8, target_modules=_ATTN + _MLP, use_rslora=True),
}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """name -> folder of a tiny random HF model (see TINY_MODEL_SPECS)."""
    import peers

    root = tmp_path_factory.mktemp("tiny_models")
    return {name: peers.make_tiny_model(root / name, **kw) for name, kw in TINY_MODEL_SPECS.items()}


@pytest.fixture(scope="session")
def tiny_adapters(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """name -> PEFT LoRA adapter folder for tiny_models["llama_gqa"] (see TINY_ADAPTER_SPECS)."""
    import peers

    root = tmp_path_factory.mktemp("tiny_adapters")
    base = tiny_models["llama_gqa"]
    return {
        name: peers.make_adapter(base, root / name, seed=100 + i, **kw)
        for i, (name, kw) in enumerate(TINY_ADAPTER_SPECS.items())
    }


@pytest.fixture(scope="session")
def bad_adapters(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """kind -> adapter folder lorafleet must refuse, for tiny_models["llama_gqa"]."""
    import peers

    root = tmp_path_factory.mktemp("bad_adapters")
    base = tiny_models["llama_gqa"]
    return {kind: peers.make_bad_adapter(base, root / kind, kind) for kind in peers.BAD_ADAPTER_KINDS}


@pytest.fixture(scope="session")
def adapter_factory(tmp_path_factory):
    """make(model_dir, out_dir=None, *, r, lora_alpha, target_modules, use_rslora=False, seed=0, ...) -> Path.

    Without out_dir the adapter goes to a fresh temporary folder.
    """

    def make(model_dir, out_dir=None, **kw) -> Path:
        import peers

        if out_dir is None:
            out_dir = tmp_path_factory.mktemp("adapter")
        return peers.make_adapter(model_dir, out_dir, **kw)

    return make


@pytest.fixture(scope="session")
def same_size_adapters(tiny_models, adapter_factory, tmp_path_factory):
    """Four adapters of one size (rank 2 on q and v) for tiny_models["llama_gqa"], so host memory
    can be sized in adapters."""
    root = tmp_path_factory.mktemp("same_size")
    for i in range(4):
        adapter_factory(tiny_models["llama_gqa"], root / f"s{i}", r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], seed=60 + i)
    return root


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    """make(out_dir=None, **make_tiny_model_kwargs) -> Path, for one-off tiny models."""

    def make(out_dir=None, **kw) -> Path:
        import peers

        if out_dir is None:
            out_dir = tmp_path_factory.mktemp("model")
        return peers.make_tiny_model(out_dir, **kw)

    return make
