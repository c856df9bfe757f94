"""Training data: which tokens carry loss (checked on the labels), and bad lines with their numbers."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from ft_task import write_jsonl
from peers import EOS_ID, decode, encode

from lorafleet.finetune.data import IGNORE, DataError, encode_messages, encode_prompt_completion, read_jsonl
from lorafleet.finetune.model import load_tokenizer

REPO = Path(__file__).resolve().parents[2]
DEMO_MODEL = Path(os.environ.get("LORAFLEET_DEMO_MODEL", REPO / "cache" / "smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def tok(ft_model):
    return load_tokenizer(ft_model)


def _labelled(example) -> list[int]:
    return [lab for lab in example.labels if lab != IGNORE]


def test_prompt_carries_no_loss(tok):
    ex = encode_prompt_completion(tok, "Q: 2+2?", " A: 4")
    prompt = encode("Q: 2+2?")
    assert list(ex.ids) == prompt + encode(" A: 4") + [EOS_ID]
    assert list(ex.labels[:len(prompt)]) == [IGNORE] * len(prompt)
    assert list(ex.labels[len(prompt):]) == encode(" A: 4") + [EOS_ID]
    assert ex.target_start == len(prompt)


def test_only_assistant_turns_carry_loss(tok):
    messages = [{"role": "system", "content": "be terse"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"}, {"role": "user", "content": "bye"},
                {"role": "assistant", "content": "ciao"}]
    ex = encode_messages(tok, messages)
    text = "<s><|system|>be terse<|end|><|user|>hi<|end|><|assistant|>yo<|end|><|user|>bye<|end|><|assistant|>ciao<|end|>"
    assert decode(ex.ids, skip_special_tokens=False) == text
    # Labels: each assistant turn's content and its end token; never the system/user turns nor the header.
    spans = [(i, lab) for i, lab in enumerate(ex.labels) if lab != IGNORE]
    assert decode([lab for _, lab in spans], skip_special_tokens=False) == "yo<|end|>ciao<|end|>"
    assert all(ex.ids[i] == lab for i, lab in spans)
    first_header = text.index("<|assistant|>yo")
    assert decode(ex.ids[:spans[0][0]], skip_special_tokens=False) == text[:first_header] + "<|assistant|>"
    assert decode(ex.ids[ex.target_start:], skip_special_tokens=False) == "ciao<|end|>"


def test_chat_masking_with_the_real_template_matches_what_the_server_sends():
    """SmolLM2's template: the prompt is exactly the server's chat rendering; the loss covers the
    answer and <|im_end|> (the server's eos), not the newline the template writes after it."""
    from lorafleet.coordinator.tokenizer import Tokenizer

    assert (DEMO_MODEL / "tokenizer.json").is_file(), f"no demo model at {DEMO_MODEL}: run `make demo`"
    hf = load_tokenizer(DEMO_MODEL)
    served = Tokenizer(DEMO_MODEL)
    question, answer = "What is the capital of Japan?", "Tokyo."
    ex = encode_messages(hf, [{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
    prompt = served.apply_chat_template([{"role": "user", "content": question}])
    assert list(ex.ids[:len(prompt)]) == prompt and ex.target_start == len(prompt)
    im_end = served.token_id("<|im_end|>")
    assert _labelled(ex) == served.encode(answer, add_special_tokens=False) + [im_end]
    assert ex.ids[len(prompt) + len(_labelled(ex)):] == tuple(served.encode("\n", add_special_tokens=False))
    # and a prompt/completion line is tokenised as the server tokenises a text prompt
    pc = encode_prompt_completion(hf, "The capital of Japan is", " Tokyo")
    assert list(pc.ids[:pc.target_start]) == served.encode("The capital of Japan is")


BAD = [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"prompt": "x"}', '"completion" is missing'),
    ('{"prompt": 3, "completion": "y"}', '"prompt" must be a string, got int'),
    ('{"prompt": "x", "completion": ""}', '"completion" is empty'),
    ('{"text": "x"}', 'expected "prompt" and "completion", or "messages" (keys found: text)'),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    ('{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}', "ends with the assistant"),
    ('{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "a"}]}', "role 'robot'"),
    ('{"messages": "hello"}', "must be a non-empty list"),
    ('{"messages": [], "prompt": "x", "completion": "y"}', "not both"),
    ('{"prompt": "' + "x" * 40 + '", "completion": "y"}', "leaves no token to learn"),
]


def test_bad_lines_are_reported_with_their_numbers(tok, tmp_path):
    good = '{"prompt": "a", "completion": "b"}'
    path = write_jsonl(tmp_path / "d.jsonl", [good, ""] + [line for line, _ in BAD] + [good])
    with pytest.raises(DataError) as err:
        read_jsonl(path, tok, max_length=32)
    assert str(err.value).startswith(f"{path}:3: not valid JSON") and "--on-bad-line skip" in str(err.value)

    warnings = []
    data = read_jsonl(path, tok, max_length=32, on_bad_line="skip", warn=warnings.append)
    assert [e.line for e in data.examples] == [1, 3 + len(BAD)]  # the blank line 2 is no error
    assert [b.line for b in data.bad] == list(range(3, 3 + len(BAD)))
    for bad, (_, reason) in zip(data.bad, BAD):
        assert reason in bad.reason, (bad.line, bad.reason)
    assert len(warnings) == len(BAD) and warnings[0].startswith(f"{path}:3: skipped: not valid JSON")


def test_a_file_without_a_usable_line_is_refused(tok, tmp_path):
    with pytest.raises(DataError, match="no usable example .2 bad lines skipped"):
        read_jsonl(write_jsonl(tmp_path / "bad.jsonl", ["{", "[]"]), tok, 32, on_bad_line="skip")
    with pytest.raises(DataError, match="the file is empty"):
        read_jsonl(write_jsonl(tmp_path / "empty.jsonl", []), tok, 32)
    with pytest.raises(DataError, match="no such file"):
        read_jsonl(tmp_path / "missing.jsonl", tok, 32)
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9", "completion": "x"}\n')
    with pytest.raises(DataError, match="latin1.jsonl:1: not valid UTF-8"):
        read_jsonl(tmp_path / "latin1.jsonl", tok, 32)


def test_long_examples_are_cut_to_max_length(tok):
    from lorafleet.finetune.data import encode_line

    ex = encode_line(tok, '{"prompt": "abc", "completion": "defghij"}', 1, max_length=6)
    assert len(ex.ids) == 6 and list(ex.labels) == [IGNORE] * 3 + encode("def")
