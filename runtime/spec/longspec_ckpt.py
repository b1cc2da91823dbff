"""LongSpec draft checkpoints: reading the published ones and lsrt's own format.

Published `sail/longspec-*` checkpoints (Qwen2/LlamaGlideDecoderLayer names, in a directory of
safetensors or .bin/.pth files, or a state dict) are mapped onto `LongSpecDraft` parameters by
`published_key_map` and `load_longspec_checkpoint`. lsrt's own format, written by training and
read by `longspec:DIR`, is a directory with `draft.safetensors` (own parameter names) and a
`config.json` recording the format, the position convention, sink/window and the target's
shape, so a draft is never loaded onto a target it was not made for. docs/LONGSPEC.md has the
key mapping.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lsrt.runtime.config import ModelConfig
from lsrt.runtime.spec.longspec_layer import POSITIONS, LongSpecConfig, LongSpecDraft

FORMAT = "lsrt-longspec-draft"
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "drafts"  # lsrt/runtime/drafts/<name>/
_DIGEST_ROWS = 256
_PREFIXES = ("draft_model.", "glide.", "model.")  # how the published files may be prefixed
_IGNORED = ("cross_attn.k_proj.", "cross_attn.v_proj.", "rotary_emb.")  # unused at inference


def published_key_map() -> dict[str, tuple[str, int | None]]:
    """`sail/longspec-*` parameter name -> (own parameter, part of a fused q|k|v / gate|up)."""
    m: dict[str, tuple[str, int | None]] = {
        "input_layernorm.weight": ("in_norm", None),
        "post_self_attention_layernorm.weight": ("ca_norm", None),
        "post_cross_attention_layernorm.weight": ("mlp_norm", None),
        "self_attn.o_proj.weight": ("sa_o_w", None),
        "cross_attn.q_proj.weight": ("ca_q_w", None), "cross_attn.q_proj.bias": ("ca_q_b", None),
        "cross_attn.o_proj.weight": ("ca_o_w", None),
        "mlp.gate_proj.weight": ("gate_up_w", 0), "mlp.up_proj.weight": ("gate_up_w", 1),
        "mlp.down_proj.weight": ("down_w", None)}
    for j, n in enumerate("qkv"):
        m[f"self_attn.{n}_proj.weight"] = ("sa_qkv_w", j)
        m[f"self_attn.{n}_proj.bias"] = ("sa_qkv_b", j)
    return m


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a published checkpoint: a directory, a .safetensors or a .pth/.bin file."""
    from safetensors.torch import load_file

    if path.is_dir():
        files = sorted(path.glob("*.safetensors")) or sorted(
            [*path.glob("*.bin"), *path.glob("*.pth")])
        if not files:
            raise FileNotFoundError(f"{path}: no *.safetensors, *.bin or *.pth weights")
    else:
        files = [path]
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(f) if f.suffix == ".safetensors"
                   else torch.load(f, map_location="cpu", weights_only=True))
    return out


@torch.no_grad()
def load_longspec_checkpoint(path_or_state_dict: str | Path | dict[str, torch.Tensor],
                             target_cfg: ModelConfig, lcfg: LongSpecConfig | None = None
                             ) -> LongSpecDraft:
    """A published LongSpec draft (Qwen2/LlamaGlideDecoderLayer names) as a LongSpecDraft.

    The published layer has no final norm and was trained with a 512-token window and no
    sink, hence the default `LongSpecConfig(sink=0, window=512, final_norm=False)`.
    Raises ValueError on unknown, missing or mis-shaped tensors.
    """
    sd = (path_or_state_dict if isinstance(path_or_state_dict, dict)
          else _read_state_dict(Path(path_or_state_dict)))
    draft = LongSpecDraft(target_cfg, lcfg or LongSpecConfig(sink=0, window=512,
                                                              final_norm=False))
    params, names = dict(draft.named_parameters()), published_key_map()
    cfg = target_cfg
    qkv = [cfg.num_heads * cfg.head_dim] + [cfg.num_kv_heads * cfg.head_dim] * 2
    seen, unknown = set(), []
    for key, t in sd.items():
        for pre in _PREFIXES:
            key = key.removeprefix(pre)
        if key not in names:
            if not any(s in key for s in _IGNORED):
                unknown.append(key)
            continue
        own, part = names[key]
        dst = params[own]
        if part is not None:
            sizes = qkv if own.startswith("sa_qkv") else [draft.mlp_width] * 2
            dst = dst[sum(sizes[:part]):sum(sizes[:part + 1])]
        if tuple(t.shape) != tuple(dst.shape):
            raise ValueError(f"longspec checkpoint: {key} has shape {tuple(t.shape)}, "
                             f"expected {tuple(dst.shape)} for this target")
        dst.copy_(t.float())
        seen.add(key)
    missing = [k for k in names if k not in seen and not k.endswith(".bias")]
    if unknown or missing:
        raise ValueError(f"longspec checkpoint does not fit: unknown {unknown[:5]}, "
                         f"missing {missing[:5]}")
    return draft


