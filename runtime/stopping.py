"""Stop conditions and text streaming, checked one token at a time.

Speculative steps emit several tokens at once; feeding them through `Stopper.push` one by one
makes output end exactly where plain decoding would (a stop token or string inside an accepted
run cuts there). Text that could still become a stop string is held back from the stream.
"""

from __future__ import annotations

from lsrt.runtime.sampling import SamplingParams
from lsrt.runtime.tokenizer import StreamDecoder, Tokenizer


class Stopper:
    def __init__(self, params: SamplingParams, tokenizer: Tokenizer, eos_ids: tuple[int, ...],
                 context: list[int] | None = None) -> None:
        self.params = params
        self.stop_ids = set(params.stop_token_ids) | set(eos_ids)
        self.decoder = StreamDecoder(tokenizer, context)
        self.hold = max((len(s) for s in params.stop), default=1) - 1
        self.token_ids: list[int] = []
        self.emitted_chars = 0
        self.text = ""
        self.finish_reason: str | None = None

    def push(self, token: int) -> str:
        """Accept one generated token; return stream-ready text. Sets `finish_reason`."""
        assert self.finish_reason is None, "push after finish"
        self.token_ids.append(token)
        if token in self.stop_ids:
            self.finish_reason = "stop"
            return self._release(final=True)
        self.decoder.push(token)
        text = self.decoder.text
        if self.params.stop:
            window_start = max(0, len(self.text) - self.hold)
            hits = [i for s in self.params.stop if (i := text.find(s, window_start)) >= 0]
            if hits:
                self.text = text[:min(hits)]
                self.finish_reason = "stop"
                return self._release(final=True, stopped_text=True)
        self.text = text
        if len(self.token_ids) >= self.params.max_tokens:
            self.finish_reason = "length"
            return self._release(final=True)
        return self._release(final=False)

    def _release(self, *, final: bool, stopped_text: bool = False) -> str:
        if final and not stopped_text and self.finish_reason == "length":
            self.decoder.flush()
            self.text = self.decoder.text
        upto = len(self.text) if final else max(self.emitted_chars, len(self.text) - self.hold)
        delta = self.text[self.emitted_chars:upto]
        self.emitted_chars = upto
        return delta
