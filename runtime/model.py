"""The decoder: Llama / Qwen2 / Qwen3 / Mistral on the paged KV cache.

Own implementation (transformers is only the reference in tests). One forward pass takes `n` new
tokens with their positions, writes their K/V into the pool at `AttentionMeta.write_slots`, and
lets them attend to a prefix of already-cached tokens plus each other under `new_mask` (causal
for a prefill chunk, the ancestor mask for a draft tree). q/k/v and gate/up projections are
fused at load time.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from lsrt.kernels.elementwise import ElementwiseOps, get_elementwise_ops
from lsrt.kernels.linear import Linear
from lsrt.kernels.linear.reference import linear as torch_linear
from lsrt.runtime.attention import AttentionBackend, AttentionMeta
from lsrt.runtime.config import ModelConfig, rope_inv_freq
from lsrt.runtime.errors import ModelNotFound


class DecoderLayer(torch.nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, hq, hkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        self.qkv_w = torch.nn.Parameter(torch.empty((hq + 2 * hkv) * d, cfg.hidden_size),
                                        requires_grad=False)
        self.qkv_b = (torch.nn.Parameter(torch.empty((hq + 2 * hkv) * d), requires_grad=False)
                      if cfg.qkv_bias else None)
        self.o_w = torch.nn.Parameter(torch.empty(cfg.hidden_size, hq * d), requires_grad=False)
        self.gate_up_w = torch.nn.Parameter(torch.empty(2 * cfg.intermediate_size, cfg.hidden_size),
                                            requires_grad=False)
        self.down_w = torch.nn.Parameter(torch.empty(cfg.hidden_size, cfg.intermediate_size),
                                         requires_grad=False)
        self.in_norm = torch.nn.Parameter(torch.empty(cfg.hidden_size), requires_grad=False)
        self.post_norm = torch.nn.Parameter(torch.empty(cfg.hidden_size), requires_grad=False)
        if cfg.qk_norm:
            self.q_norm = torch.nn.Parameter(torch.empty(d), requires_grad=False)
            self.k_norm = torch.nn.Parameter(torch.empty(d), requires_grad=False)

    def qkv(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ops: ElementwiseOps,
            lin: Linear, k_layer: torch.Tensor, v_layer: torch.Tensor, slots: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h `[n, hidden]` (normed) -> q `[n, Hq, D]`, k/v `[n, Hkv, D]` with RoPE applied to q
        and k; k/v also written to `slots` of this layer's cache `[Hkv, slots, D]`."""
        cfg = self.cfg
        qkv = lin(h, self.qkv_w, self.qkv_b)
        norms = (self.q_norm, self.k_norm) if cfg.qk_norm else None
        return ops.rope_qkv(qkv, cos, sin, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                            qk_norm=norms, eps=cfg.rms_norm_eps, k_cache=k_layer,
                            v_cache=v_layer, slots=slots)

    def mlp(self, h: torch.Tensor, ops: ElementwiseOps, lin: Linear) -> torch.Tensor:
        """h `[n, hidden]` (normed) -> `[n, hidden]`."""
        return lin(ops.silu_mul(lin(h, self.gate_up_w)), self.down_w)


