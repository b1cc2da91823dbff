"""CUDA-graphed decode / verify (GraphRunner) against the eager runner, SmolLM2-135M's shapes with
random weights (bf16, Triton attention; latency and graph mechanics do not depend on weights).

bf16 results differ with kernel shapes and reduction orders (a padded tree runs at the captured
size; the graph kernel's reduce spans more, mostly empty, splits), and a random 30-layer model
amplifies those last-bit differences to a few ulps of its logits (~|logit| 100, ulp 0.5). So
logits are compared against the noise between two correct eager backends (Triton vs SDPA), and
greedy output is teacher-forced: every token the graphed run emits is the eager target's argmax
at its position or within a near-tie margin of it (REL_MARGIN of the row's largest |logit|).
A real bug (mask leak, wrong position or slot) moves a row by a sizeable share of its range.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
SIZES = (1, 2, 4, 8, 16, 32)
REL_MARGIN = 0.05  # near-tie margin, relative to the row's largest |logit|


def _bench_module():
    bench = Path(__file__).resolve().parents[2] / "bench"
    if str(bench) not in sys.path:  # gpu_graphs imports its sibling gpu_step
        sys.path.insert(0, str(bench))
    path = bench / "gpu_graphs.py"
    spec = importlib.util.spec_from_file_location("lsrt_bench_gpu_graphs", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", params=[16, 64], ids=["pages16", "pages64"])
def runners(request):
    """16-token pages (the CPU default) and 64-token pages (the GPU default: trees of 32 tokens,
    96 rows a KV head, read their key tiles by TMA on Hopper)."""
    from lsrt.runtime.cuda_graphs import GraphConfig, GraphRunner

    eager = _bench_module().build_random_runner("smollm2", max_ctx=6144, seed=1,
                                                block_size=request.param)
    return eager, GraphRunner(eager, GraphConfig(sizes=SIZES))


def _random_tree(n: int, gen: torch.Generator):
    from lsrt.runtime.spec.tree import DraftTree

    toks = torch.randint(0, 49152, (n,), generator=gen).tolist()
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, n)]
    return DraftTree(tokens=toks, parents=parents)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|."""
    return float((got - want).abs().max() / want.abs().max())


def _far_flips(got: torch.Tensor, want: torch.Tensor) -> int:
    """Rows whose `got` argmax is worse under `want` than a near-tie."""
    top = got.argmax(-1)
    margin = want.max(-1).values - want.gather(-1, top[:, None])[:, 0]
    return int((margin > REL_MARGIN * want.abs().max(-1).values).sum())


def _sdpa_logits(eager, seq, tree) -> torch.Tensor:
    """The same verify through the eager SDPA backend: a second correct bf16 answer."""
    from lsrt.runtime.attention import make_backend

    saved, eager.backend = eager.backend, make_backend("sdpa")
    try:
        return eager.verify(seq, tree)
    finally:
        eager.backend = saved


@pytest.mark.parametrize("prefix", [1500, 4100])
def test_graph_logits_match_eager(runners, prefix):
    """Every captured size, and padded odd sizes, at two context lengths (one graph each)."""
    eager, graphs = runners
    gen = torch.Generator().manual_seed(prefix)
    seq = eager.new_sequence()
    try:
        eager.prefill(seq, torch.randint(0, 49152, (prefix,), generator=gen).tolist())
        for n in (*SIZES, 3, 5, 13, 24, 40):  # 40 > 32: eager fallback
            tree = _random_tree(n, gen)
            want = eager.verify(seq, tree)
            got = graphs.verify(seq, tree)
            noise = _rel(_sdpa_logits(eager, seq, tree), want)
            assert got.shape == want.shape == (n, 49152)
            diff = _rel(got, want)
            print(f"prefix {prefix} n {n}: graph-vs-eager rel diff {diff:.2e}, "
                  f"sdpa-vs-triton eager {noise:.2e}, max |logit| {float(want.abs().max()):.1f}")
            assert diff <= max(0.08, 3 * noise), (n, diff, noise)
            assert _far_flips(got, want) == 0, n
            assert seq.num_tokens == prefix  # verify never commits
    finally:
        seq.release()


def _greedy(runner, prompt: list[int], steps: int, drafter) -> tuple[list[int], list[int]]:
    """Greedy Engine steps after `prompt`; (emitted tokens, tree sizes verified)."""
    from lsrt.runtime.sampling import SamplingParams
    from lsrt.runtime.spec.engine import Engine

    engine = Engine(runner, None, ())
    params = SamplingParams(max_tokens=1 << 20)
    seq = runner.new_sequence()
    history, sizes = list(prompt), []
    try:
        runner.prefill(seq, prompt[:-1])
        if drafter is not None:
            drafter.observe(history)
        for _ in range(steps):
            emitted, drafted = engine.step(seq, history, drafter, params, None, 64)
            sizes.append(drafted + 1)
            history.extend(emitted)
            if drafter is not None:
                drafter.observe(emitted)
        return history[len(prompt):], sizes
    finally:
        seq.release()


def _chain_logits(eager, prompt: list[int], out: list[int]) -> torch.Tensor:
    """Eager target logits `[len(out) + 1, vocab]` after the prompt and each token of `out`."""
    from lsrt.runtime.spec.tree import DraftTree

    seq = eager.new_sequence()
    try:
        eager.prefill(seq, prompt[:-1])
        return eager.verify(seq, DraftTree.chain(prompt[-1], out))
    finally:
        seq.release()


def _teacher_forced_flips(eager, prompt: list[int], out: list[int]) -> list[tuple[int, float]]:
    """(position, margin / row's max |logit|) of every emitted token that is not the eager
    target's argmax."""
    logits = _chain_logits(eager, prompt, out[:-1])
    rows = logits[torch.arange(len(out)), torch.tensor(out, device=logits.device)]
    margins = ((logits.max(-1).values - rows) / logits.abs().max(-1).values).tolist()
    return [(i, m) for i, m in enumerate(margins) if m > 0]


def test_greedy_generation_with_graphs_equals_eager(runners):
    eager, graphs = runners
    prompt = torch.randint(0, 49152, (700,), generator=torch.Generator().manual_seed(3)).tolist()
    want, _ = _greedy(eager, prompt, 48, None)
    got, _ = _greedy(graphs, prompt, 48, None)
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    print(f"plain greedy: identical={got == want}, first divergence {first}")
    if first is not None:  # allowed only at a bf16 near-tie of the eager target
        row = _chain_logits(eager, prompt, want[:first])[first]
        gap = float((row[want[first]] - row[got[first]]).abs() / row.abs().max())
        assert gap <= REL_MARGIN, (first, gap)
    flips = _teacher_forced_flips(eager, prompt, got)
    assert all(m <= REL_MARGIN for _, m in flips), flips


def test_speculative_trees_through_graphs_are_lossless(runners):
    """Suffix-drafted trees of varying sizes (padded to captured sizes) under greedy."""
    from lsrt.runtime.spec.suffix import SuffixDrafter

    eager, graphs = runners
    base = torch.randint(0, 49152, (60,), generator=torch.Generator().manual_seed(4)).tolist()
    prompt = base * 12  # repetitive: the suffix drafter proposes real trees
    got, sizes = _greedy(graphs, prompt, 24, SuffixDrafter())
    print(f"tree sizes verified: {sizes}")
    assert max(sizes) > 1
    flips = _teacher_forced_flips(eager, prompt, got)
    assert all(m <= REL_MARGIN for _, m in flips), flips
