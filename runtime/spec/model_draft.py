"""`model:NAME` drafter: a smaller model (same tokenizer) with a constant-size KV cache.

The draft's cache keeps the first `sink` positions and the last `window` positions of the
history. Keys are stored *after* RoPE at their *absolute* positions ("post-rope-absolute"): a
restored cache needs no re-rotation, and relative distances stay true across the gap between
sink and window. Slots:

    [0, sink)                       sink positions
    [sink, sink + R)                ring, R = window + CHUNK: position p >= sink lives at
                                    sink + (p - sink) % R; the CHUNK spare slots let a catch-up
                                    chunk be written without overwriting keys it still reads
    [sink + R, sink + R + depth)    scratch for the tokens being drafted

Catching up after a gap longer than the window re-encodes only sink + window tokens, so the cost
of drafting never grows with the context. The cache is the persistable draft state.
"""

from __future__ import annotations

import torch

from lsrt.runtime.attention import AttentionMeta, make_backend
from lsrt.runtime.kv_cache import KVPoolConfig, PagedKVPool
from lsrt.runtime.model import DecoderModel
from lsrt.runtime.spec.drafter import DraftState
from lsrt.runtime.spec.tree import DraftTree

CHUNK = 64
POSITIONS = "post-rope-absolute"


class ModelDrafter:
    def __init__(self, model: DecoderModel, *, name: str, sink: int = 4, window: int = 1020,
                 depth: int = 5, attention: str = "sdpa") -> None:
        if sink < 0 or window < CHUNK or depth < 1:
            raise ValueError(f"model drafter needs sink >= 0, window >= {CHUNK}, depth >= 1")
        self.model, self.name = model, f"model:{name}"
        self.sink, self.window, self.depth = sink, window, depth
        self.ring = window + CHUNK
        cfg = model.cfg
        slots = sink + self.ring + depth + 1
        self.pool = PagedKVPool(KVPoolConfig(
            num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
            num_blocks=-(-slots // 16), block_size=16, dtype=model.dtype,
            device=str(model.device)))
        self.backend = make_backend(attention)
        self.scale = cfg.head_dim ** -0.5
        self.history: list[int] = []  # tokens observed so far
        self.done = 0  # positions [0, done) are encoded (sink + last window of them cached)
        self.floor = 0  # no position in [sink, floor) is cached (after a re-encode)

    # -- positions -> slots -------------------------------------------------------------
    def slot(self, pos: int) -> int:
        return pos if pos < self.sink else self.sink + (pos - self.sink) % self.ring

    def visible(self, end: int) -> list[int]:
        """Positions a token at `end` sees in the cache."""
        head = list(range(min(self.sink, end)))
        return head + list(range(max(len(head), end - self.window, self.floor), end))

    # -- the drafter protocol -----------------------------------------------------------
    def observe(self, tokens: list[int]) -> None:
        self.history.extend(tokens)

    def rollback(self, num_tokens: int) -> None:
        del self.history[num_tokens:]
        if self.done > num_tokens:
            # Keys of [num_tokens - window, num_tokens) survive in the ring only if at most
            # CHUNK positions were written after them; otherwise re-encode from scratch.
            self.done = num_tokens if self.done - num_tokens <= CHUNK else 0
            self.floor = min(self.floor, self.done)

    @torch.inference_mode()
    def _encode(self, positions: list[int]) -> torch.Tensor:
        """Run the draft over history[positions] (consecutive, <= CHUNK); last hidden `[H]`."""
        dev = self.model.device
        vis = self.visible(positions[0])
        n = len(positions)
        meta = AttentionMeta(
            write_slots=torch.tensor([self.slot(p) for p in positions], device=dev),
            prefix_len=len(vis), prefix_slots=torch.tensor([self.slot(p) for p in vis],
                                                           dtype=torch.long, device=dev),
            kv_span=None, new_mask=None if n == 1 else torch.ones(
                (n, n), dtype=torch.bool, device=dev).tril_(), scale=self.scale)
        ids = torch.tensor([self.history[p] for p in positions], device=dev)
        hidden = self.model(ids, torch.tensor(positions, device=dev), self.pool.k, self.pool.v,
                            meta, self.backend)
        return hidden[-1]

    def catch_up(self, end: int) -> None:
        """Encode positions up to `end` (exclusive), skipping what the window no longer needs."""
        if end - self.done > self.window:
            self.done = self.floor = 0
            for i in range(0, self.sink, CHUNK):
                self._encode(list(range(i, min(self.sink, i + CHUNK))))
            self.done = self.floor = max(self.sink, end - self.window)
        while self.done < end:
            stop = min(end, self.done + CHUNK)
            self._encode(list(range(self.done, stop)))
            self.done = stop

    @torch.inference_mode()
    def propose(self, history: list[int], max_nodes: int) -> DraftTree | None:
        if len(self.history) != len(history):  # the engine did not tell us: follow the history
            self.history = list(history)
            self.done = min(self.done, len(history) - 1)
        root_pos = len(history) - 1
        self.catch_up(root_pos)
        depth = min(self.depth, max_nodes - 1, self.model.cfg.context_limit - root_pos - 1)
        if depth < 1:
            return None
        dev = self.model.device
        vis = torch.tensor([self.slot(p) for p in self.visible(root_pos)], dtype=torch.long,
                           device=dev)
        base = self.sink + self.ring
        token, drafts = history[-1], []
        for i in range(depth):
            prefix = torch.cat([vis, torch.arange(base, base + i, device=dev)])
            meta = AttentionMeta(write_slots=torch.tensor([base + i], device=dev),
                                 prefix_len=int(prefix.shape[0]), prefix_slots=prefix,
                                 kv_span=None, new_mask=None, scale=self.scale)
            hidden = self.model(torch.tensor([token], device=dev),
                                torch.tensor([root_pos + i], device=dev),
                                self.pool.k, self.pool.v, meta, self.backend)
            token = int(self.model.logits(hidden).argmax(-1))
            drafts.append(token)
        return DraftTree.chain(history[-1], drafts, source=self.name)

    # -- persistence --------------------------------------------------------------------
    def export_state(self) -> DraftState | None:
        from lsrt.sessions.blob import tensor_to_entry

        if self.done == 0:
            return None
        positions = self.visible(self.done)
        idx = torch.tensor([self.slot(p) for p in positions], device=self.model.device)
        return DraftState(
            kind=self.name, num_tokens=self.done,
            header={"positions": POSITIONS, "sink": self.sink, "window": self.window,
                    "dtype": str(self.model.dtype).removeprefix("torch."),
                    "cached_positions": positions},
            tensors={"k": tensor_to_entry(self.pool.k[:, :, idx].cpu()),
                     "v": tensor_to_entry(self.pool.v[:, :, idx].cpu())})

    def import_state(self, state: DraftState) -> None:
        """Load an exported cache; `ValueError` when it was made under another convention."""
        from lsrt.sessions.blob import entry_to_tensor

        h = state.header
        if (state.kind != self.name or h.get("positions") != POSITIONS
                or h.get("sink") != self.sink or h.get("window") != self.window):
            raise ValueError(f"draft state of {state.kind} {h} does not fit {self.name}")
        positions = list(h["cached_positions"])
        self.floor = positions[self.sink] if len(positions) > self.sink else 0
        if positions != self.visible(state.num_tokens):
            raise ValueError("draft state positions do not match its length")
        k, v = entry_to_tensor(state.tensors["k"]), entry_to_tensor(state.tensors["v"])
        want = (self.model.cfg.num_layers, self.model.cfg.num_kv_heads, len(positions),
                self.model.cfg.head_dim)
        if tuple(k.shape) != want or tuple(v.shape) != want:
            raise ValueError(f"draft state shape {tuple(k.shape)} != {want}")
        idx = torch.tensor([self.slot(p) for p in positions], device=self.model.device)
        self.pool.k[:, :, idx] = k.to(self.pool.k)
        self.pool.v[:, :, idx] = v.to(self.pool.v)
        self.done = state.num_tokens
