"""Text streaming: deltas never split a UTF-8 character and add up to the whole decoded text."""
from __future__ import annotations

import random

from lorafleet.coordinator.tokenizer import IncrementalDecoder, Tokenizer


def test_deltas_add_up_and_never_split_characters(tiny_models):
    tok = Tokenizer(tiny_models["llama_gqa"])
    text = "héllo 東京 — ok 🎉!"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text)  # byte-level: multi-byte characters span several tokens
    rng = random.Random(0)
    for _ in range(20):
        dec, deltas, i = IncrementalDecoder(tok), [], 0
        while i < len(ids):
            n = rng.randint(1, 3)
            deltas.append(dec.push(ids[i:i + n]))
            i += n
        deltas.append(dec.flush())
        assert "".join(deltas) == text
        assert not any("\ufffd" in d for d in deltas)


def test_random_tokens_still_add_up(tiny_models):
    tok = Tokenizer(tiny_models["llama_gqa"])
    rng = random.Random(1)
    ids = [rng.randrange(0, 264) for _ in range(300)]
    dec = IncrementalDecoder(tok)
    text = "".join(dec.push([t]) for t in ids) + dec.flush()
    assert text == tok.decode(ids)


def test_chat_template(tiny_models):
    tok = Tokenizer(tiny_models["llama_gqa"])
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert tok.decode(ids).endswith("hi") or "hi" in tok.decode(ids)
    assert ids[0] == 1  # the template starts with <s>
