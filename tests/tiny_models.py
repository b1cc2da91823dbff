"""Tiny random-weight models with real architectures, saved as HF directories (no download)."""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llama", "llama3", "qwen2", "qwen3", "mistral")


def tiny_config(family: str, vocab: int = 97, max_position: int = 4096):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_position,
                  rms_norm_eps=1e-5, eos_token_id=vocab - 1, bos_token_id=0)
    if family == "llama":
        return LlamaConfig(**common, rope_theta=10000.0, tie_word_embeddings=True)
    if family == "llama3":
        return LlamaConfig(**common, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 1024})
    if family == "qwen2":
        return Qwen2Config(**common, rope_theta=1e6)
    if family == "qwen3":
        return Qwen3Config(**{**common, "num_attention_heads": 6, "num_key_value_heads": 2},
                           head_dim=32, rope_theta=1e6)
    if family == "mistral":
        return MistralConfig(**common, sliding_window=None, head_dim=16)
    raise ValueError(family)


def copy_tokenizer(src_dir: Path, out_dir: Path) -> None:
    """Give a tiny model a real tokenizer (ids below the tiny vocab decode fine)."""
    import shutil

    for f in Path(src_dir).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, Path(out_dir) / f.name)


def make_tiny_model(family: str, out_dir: Path, seed: int = 0, max_position: int = 4096):
    """Save a random-weight HF model to `out_dir`; return the transformers model (float32)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, max_position=max_position),
                                             dtype=torch.float32)
    with torch.no_grad():  # widen the default tiny init so logits are not near-uniform
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    return model


def repetitive_prompt(vocab: int, n: int, seed: int) -> list[int]:
    """Random 37-token blocks that keep recurring between random 11-token stretches, so
    history-based drafts sometimes hit."""
    g = torch.Generator().manual_seed(seed)
    block = torch.randint(1, vocab - 2, (37,), generator=g).tolist()
    out: list[int] = []
    while len(out) < n:
        out += block if len(out) % 3 else torch.randint(1, vocab - 2, (11,), generator=g).tolist()
    return out[:n]


def perturb(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Add seeded noise to every parameter (e.g. a draft that is not a copy of its target)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g).to(p.device, p.dtype))