def _shape_fields(cfg: ModelConfig) -> dict:
    return {k: getattr(cfg, k) for k in ("arch", "vocab_size", "hidden_size", "num_layers",
                                         "num_heads", "num_kv_heads", "head_dim",
                                         "intermediate_size")}


def save_draft(draft: LongSpecDraft, out_dir: str | Path, extra: dict | None = None) -> None:
    """`draft.safetensors` (own parameter names) + `config.json` (format, sink/window, target)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in draft.state_dict().items()}
    meta = {"format": FORMAT, "version": 1, "positions": POSITIONS,
            "sink": draft.lcfg.sink, "window": draft.lcfg.window,
            "final_norm": draft.lcfg.final_norm, "mlp_width": draft.mlp_width,
            "feature": draft.lcfg.feature, "target": _shape_fields(draft.cfg),
            **({"feature_layers": list(draft.lcfg.feature_layers)}
               if draft.lcfg.feature_layers else {}),
            **(extra or {})}
    _write_draft(Path(out_dir), tensors, meta)


def _write_draft(out: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """`draft.safetensors` (written whole, then moved into place) and `config.json`."""
    import json

    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "draft.safetensors.tmp"))
    (out / "draft.safetensors.tmp").replace(out / "draft.safetensors")
    (out / "config.json").write_text(json.dumps(meta, indent=1, sort_keys=True))


def export_draft(src_dir: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16,
                 extra: dict | None = None) -> int:
    """Copy a `save_draft` directory with its floating-point tensors cast to `dtype` (how a
    trained draft is shipped); integer tensors (`vocab_ids`) are copied as they are. `extra`
    is merged into the config. Returns the number of parameters written."""
    import json

    from safetensors.torch import load_file

    src = Path(src_dir)
    if not is_own_checkpoint(src):
        raise ValueError(f"{src}: not an lsrt longspec draft directory")
    state = load_file(str(src / "draft.safetensors"))
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous()
               for k, v in state.items()}
    meta = json.loads((src / "config.json").read_text())
    meta.update({"dtype": str(dtype).removeprefix("torch."), **(extra or {})})
    _write_draft(Path(out_dir), tensors, meta)
    return sum(v.numel() for v in tensors.values() if v.is_floating_point())


def is_own_checkpoint(path: str | Path) -> bool:
    import json

    cfg = Path(path) / "config.json"
    return cfg.is_file() and json.loads(cfg.read_text()).get("format") == FORMAT


@torch.no_grad()
def load_draft(path: str | Path, target_cfg: ModelConfig) -> LongSpecDraft:
    """Load a `save_draft` directory; ValueError when it was trained for another target."""
    import json

    from safetensors.torch import load_file

    meta = json.loads((Path(path) / "config.json").read_text())
    if meta.get("format") != FORMAT or meta.get("positions") != POSITIONS:
        raise ValueError(f"{path}: not an lsrt longspec draft ({meta.get('format')})")
    if meta["target"] != _shape_fields(target_cfg):
        raise ValueError(f"{path}: draft made for {meta['target']}, not this target")
    # Drafts saved before `mlp_width` / `feature` / `feature_layers` existed: the target's MLP
    # width, no feature, the final hidden state alone.
    draft = LongSpecDraft(target_cfg, LongSpecConfig(sink=meta["sink"], window=meta["window"],
                                                     final_norm=meta["final_norm"],
                                                     mlp_width=meta.get("mlp_width"),
                                                     feature=meta.get("feature", False),
                                                     feature_layers=tuple(
                                                         meta.get("feature_layers", ()))))
    state = load_file(str(Path(path) / "draft.safetensors"))
    if "vocab_ids" in state:
        if state["vocab_ids"].is_floating_point():
            raise ValueError(f"{path}: vocab_ids are {state['vocab_ids'].dtype}, not integer "
                             "token ids (a cast of the whole state dict; use export_draft)")
        draft.set_draft_vocab(state["vocab_ids"])
    draft.load_state_dict(state)
    return draft


@torch.no_grad()
def target_digest(target) -> str:
    """16 hex chars identifying a target by its weights, not its files: the first embedding
    rows rounded to bfloat16 (the same whether the model was loaded in float32 or bfloat16, and
    whichever converter wrote the safetensors)."""
    import hashlib

    rows = target.embed[:_DIGEST_ROWS].detach().to("cpu", torch.bfloat16).view(torch.int16)
    return hashlib.sha256(rows.numpy().tobytes()).hexdigest()[:16]


def find_bundled_draft(target) -> Path | None:
    """The shipped draft directory trained for this target (matched by `target_digest` and
    shape), or None."""
    import json

    if not BUNDLED_DIR.is_dir():
        return None
    digest, shape = None, _shape_fields(target.cfg)
    for cfg_file in sorted(BUNDLED_DIR.glob("*/config.json")):
        meta = json.loads(cfg_file.read_text())
        if meta.get("format") != FORMAT or meta.get("target") != shape:
            continue
        digest = digest or target_digest(target)
        if meta.get("target_digest") == digest:
            return cfg_file.parent
    return None
