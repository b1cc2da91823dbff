"""Tokenizer, chat template and incremental detokenisation.

transformers' tokenizer and the model's own chat template are used as-is; lsrt only adds the
streaming decoder, which emits text deltas that never end inside a multi-byte character (a
partial UTF-8 sequence decodes to U+FFFD, which is held back until the next token completes it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lsrt.runtime.errors import InvalidRequest


class Tokenizer:
    def __init__(self, model_dir: str | Path) -> None:
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(str(model_dir))
        self.eos_token_id: int | None = self.hf.eos_token_id

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=False)

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool,
               tools: list[dict[str, Any]] | None = None) -> str:
        """The chat template's text for `messages`."""
        if not self.has_chat_template:
            raise InvalidRequest("this model has no chat template; send a plain prompt")
        return self.hf.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                           add_generation_prompt=add_generation_prompt)

    def apply_chat(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                   tools: list[dict[str, Any]] | None = None) -> list[int]:
        return self.encode(self.render(messages, add_generation_prompt=add_generation_prompt,
                                       tools=tools))


class StreamDecoder:
    """Turns generated ids into text deltas, holding back incomplete characters."""

    def __init__(self, tokenizer: Tokenizer, context: list[int] | None = None) -> None:
        self.tok = tokenizer
        # A little context makes SentencePiece-style leading spaces decode right.
        self.ids: list[int] = list(context[-4:]) if context else []
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def push(self, token_id: int) -> str:
        """Add one id; return the newly completed text (possibly empty)."""
        self.ids.append(token_id)
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tok.decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is held back at the end of generation (may contain U+FFFD)."""
        full = self.tok.decode(self.ids[self.prefix_offset:])
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset])
        delta = full[len(prefix):]
        self.read_offset = len(self.ids)
        self.prefix_offset = len(self.ids)
        self.text += delta
        return delta
