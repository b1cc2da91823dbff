"""LLM: a loaded target model with its tokenizer, KV pool and engine.

The one object the CLI, the session manager and the benchmarks build on. Stateless use
(`generate`) allocates a sequence, prefills, generates and frees it; sessions keep sequences.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from lsrt.runtime.errors import InvalidRequest
from lsrt.runtime.model import DecoderModel, load_model, read_generation_eos
from lsrt.runtime.runner import ModelRunner, RunnerConfig
from lsrt.runtime.sampling import SamplingParams
from lsrt.runtime.spec.drafters import DraftOptions, make_drafter
from lsrt.runtime.spec.engine import Engine, Generation
from lsrt.runtime.tokenizer import Tokenizer


@dataclass
class Completion:
    generation: Generation
    prompt_tokens: int
    prefill_s: float
    drafter: str

    @property
    def timings(self) -> dict[str, float]:
        g = self.generation
        decode_tps = len(g.token_ids) / g.decode_s if g.decode_s else 0.0
        return {"prefill_s": round(self.prefill_s, 4), "decode_s": round(g.decode_s, 4),
                "prefill_tokens_per_s": round(self.prompt_tokens / self.prefill_s, 2)
                if self.prefill_s else 0.0,
                "decode_tokens_per_s": round(decode_tps, 2)}


class LLM:
    def __init__(self, model_dir: str | Path, config: RunnerConfig | None = None,
                 name: str = "") -> None:
        self.model_dir = Path(model_dir)
        self.name = name or self.model_dir.name
        self.config = config or RunnerConfig()
        model = load_model(self.model_dir, dtype=self.config.torch_dtype,
                           device=self.config.device)
        self.tokenizer = Tokenizer(self.model_dir)
        eos = set(model.cfg.eos_token_ids) | set(read_generation_eos(self.model_dir))
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_ids = tuple(sorted(eos))
        self.runner = ModelRunner(model, self.config)
        if self.config.cuda_graphs and self.config.device.startswith("cuda"):
            from lsrt.runtime.cuda_graphs import GraphConfig, GraphRunner

            self.runner = GraphRunner(self.runner, GraphConfig(sizes=self.config.graph_sizes))
        self.engine = Engine(self.runner, self.tokenizer, self.eos_ids,
                             cost_aware=self.config.cost_aware_trees)
        self._draft_models: dict[str, DecoderModel] = {}
        # LongSpec drafts by path, with their buffers and CUDA graphs, shared by every session's
        # drafter (runtime/spec/longspec_workspace.py)
        self.longspec_workspaces: dict = {}

    @classmethod
    def load(cls, model: str, config: RunnerConfig | None = None, *,
             progress: bool = True) -> "LLM":
        """`model` is a registry name (e.g. smollm2-135m), an HF directory or a .gguf file."""
        from lsrt.runtime.models import resolve_model

        return cls(resolve_model(model, progress=progress), config, name=model)

    def draft_model(self, name: str) -> DecoderModel:
        """A draft model's weights (same device and dtype), loaded once per LLM."""
        if name not in self._draft_models:
            from lsrt.runtime.models import resolve_model

            self._draft_models[name] = load_model(
                resolve_model(name, progress=False), dtype=self.config.torch_dtype,
                device=self.config.device)
        return self._draft_models[name]

    @property
    def context_limit(self) -> int:
        return self.runner.cfg.context_limit

    def encode_prompt(self, prompt: str, *, chat: bool = False, system: str | None = None
                      ) -> list[int]:
        if not chat:
            if system:
                raise InvalidRequest("--system needs --chat")
            ids = self.tokenizer.encode(prompt)
        else:
            messages = ([{"role": "system", "content": system}] if system else [])
            messages.append({"role": "user", "content": prompt})
            ids = self.tokenizer.apply_chat(messages, add_generation_prompt=True)
        if not ids:
            raise InvalidRequest("the prompt is empty")
        return ids

    def generate(self, prompt_ids: list[int], params: SamplingParams, *, draft: str = "none",
                 on_text: Callable[[str, list[int]], None] | None = None,
                 draft_options: DraftOptions | None = None) -> Completion:
        """Stateless generation: prefill `prompt_ids`, decode, free the KV."""
        self.runner.check_context(len(prompt_ids) + 1)
        seq = self.runner.new_sequence()
        try:
            t0 = time.perf_counter()
            self.runner.prefill(seq, prompt_ids[:-1])
            prefill_s = time.perf_counter() - t0
            drafter = make_drafter(draft, self, draft_options)
            history = list(prompt_ids)
            if drafter is not None:
                drafter.observe(history)
            gen = self.engine.generate(seq, history, params, drafter=drafter, on_text=on_text)
            return Completion(generation=gen, prompt_tokens=len(prompt_ids), prefill_s=prefill_s,
                              drafter=draft)
        finally:
            seq.release()

    @torch.inference_mode()
    def logits(self, ids: list[int]) -> torch.Tensor:
        """`[len(ids), vocab]` logits of a full forward (tests and teacher forcing)."""
        seq = self.runner.new_sequence()
        try:
            self.runner.prefill(seq, ids[:-1])
            from lsrt.runtime.spec.tree import DraftTree

            return self.runner.verify(seq, DraftTree.chain(ids[-1], []))
        finally:
            seq.release()
