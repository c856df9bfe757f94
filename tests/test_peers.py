"""Checks of the test oracle itself: tiny models, adapters, bad adapters, greedy."""

import json
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import peers

PROMPTS = ["Hello world", "The capital of France is", "héllo 東京", "a"]

# Conditioning thresholds asserted on every fixture model and adapter (the
# measured values are far above; see greedy_margins).
MIN_ABS_GAP = 2e-5  # smallest top-1 minus top-2 logit gap over all greedy steps
MIN_P05_REL_GAP = 5e-3  # 5th percentile of gap / std(logits)
MIN_MEDIAN_REL_GAP = 0.1  # median of gap / std(logits)
MIN_DISTINCT = 16  # distinct tokens in every 64-token continuation

LORA_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\."
    r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.lora_([AB])\.weight$"
)


def _prompt_ids():
    return [peers.encode(p) for p in PROMPTS]


def _config(path):
    return json.loads((path / "config.json").read_text())


def _linear_shapes(model_dir):
    """module suffix -> (out_features, in_features) of the base model."""
    cfg = _config(model_dir)
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    return {
        "q_proj": (q, h),
        "k_proj": (kv, h),
        "v_proj": (kv, h),
        "o_proj": (h, q),
        "gate_proj": (i, h),
        "up_proj": (i, h),
        "down_proj": (h, i),
    }


# --------------------------------------------------------------------------
# models and tokenizer
# --------------------------------------------------------------------------


def test_fixture_models_load_and_generate(tiny_models):
    from transformers import AutoModelForCausalLM

    assert set(tiny_models) == {"llama_mha", "llama_gqa", "qwen2", "llama3_rope", "mistral", "sharded"}
    prompt = peers.encode("Hello")
    outputs = {}
    for name, path in tiny_models.items():
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (name, info)
        assert model.dtype == torch.float32
        out = peers.peft_greedy(path, None, prompt, 12)
        assert len(out) == 12 and all(0 <= t < model.config.vocab_size for t in out)
        outputs[name] = out
    # different seeds: no two fixture models behave the same
    assert len({tuple(o) for o in outputs.values()}) == len(outputs)