class DecoderModel(torch.nn.Module):
    """Weights and the forward pass; the KV pool and the attention backend are passed in."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = torch.nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size),
                                        requires_grad=False)
        self.layers = torch.nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = torch.nn.Parameter(torch.empty(cfg.hidden_size), requires_grad=False)
        if not cfg.tie_word_embeddings:
            self.lm_head_w = torch.nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size),
                                                requires_grad=False)
        self.inv_freq = rope_inv_freq(cfg)  # `[D/2]`, stays float32
        # Norms, RoPE, SiLU-mul: torch references; the runner picks Triton ones on a GPU.
        self.ops: ElementwiseOps = get_elementwise_ops("torch")
        # Projections: F.linear; the runner picks oneDNN's prepacked weights on a CPU.
        self.linear: Linear = torch_linear

    def projection_weights(self) -> list[torch.Tensor]:
        """Every weight `self.linear` multiplies by (for backends that prepare them)."""
        out = [w for layer in self.layers
               for w in (layer.qkv_w, layer.o_w, layer.gate_up_w, layer.down_w)]
        return [*out, self.lm_head]

    @property
    def lm_head(self) -> torch.Tensor:
        return self.embed if self.cfg.tie_word_embeddings else self.lm_head_w

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions `[n]` -> cos, sin `[n, 1, D]` in the model dtype."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMeta,
                backend: AttentionBackend, taps: tuple[int, ...] = ()) -> torch.Tensor:
        """input_ids/positions `[n]` -> final hidden states `[n, hidden]` (after the last norm).

        k_cache/v_cache: the pool, `[layers, Hkv, slots, D]`; the new K/V are written at
        `meta.write_slots` before attention reads them.
        taps: layer indices whose residual stream after the layer, RMS-normalised without a
        weight, is appended: `[n, hidden * (1 + len(taps))]`, the final hidden states first
        (a LongSpec draft's multi-layer feature; `logits` reads the first block only).
        """
        ops, lin, eps, layers = self.ops, self.linear, self.cfg.rms_norm_eps, self.layers
        x = self.embed[input_ids]
        cos, sin = self.rope(positions)
        h = ops.rms_norm(x, layers[0].in_norm, eps)  # x: the residual stream, h: x normed
        tapped: list[torch.Tensor] = []
        for i, layer in enumerate(layers):
            q, k, v = layer.qkv(h, cos, sin, ops, lin, k_cache[i], v_cache[i], meta.write_slots)
            attn = backend.attend(q, k_cache[i], v_cache[i], k, v, meta)
            x, h = ops.add_rms_norm(x, lin(attn.reshape(x.shape[0], -1), layer.o_w),
                                    layer.post_norm, eps)
            after = layers[i + 1].in_norm if i + 1 < len(layers) else self.norm
            x, h = ops.add_rms_norm(x, layer.mlp(h, ops, lin), after, eps)
            if i in taps:
                tapped.append(x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True)
                                              + eps).to(x.dtype))
        return torch.cat([h, *tapped], -1) if taps else h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden `[m, hidden]` (or `forward(taps=...)`'s wider rows: the first block is read)
        -> logits `[m, vocab]` float32."""
        return self.linear(hidden[..., :self.cfg.hidden_size], self.lm_head).float()


def _hf_name_map(cfg: ModelConfig) -> dict[str, tuple[str, int | None]]:
    """transformers weight name -> (own parameter name, fused-slot index or None)."""
    out: dict[str, tuple[str, int | None]] = {
        "model.embed_tokens.weight": ("embed", None), "model.norm.weight": ("norm", None)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = ("lm_head_w", None)
    for i in range(cfg.num_layers):
        p, a, m = f"model.layers.{i}.", f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        for j, name in enumerate("qkv"):
            out[f"{a}{name}_proj.weight"] = (f"layers.{i}.qkv_w", j)
            out[f"{a}{name}_proj.bias"] = (f"layers.{i}.qkv_b", j)
        out[f"{a}o_proj.weight"] = (f"layers.{i}.o_w", None)
        out[f"{m}gate_proj.weight"] = (f"layers.{i}.gate_up_w", 0)
        out[f"{m}up_proj.weight"] = (f"layers.{i}.gate_up_w", 1)
        out[f"{m}down_proj.weight"] = (f"layers.{i}.down_w", None)
        out[f"{p}input_layernorm.weight"] = (f"layers.{i}.in_norm", None)
        out[f"{p}post_attention_layernorm.weight"] = (f"layers.{i}.post_norm", None)
        out[f"{a}q_norm.weight"] = (f"layers.{i}.q_norm", None)
        out[f"{a}k_norm.weight"] = (f"layers.{i}.k_norm", None)
    return out


def load_model(model_dir: str | Path, *, dtype: torch.dtype = torch.float32,
               device: str = "cpu") -> DecoderModel:
    """Build a DecoderModel from an HF-format directory (config.json + *.safetensors)."""
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not (model_dir / "config.json").is_file() or not files:
        raise ModelNotFound(f"{model_dir}: not a model directory (config.json + *.safetensors)")
    cfg = ModelConfig.from_hf(AutoConfig.from_pretrained(model_dir))
    if not cfg.tie_word_embeddings:
        # Some exports tie the head without saying so: no lm_head tensor at all.
        names = set().union(*(safe_open(f, "pt").keys() for f in files))
        if "lm_head.weight" not in names:
            cfg = ModelConfig(**{**cfg.__dict__, "tie_word_embeddings": True})
    with torch.device("meta"):
        model = DecoderModel(cfg)
    model.to_empty(device=device)
    model.to(dtype)
    model.inv_freq = rope_inv_freq(cfg).to(device)
    params = dict(model.named_parameters(remove_duplicate=False))
    seen: set[str] = set()
    names = _hf_name_map(cfg)
    d, hq, hkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    qkv_sizes = [hq * d, hkv * d, hkv * d]
    for f in files:
        with safe_open(f, "pt", device="cpu") as st:
            for key in st.keys():
                if key not in names:
                    continue
                own, part = names[key]
                t = st.get_tensor(key).to(dtype)
                target = params[own]
                if part is None:
                    target.data.copy_(t)
                else:
                    sizes = qkv_sizes if "qkv" in own else [cfg.intermediate_size] * 2
                    start = sum(sizes[:part])
                    target.data[start:start + sizes[part]].copy_(t)
                seen.add(f"{own}:{part}")
    expected = {f"{own}:{part}" for own, part in names.values() if own in params}
    missing = expected - seen
    if missing:
        raise ModelNotFound(f"{model_dir}: weights missing: {sorted(missing)[:5]}")
    return model.eval()


def read_generation_eos(model_dir: Path) -> tuple[int, ...]:
    """EOS ids from generation_config.json, when present (often wider than config.json's)."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return ()
    eos = json.loads(path.read_text()).get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (eos,)
