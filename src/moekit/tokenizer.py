"""Tokenizers from a model directory: tokenizer.json (the `tokenizers` library) plus the
special tokens and chat template of tokenizer_config.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .checkpoint import read_json
from .errors import CheckpointError, MoekitError


class Tokenizer:
    """Text <-> token ids for one model, with its chat template when it has one."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        self.path = Path(path)
        file = self.path / "tokenizer.json"
        if not file.exists():
            raise CheckpointError(
                f"{file}: not found; moekit needs a fast tokenizer file. Write one with "
                "transformers: AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)")
        try:
            self._tok = HFTokenizer.from_file(str(file))
        except Exception as e:
            raise CheckpointError(f"{file}: cannot be read as a tokenizer ({e})") from None
        cfg_path = self.path / "tokenizer_config.json"
        self.config: dict[str, Any] = read_json(cfg_path) if cfg_path.exists() else {}
        self.chat_template: str | None = self.config.get("chat_template")
        jinja = self.path / "chat_template.jinja"
        if self.chat_template is None and jinja.exists():
            self.chat_template = jinja.read_text(encoding="utf-8")
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    @property
    def eos_token_id(self) -> int | None:
        """Returns the id of the eos token named in tokenizer_config.json, if any."""
        return self._tok.token_to_id(self.eos_token) if self.eos_token else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Returns the token ids of `text` (with BOS etc. when the tokenizer adds them)."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Returns the text of token ids."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Returns the prompt text for chat `messages` rendered with the model's template."""
        if not self.chat_template:
            raise MoekitError(f"{self.path}: this tokenizer has no chat template; drop --chat")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise MoekitError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        template = env.from_string(self.chat_template)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=self.bos_token or "", eos_token=self.eos_token or "")


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json writes special tokens as a string or as {"content": ...}
    if isinstance(value, dict):
        return value.get("content")
    return value


def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
    """Returns the tokenizer of the model directory `path` (default: the bundled model)."""
    from .load import default_model_path

    return Tokenizer(path if path is not None else default_model_path())


class StreamDecoder:
    """Turns a growing list of token ids into text increments, holding back partial characters."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids, self.printed = tokenizer, [], ""

    def push(self, token_id: int) -> str:
        """Returns the new text that token_id completes (may be empty)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        new = text[len(self.printed):] if text.startswith(self.printed) else text
        self.printed = text
        return new
