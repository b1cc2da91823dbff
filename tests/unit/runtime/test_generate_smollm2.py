"""`lsrt generate` on the real SmolLM2-135M equals transformers' greedy generate (fp32, CPU)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lsrt.clients.cli import main

PROMPTS = [
    ("The capital of France is", False),
    ("def fibonacci(n):\n    ", False),
    ("Write a haiku about the sea.", True),
    ("List three prime numbers.", True),
]


def hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("prompt,chat", PROMPTS)
def test_cli_greedy_matches_transformers(prompt, chat, smollm2, smollm2_dir, hf_smollm2, capsys):
    argv = ["generate", "--model", str(smollm2_dir), "--prompt", prompt, "--max-tokens", "24",
            "--json"]
    if chat:
        argv.append("--chat")
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    ids = smollm2.encode_prompt(prompt, chat=chat)
    assert out["prompt_tokens"] == len(ids)
    expected = hf_greedy(hf_smollm2, ids, 24)
    got = out["token_ids"]
    # transformers does not stop at our EOS ids here; compare up to our stop.
    assert got == expected[:len(got)]
    assert out["finish_reason"] in ("stop", "length")
    assert len(got) == 24 or got[-1] in smollm2.eos_ids
    assert out["completion_tokens"] == len(got)
    assert set(out["timings"]) >= {"prefill_s", "decode_s"}


def test_stop_string_and_token(smollm2):
    from lsrt.runtime.sampling import SamplingParams

    ids = smollm2.encode_prompt("Count: 1, 2, 3, 4, 5,")
    full = smollm2.generate(ids, SamplingParams(max_tokens=16)).generation
    assert len(full.token_ids) == 16
    stop_tok = full.token_ids[5]
    cut = smollm2.generate(ids, SamplingParams(max_tokens=16, stop_token_ids=(stop_tok,)))
    first = full.token_ids.index(stop_tok)
    assert cut.generation.token_ids == full.token_ids[:first + 1]
    assert cut.generation.finish_reason == "stop"
    needle = full.text[len(full.text) // 2:][:3]
    if needle.strip():
        by_text = smollm2.generate(ids, SamplingParams(max_tokens=16, stop=(needle,)))
        assert by_text.generation.text == full.text[:full.text.index(needle)]
        assert needle not in by_text.generation.text


def test_sampling_is_reproducible_for_a_seed(smollm2):
    from lsrt.runtime.sampling import SamplingParams

    ids = smollm2.encode_prompt("Once upon a time")
    p = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=7, max_tokens=12)
    a = smollm2.generate(ids, p).generation.token_ids
    b = smollm2.generate(ids, p).generation.token_ids
    c = smollm2.generate(ids, SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=8,
                                             max_tokens=12)).generation.token_ids
    assert a == b
    assert a != c


def test_streamed_text_equals_final_text(smollm2):
    from lsrt.runtime.sampling import SamplingParams

    ids = smollm2.encode_prompt("Écris une phrase en français avec des accents: é, è, à.",
                                chat=True)
    chunks: list[str] = []
    done = smollm2.generate(ids, SamplingParams(max_tokens=30),
                            on_text=lambda t, _ids: chunks.append(t))
    assert "".join(chunks) == done.generation.text
    assert all("\ufffd" not in c for c in chunks)


@pytest.mark.parametrize("args,needle", [
    (["--model", "no-such-model", "--prompt", "x"], "no-such-model"),
    (["--prompt-file", "/nonexistent/prompt.txt"], "not found"),
    (["--prompt", "x", "--temperature", "-1"], "temperature"),
    (["--prompt", "x", "--top-p", "0"], "top_p"),
    (["--prompt", "x " * 9000], "context too long"),
])
def test_cli_errors_are_one_line(args, needle, smollm2_dir, tmp_path):
    env_model = [] if "--model" in args else ["--model", str(smollm2_dir)]
    proc = subprocess.run([sys.executable, "-m", "lsrt.clients.cli", "generate", *env_model,
                           *args, "--max-tokens", "2"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("lsrt: error")]
    assert len(lines) == 1 and needle in lines[0].lower(), proc.stderr
    assert "Traceback" not in proc.stderr


def test_smollm2_logits_match_transformers(smollm2_dir, hf_smollm2):
    """Multi-chunk prefill then decode steps: logits within 1e-4 of transformers (fp32)."""
    from lsrt.runtime.model import load_model
    from lsrt.runtime.runner import ModelRunner, RunnerConfig
    from lsrt.runtime.spec.tree import DraftTree

    runner = ModelRunner(load_model(smollm2_dir), RunnerConfig(prefill_chunk=96,
                                                               kv_budget_mb=256))
    ids = torch.randint(5, 49000, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        ref = hf_smollm2(torch.tensor([ids])).logits[0].float()
    seq = runner.new_sequence()
    last = runner.prefill(seq, ids[:296], want_logits=True)  # 4 chunks
    assert (last - ref[295]).abs().max() < 1e-4
    for pos in range(296, 300):
        out = runner.verify(seq, DraftTree.chain(ids[pos], []))[0]
        runner.commit(seq, [0])
        assert (out - ref[pos]).abs().max() < 1e-4, pos