def test_fixture_model_architectures(tiny_models):
    def keys(path):
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            return set(f.keys())

    mha = _config(tiny_models["llama_mha"])
    assert mha["model_type"] == "llama" and mha["num_attention_heads"] == mha["num_key_value_heads"] == 4
    assert mha["tie_word_embeddings"] is True
    assert "lm_head.weight" not in keys(tiny_models["llama_mha"])

    gqa = _config(tiny_models["llama_gqa"])
    assert (gqa["num_attention_heads"], gqa["num_key_value_heads"]) == (4, 2)
    assert gqa["tie_word_embeddings"] is False
    assert "lm_head.weight" in keys(tiny_models["llama_gqa"])
    assert "model.layers.0.self_attn.q_proj.bias" not in keys(tiny_models["llama_gqa"])

    qwen = _config(tiny_models["qwen2"])
    assert qwen["model_type"] == "qwen2" and qwen["num_key_value_heads"] == 2
    qkeys = keys(tiny_models["qwen2"])
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert f"model.layers.0.self_attn.{proj}.bias" in qkeys
    assert "model.layers.0.self_attn.o_proj.bias" not in qkeys

    mistral = _config(tiny_models["mistral"])
    assert mistral["model_type"] == "mistral" and mistral["num_key_value_heads"] == 2

    rope = _config(tiny_models["llama3_rope"])
    assert rope["rope_scaling"]["rope_type"] == "llama3"
    assert rope["rope_theta"] == 500000.0
    assert "rope_parameters" not in rope
    # the transformers-5 form elsewhere
    assert gqa["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}

    for path in tiny_models.values():
        cfg = _config(path)
        gen = json.loads((path / "generation_config.json").read_text())
        assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (peers.BOS_ID, peers.EOS_ID)
        assert (gen["bos_token_id"], gen["eos_token_id"]) == (peers.BOS_ID, peers.EOS_ID)
        # norm weights are not all ones
        st = {k: v for f in path.glob("*.safetensors") for k, v in load_file(str(f)).items()}
        norms = [v for k, v in st.items() if k.endswith("norm.weight")]
        assert len(norms) == 2 * cfg["num_hidden_layers"] + 1
        assert norms and all(not torch.allclose(n, torch.ones_like(n)) for n in norms)


def test_llama3_rope_scaling_matters(tiny_models, tmp_path):
    """Dropping rope_scaling from config.json changes logits at test lengths."""
    from transformers import AutoConfig

    src = tiny_models["llama3_rope"]
    cfg = AutoConfig.from_pretrained(src)
    assert cfg.rope_parameters["rope_type"] == "llama3"
    assert cfg.rope_parameters["rope_theta"] == 500000.0

    plain = tmp_path / "plain"
    shutil.copytree(src, plain)
    raw = _config(plain)
    raw["rope_scaling"] = None
    (plain / "config.json").write_text(json.dumps(raw))
    ids = peers.encode("rope scaling must matter within a short prompt, 64 tokens or so..")
    a = peers.peft_logits(src, None, ids)
    b = peers.peft_logits(plain, None, ids)
    assert torch.allclose(a[:1], b[:1], atol=1e-5)  # position 0: no rotation at all
    assert (a - b).abs().max() > 1e-2


def test_sharded_model(tiny_models):
    path = tiny_models["sharded"]
    shards = sorted(path.glob("*.safetensors"))
    assert len(shards) > 1
    assert not (path / "model.safetensors").exists()
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    keys = set()
    for s in shards:
        with safe_open(str(s), "pt") as f:
            keys |= set(f.keys())
    assert keys == set(index["weight_map"])
    assert "lm_head.weight" in keys and "model.embed_tokens.weight" in keys


@pytest.mark.parametrize("text", ["hello world", "héllo 東京", "tabs\tand\nnewlines  ", "emoji 🦙!", ""])
def test_tokenizer_roundtrip(tiny_models, text):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    path = tiny_models["llama_gqa"]
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    ids = raw.encode(text).ids
    assert ids == peers.encode(text)
    assert ids == [peers.BYTE_OFFSET + b for b in text.encode("utf-8")]
    assert raw.decode(ids) == text
    hf = AutoTokenizer.from_pretrained(path)
    assert hf.encode(text, add_special_tokens=False) == ids
    assert hf.decode(ids) == text


def test_tokenizer_specials_and_chat_template(tiny_models):
    from transformers import AutoTokenizer

    for path in tiny_models.values():
        hf = AutoTokenizer.from_pretrained(path)
        assert len(hf) == _config(path)["vocab_size"]
        assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (peers.BOS_ID, peers.EOS_ID, peers.PAD_ID)
    text = hf.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<s><|user|>hi<|end|><|assistant|>"
    ids = hf.encode(text, add_special_tokens=False)
    assert ids[0] == peers.BOS_ID and ids[1] == peers.SPECIAL_TOKENS.index("<|user|>")
    assert peers.decode(ids, skip_special_tokens=True) == "hi"
    assert peers.decode(ids, skip_special_tokens=False) == text
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == peers.CHAT_TEMPLATE


# --------------------------------------------------------------------------
# adapters
# --------------------------------------------------------------------------


def test_adapter_files(tiny_models, tiny_adapters):
    base = tiny_models["llama_gqa"]
    shapes = _linear_shapes(base)
    layers = _config(base)["num_hidden_layers"]
    assert len(tiny_adapters) >= 8
    seen_ranks, seen_alphas = set(), set()
    for name, path in tiny_adapters.items():
        assert (path / "adapter_model.safetensors").exists() and not (path / "adapter_model.bin").exists()
        cfg = json.loads((path / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["use_dora"] is False
        assert cfg["modules_to_save"] is None
        r, targets = cfg["r"], set(cfg["target_modules"])
        seen_ranks.add(r)
        seen_alphas.add(cfg["lora_alpha"])
        assert cfg["base_model_name_or_path"] == str(base.resolve())
        tensors = load_file(str(path / "adapter_model.safetensors"))
        assert len(tensors) == 2 * layers * len(targets), name
        for key, t in tensors.items():
            m = LORA_KEY.match(key)
            assert m, key
            proj, ab = m.group(3), m.group(4)
            assert proj in targets
            out_f, in_f = shapes[proj]
            assert tuple(t.shape) == ((r, in_f) if ab == "A" else (out_f, r)), key
            assert t.dtype == torch.float32
            assert torch.isfinite(t).all() and (t != 0).all(), key
    assert {1, 2, 3, 8, 16, 64} <= seen_ranks
    assert {1, 8, 16, 32} <= seen_alphas
    rs = json.loads((tiny_adapters["r8_rslora_all"] / "adapter_config.json").read_text())
    assert rs["use_rslora"] is True
    assert set(rs["target_modules"]) == set(peers.ALL_TARGETS)
    assert set(json.loads((tiny_adapters["r3_attn"] / "adapter_config.json").read_text())["target_modules"]) == set(
        peers.ATTN_TARGETS
    )
    assert set(json.loads((tiny_adapters["r8_mlp"] / "adapter_config.json").read_text())["target_modules"]) == set(
        peers.MLP_TARGETS
    )


def test_rslora_scaling_in_peft(tiny_models, tiny_adapters):
    base = tiny_models["llama_gqa"]
    model = peers.load_peer_model(base, tiny_adapters["r8_rslora_all"])
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == pytest.approx(8 / 8**0.5)
    model = peers.load_peer_model(base, tiny_adapters["r64_all"])
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == pytest.approx(16 / 64)


def test_adapters_change_greedy_output(tiny_models, tiny_adapters):
    base = tiny_models["llama_gqa"]
    prompts = _prompt_ids()[:1]
    outs = {None: [peers.peft_greedy(base, None, p, 16) for p in prompts]}
    for name, path in tiny_adapters.items():
        outs[name] = [peers.peft_greedy(base, path, p, 16) for p in prompts]
        assert outs[name] != outs[None], f"adapter {name} does not change the output"
    assert len({tuple(map(tuple, o)) for o in outs.values()}) == len(outs), "two adapters behave the same"


def test_adapter_factory_other_models(tiny_models, adapter_factory):
    prompt = peers.encode("Hello world")
    for name in ("qwen2", "mistral", "llama_mha", "llama3_rope"):
        path = adapter_factory(tiny_models[name], r=4, lora_alpha=8, target_modules=list(peers.ALL_TARGETS), seed=7)
        cfg = json.loads((path / "adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] == str(tiny_models[name].resolve())
        assert peers.peft_greedy(tiny_models[name], path, prompt, 8) != peers.peft_greedy(
            tiny_models[name], None, prompt, 8
        )


def test_make_adapter_is_deterministic(tiny_models, tmp_path):
    base = tiny_models["llama_gqa"]
    kw = dict(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"])
    a = load_file(str(peers.make_adapter(base, tmp_path / "a", seed=3, **kw) / "adapter_model.safetensors"))
    b = load_file(str(peers.make_adapter(base, tmp_path / "b", seed=3, **kw) / "adapter_model.safetensors"))
    c = load_file(str(peers.make_adapter(base, tmp_path / "c", seed=4, **kw) / "adapter_model.safetensors"))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in a)


# --------------------------------------------------------------------------
# bad adapters
# --------------------------------------------------------------------------


def test_bad_adapters_have_their_defect(tiny_models, bad_adapters):
    assert set(bad_adapters) == set(peers.BAD_ADAPTER_KINDS)

    def cfg(kind):
        return json.loads((bad_adapters[kind] / "adapter_config.json").read_text())

    def tensors(kind):
        return load_file(str(bad_adapters[kind] / "adapter_model.safetensors"))

    p = bad_adapters["bin"]
    assert (p / "adapter_model.bin").exists() and not list(p.glob("*.safetensors"))
    assert cfg("bin")["peft_type"] == "LORA"
    assert any(k.endswith("lora_A.weight") for k in torch.load(p / "adapter_model.bin", weights_only=True))

    assert cfg("dora")["use_dora"] is True
    assert any(k.endswith("lora_magnitude_vector") for k in tensors("dora"))

    assert cfg("modules_to_save")["modules_to_save"] == ["lm_head"]
    assert "base_model.model.lm_head.weight" in tensors("modules_to_save")

    assert "embed_tokens" in cfg("embedding_target")["target_modules"]
    assert any("embed_tokens.lora_embedding_A" in k for k in tensors("embedding_target"))

    assert "lm_head" in cfg("lm_head_target")["target_modules"]
    assert "base_model.model.lm_head.lora_A.weight" in tensors("lm_head_target")

    base_shapes = _linear_shapes(tiny_models["llama_gqa"])
    t = tensors("shape_mismatch")
    a = t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    assert a.shape[1] != base_shapes["q_proj"][1]
    assert cfg("shape_mismatch")["base_model_name_or_path"] == str(tiny_models["llama_gqa"].resolve())

    assert any(torch.isnan(v).any() for v in tensors("nan").values())
    assert all(torch.isfinite(v).all() or torch.isnan(v).any() for v in tensors("nan").values())
    assert any(torch.isposinf(v).any() for v in tensors("inf").values())
    assert not any(torch.isnan(v).any() for v in tensors("inf").values())

    p = bad_adapters["no_weights"]
    assert cfg("no_weights")["peft_type"] == "LORA"
    assert not list(p.glob("adapter_model.*"))

    with pytest.raises(json.JSONDecodeError):
        cfg("bad_config")
    assert (bad_adapters["bad_config"] / "adapter_model.safetensors").exists()

    assert cfg("not_lora")["peft_type"] == "IA3"
    assert not any("lora" in k for k in tensors("not_lora"))


# --------------------------------------------------------------------------
# the oracle
# --------------------------------------------------------------------------


def test_peft_greedy_matches_step_by_step_argmax(tiny_models, tiny_adapters):
    """generate() with its KV cache == argmax of full forwards, base and LoRA."""
    base = tiny_models["llama_gqa"]
    prompt = peers.encode("The capital of France is")
    for adapter in (None, tiny_adapters["r16_all"]):
        fast = peers.peft_greedy(base, adapter, prompt, 24)
        slow, gaps = peers.peft_greedy_with_margins(base, adapter, prompt, 24)
        assert fast == slow
        assert min(gaps) > 0


def test_peft_greedy_does_not_stop_at_eos(tiny_models):
    """Find a prompt whose greedy continuation contains </s>: all tokens still come."""
    base = tiny_models["llama_gqa"]
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        prompt = [peers.BOS_ID] + (torch.randint(0, 256, (6,), generator=gen) + peers.BYTE_OFFSET).tolist()
        out = peers.peft_greedy(base, None, prompt, 64)
        assert len(out) == 64
        if peers.EOS_ID in out[:-1]:
            break
    else:
        pytest.fail("no prompt produced </s>; cannot check that eos is ignored")


def test_compare_greedy(tiny_models):
    base = tiny_models["llama_gqa"]
    prompt = peers.encode("Hello world")
    expected = peers.peft_greedy(base, None, prompt, 10)
    assert peers.compare_greedy(expected, base, None, prompt) == 10
    wrong = list(expected)
    wrong[4] = (wrong[4] + 1) % 264
    with pytest.raises(AssertionError, match="mismatch at new token 4"):
        peers.compare_greedy(wrong, base, None, prompt)


def test_fixtures_are_well_conditioned(tiny_models, tiny_adapters):
    """Greedy decoding of every fixture model and adapter has clear margins.

    Margins of a random model's logits are those of Gaussian order
    statistics: over thousands of steps a few gaps near 1e-4 do occur (see
    compare_greedy for how tests tolerate near-ties), so the minimum is only
    required to stay above MIN_ABS_GAP while the bulk must be well separated.
    """
    prompts = _prompt_ids()
    cases = [(name, path, None, prompts[:3]) for name, path in tiny_models.items()]
    cases += [  # one prompt per adapter, rotating, to keep this test fast
        (f"llama_gqa+{name}", tiny_models["llama_gqa"], path, [prompts[i % len(prompts)]])
        for i, (name, path) in enumerate(tiny_adapters.items())
    ]
    report = {}
    for name, model, adapter, ps in cases:
        stats = peers.greedy_margins(model, adapter, ps, 64)
        report[name] = stats
        print(
            f"{name:24s} steps={stats['steps']} min_gap={stats['min_gap']:.2e} p05_gap={stats['p05_gap']:.3f} "
            f"median_gap={stats['median_gap']:.3f} min_rel={stats['min_rel_gap']:.2e} "
            f"p05_rel={stats['p05_rel_gap']:.3f} median_rel={stats['median_rel_gap']:.3f} "
            f"distinct>={stats['min_distinct']}"
        )
    for name, stats in report.items():
        assert stats["min_gap"] > MIN_ABS_GAP, (name, stats)
        assert stats["p05_rel_gap"] > MIN_P05_REL_GAP, (name, stats)
        assert stats["median_rel_gap"] > MIN_MEDIAN_REL_GAP, (name, stats)
        assert stats["min_distinct"] >= MIN_DISTINCT, (name, stats)


# --------------------------------------------------------------------------
# bfloat16: lorafleet against transformers + PEFT, both in bfloat16
# --------------------------------------------------------------------------

BF16_FIRST_TOKENS = 8  # K: the greedy tokens compared per request
# Measured on these 48 requests (tiny_models["llama_gqa"], base-only and eight adapters): 39/48 (0.81)
# agree on all of their first 8 tokens, with the native bf16 C kernels and with the generic ones alike.
# For scale, PEFT in bfloat16 agrees with PEFT in float32 on 35/48: the tiny random models have
# near-ties that bfloat16 rounding flips. The threshold sits just below the measured rate.
BF16_MIN_AGREEING = 0.75


def test_bfloat16_agrees_with_peft_in_bfloat16_on_the_first_tokens(tiny_models, tiny_adapters):
    """Both sides round to bfloat16 at different points (lorafleet's paged kernels accumulate in
    float32, transformers' eager ops round each op's output), so a near-tie can flip a token and the
    continuations part for good; on most requests the first K greedy tokens must be the same."""
    import random

    from engines import adapters_root, generate, make_engine

    model = tiny_models["llama_gqa"]
    names = [None, "r1_v", "r2_q", "r3_attn", "r8_mlp", "r4_o_down", "r16_all", "r64_all", "r8_rslora_all"]
    requests = []
    for seed in (16, 17):
        rng = random.Random(seed)
        requests += [(names[i % len(names)], [rng.randrange(3, 250) for _ in range(rng.randrange(1, 40))],
                      BF16_FIRST_TOKENS) for i in range(24)]
    engine = make_engine(model, adapters_root(tiny_adapters), dtype="bfloat16")
    assert engine.executor.worker.pool.pages.dtype == torch.bfloat16
    got = generate(engine, requests)
    want = [peers.peft_greedy(model, tiny_adapters[a] if a else None, p, n, dtype=torch.bfloat16) for a, p, n in requests]
    agreeing = sum(g == w for g, w in zip(got, want))
    first_diffs = [next((k for k, (x, y) in enumerate(zip(g, w)) if x != y), None) for g, w in zip(got, want)]
    print(f"bfloat16: {agreeing}/{len(requests)} requests agree on their first {BF16_FIRST_TOKENS} tokens; "
          f"first differing token per request: {first_diffs}")
    assert agreeing >= BF16_MIN_AGREEING * len(requests), (agreeing, first_diffs)
    # and the comparison can fail: float32 PEFT differs from bfloat16 lorafleet somewhere
    assert any(g != peers.peft_greedy(model, tiny_adapters[a] if a else None, p, n) for (a, p, n), g in zip(requests, got))
