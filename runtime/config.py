"""Model architecture config, read from a transformers config.

Only the fields the own decoder needs. Families: Llama (incl. Llama-3 rope scaling), Qwen2/2.5
(qkv bias), Qwen3 (per-head q/k RMSNorm), Mistral. transformers is used for parsing only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

SUPPORTED = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MistralForCausalLM": "mistral",
}


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    arch: str  # llama | qwen2 | qwen3 | mistral
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] = field(default_factory=dict)  # rope_type and its parameters
    max_position: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.arch not in SUPPORTED.values():
            raise ValueError(f"unsupported architecture {self.arch!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        rope_type = self.rope_scaling.get("rope_type", "default")
        if rope_type not in ("default", "llama3", "linear"):
            raise ValueError(f"unsupported rope_type {rope_type!r}")

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def context_limit(self) -> int:
        """Longest sequence served. A sliding window narrower than the context is not
        implemented, so it caps the context rather than silently changing the attention."""
        if self.sliding_window:
            return min(self.max_position, self.sliding_window)
        return self.max_position

    @classmethod
    def from_hf(cls, hf: Any) -> "ModelConfig":
        archs = getattr(hf, "architectures", None) or []
        arch = next((SUPPORTED[a] for a in archs if a in SUPPORTED), None)
        if arch is None:
            arch = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
                    "mistral": "mistral"}.get(getattr(hf, "model_type", ""), "")
        if not arch:
            raise ValueError(f"unsupported model {archs or hf.model_type}; "
                             f"supported: {', '.join(sorted(SUPPORTED))}")
        rope = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
        theta = rope.pop("rope_theta", None) or getattr(hf, "rope_theta", None) or 10000.0
        rope.setdefault("rope_type", rope.pop("type", "default"))
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        eos = hf.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        window = getattr(hf, "sliding_window", None)
        if arch in ("qwen2", "qwen3") and not getattr(hf, "use_sliding_window", False):
            window = None
        return cls(
            arch=arch, vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size, num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
            head_dim=head_dim, rms_norm_eps=hf.rms_norm_eps, rope_theta=float(theta),
            rope_scaling=rope, max_position=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=arch == "qwen2" or bool(getattr(hf, "attention_bias", False)),
            qk_norm=arch == "qwen3", sliding_window=window,
            bos_token_id=getattr(hf, "bos_token_id", None), eos_token_ids=eos_ids,
        )


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """`[head_dim // 2]` float32 inverse frequencies, with Llama-3 / linear scaling applied."""
    d = cfg.head_dim
    # Same float32 arithmetic as transformers, so logits agree to the last bits.
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    sc = cfg.rope_scaling
    kind = sc.get("rope_type", "default")
    if kind == "linear":
        inv = inv / sc["factor"]
    elif kind == "llama3":
        factor, low, high = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old = sc["original_max_position_embeddings"]
        low_wl, high_wl = old / low, old / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= high_wl) & (wavelen <= low_wl)
        inv = torch.where(is_mid, mid, scaled)
    return inv
