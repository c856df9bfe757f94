"""Text <-> token ids with the model's own tokenizer.json (the `tokenizers` library), and its chat template."""
from __future__ import annotations

import json
from pathlib import Path

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        self._tok = _HFTokenizer.from_file(str(model_dir / "tokenizer.json"))
        cfg_path = model_dir / "tokenizer_config.json"
        self.config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self._template = None
        if self.config.get("chat_template"):
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            self._template = env.from_string(self.config["chat_template"])

    @staticmethod
    def exists(model_dir: str | Path) -> bool:
        return (Path(model_dir) / "tokenizer.json").is_file()

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        """The prompt ids for a conversation, ending where the assistant's answer begins."""
        if self._template is None:
            raise ValueError("this model's tokenizer has no chat template; send a plain prompt")
        text = self._template.render(
            messages=messages, add_generation_prompt=True,
            bos_token=self.config.get("bos_token") or "", eos_token=self.config.get("eos_token") or "",
        )
        return self.encode(text, add_special_tokens=False)


def _raise(message: str):
    raise ValueError(message)


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas that never split a UTF-8 character.

    Each new piece is decoded together with the tokens just before it (the window from
    `prefix` to the end), so tokenizers that render a token differently at the start of a
    string (sentencepiece's leading space) still produce the right delta; the work per
    token stays small however long the output grows.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the context window
        self.read = 0  # tokens already turned into text

    def push(self, token_ids: list[int]) -> str:
        self.ids += token_ids
        before = self.tok.decode(self.ids[self.prefix:self.read])
        now = self.tok.decode(self.ids[self.prefix:])
        if now.endswith("\ufffd"):
            return ""  # a multi-byte character is not complete yet
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before):]

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character), at the end of the stream."""
        before = self.tok.decode(self.ids[self.prefix:self.read])
        now = self.tok.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return now[len(before):]
