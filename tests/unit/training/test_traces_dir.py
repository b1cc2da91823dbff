"""Where the agent traces are looked for, and the error a training run gets when none are."""

from __future__ import annotations

import pytest

from lsrt.runtime.training.data import DataConfig, collect_documents, traces_dir


def test_the_environment_names_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("LSRT_TRACES", str(tmp_path))
    assert traces_dir() == tmp_path


def test_training_on_absent_traces_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("LSRT_TRACES", str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="LSRT_TRACES") as err:
        collect_documents(DataConfig(sources=("traces",)))
    assert str(tmp_path / "none") in str(err.value)


def test_traces_found_in_a_folder_of_jsonl(tmp_path, monkeypatch):
    (tmp_path / "a.jsonl").write_text('{"id": "t0", "messages": [{"role": "user", '
                                      '"content": "hello there"}]}\n')
    monkeypatch.setenv("LSRT_TRACES", str(tmp_path))
    docs, held = collect_documents(DataConfig(sources=("traces",), holdout=0))
    assert docs and "hello there" in "".join(docs) and held == []
