"""The graph-safe Triton tree attention (prefix length in device memory) against the torch
reference, and the GraphRunner's padded static-buffer step against the eager runner.

On the CPU this runs through TRITON_INTERPRET=1 (conftest.py); shapes stay small.
"""

from __future__ import annotations

import pytest
import torch

from lsrt.kernels import triton_available
from lsrt.kernels.attention import reference as ref
from lsrt.kernels.attention.testing import paged_case, tree_mask

pytestmark = [pytest.mark.kernels,
              pytest.mark.skipif(not triton_available(), reason="Triton cannot run here")]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (n, hkv, group, head_dim, prefix_len, max_prefix, block_size, block_n, num_splits)
CASES = [
    (1, 1, 1, 64, 0, 64, 16, 16, 3),        # zero prefix: every prefix split is empty
    (5, 2, 3, 64, 37, 200, 16, 16, 4),      # odd prefix far below max_prefix, GQA 3
    (3, 1, 4, 32, 100, 100, 8, 16, 3),      # prefix == max_prefix, small pages
    (7, 2, 2, 64, 161, 40, 16, 16, 2),      # prefix past max_prefix: splits grow, still exact
    (4, 1, 8, 64, 45, 1000, 4, 16, None),   # GQA 8, splits chosen from the shapes
    (2, 2, 1, 16, 0, 0, 16, 16, None),      # max_prefix 0: no prefix program in the grid
]


def _case(n, hkv, group, d, length, bs, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    case = paged_case(n=n, hkv=hkv, group=group, d=d, prefix_len=length, block_size=bs, gen=gen,
                      device=DEVICE, dtype=dtype)
    return case, tree_mask(n, gen).to(DEVICE)


def _graph_call(case, mask, max_prefix, cfg, plen_dtype=torch.int32):
    from lsrt.kernels.attention.triton_graph import paged_hybrid_attention_graph

    args = {**case, "prefix_len": torch.tensor([case["prefix_len"]], dtype=plen_dtype,
                                               device=DEVICE)}
    return paged_hybrid_attention_graph(**args, mask=mask, max_prefix=max_prefix, config=cfg)


@pytest.mark.parametrize("case_args", CASES,
                         ids=lambda c: "n{}-h{}x{}-d{}-L{}-max{}-bs{}".format(*c))
def test_graph_kernel_matches_reference_fp32(case_args: tuple) -> None:
    from lsrt.kernels.attention.triton_graph import GraphAttentionConfig

    n, hkv, group, d, length, max_prefix, bs, block_n, splits = case_args
    case, mask = _case(n, hkv, group, d, length, bs, seed=n * 131 + length)
    cfg = GraphAttentionConfig(block_n=block_n, min_split_tiles=1, num_splits=splits)
    out, lse = _graph_call(case, mask, max_prefix, cfg)
    want_out, want_lse = ref.paged_hybrid_attention(**case, mask=mask)
    torch.testing.assert_close(out, want_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse, want_lse, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows_first", [True, False], ids=["rows-first", "heads-first"])
def test_graph_kernel_several_row_tiles_either_grid_order(rows_first: bool) -> None:
    """Three row tiles per KV head (rows 40 > block_m 16) under both grid orders."""
    from lsrt.kernels.attention.triton_graph import GraphAttentionConfig

    case, mask = _case(10, 2, 4, 32, 2 * 48 + 21, 8, seed=77)
    cfg = GraphAttentionConfig(block_m=16, block_n=16, min_split_tiles=1, num_splits=3,
                               rows_first=rows_first)
    out, lse = _graph_call(case, mask, 2 * 48 + 21, cfg)
    want_out, want_lse = ref.paged_hybrid_attention(**case, mask=mask)
    torch.testing.assert_close(out, want_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse, want_lse, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("other", ["", "prefetch_pages", "tma", "halves"])
def test_one_launch_config_serves_every_length(other: str) -> None:
    """The same shapes, max_prefix and buffers with the device-side length changing (page ids
    loaded a tile ahead or not; key tiles through TMA descriptors over 32-token pages; the row
    tile as two halves)."""
    from lsrt.kernels.attention.triton_graph import GraphAttentionConfig

    case, mask = _case(4, 2, 2, 32, 90, 32 if other == "tma" else 8, seed=5)
    plen = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    cfg = GraphAttentionConfig(block_n=16, min_split_tiles=1, num_splits=4,
                               **({other: True} if other else {}),
                               **({"block_m": 32} if other == "halves" else {}))
    from lsrt.kernels.attention.triton_graph import paged_hybrid_attention_graph

    for length in (0, 1, 17, 63, 90):
        plen.fill_(length)
        out, lse = paged_hybrid_attention_graph(
            **{**case, "prefix_len": plen}, mask=mask.to(torch.int64), max_prefix=90, config=cfg)
        want_out, want_lse = ref.paged_hybrid_attention(**{**case, "prefix_len": length},
                                                        mask=mask)
        torch.testing.assert_close(out, want_out, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(lse, want_lse, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(DEVICE == "cpu", reason="the Triton interpreter mishandles bf16 (so does "
                    "triton_tree's kernel there)")
def test_bf16_matches_reference() -> None:
    case, mask = _case(6, 1, 3, 64, 70, 16, seed=9, dtype=torch.bfloat16)
    from lsrt.kernels.attention.triton_graph import GraphAttentionConfig

    out, lse = _graph_call(case, mask, 128, GraphAttentionConfig(block_n=16, num_splits=2))
    want_out, want_lse = ref.paged_hybrid_attention(**case, mask=mask)
    torch.testing.assert_close(out.float(), want_out.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse, want_lse, rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE == "cpu", reason="needs CUDA")
@pytest.mark.parametrize("pdl", [False, True], ids=["plain", "pdl"])
@pytest.mark.parametrize("other", ["", "prefetch_pages", "tma", "halves"])
def test_graph_kernel_in_a_cuda_graph(pdl: bool, other: str) -> None:
    """Captured once, replayed as the device-side length changes: with the reduce launched as a
    programmatic dependent (an edge of the graph) it still sees every partial; TMA descriptors
    (64-token pages) are captured by value."""
    from lsrt.kernels.attention.triton_graph import (GraphAttentionConfig,
                                                     paged_hybrid_attention_graph)
    from lsrt.kernels.attention.triton_tree import pdl_supported

    if pdl and not pdl_supported(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs a Hopper GPU and Triton's gdc ops")
    if other == "tma" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA needs a Hopper-or-newer GPU")
    case, mask = _case(16, 8, 4, 128, 20000, 64 if other == "tma" else 16, seed=3,
                       dtype=torch.bfloat16)
    plen = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    args = {**case, "prefix_len": plen, "mask": mask, "max_prefix": 20000,
            "config": GraphAttentionConfig(pdl=pdl, **({other: True} if other else {}))}
    plen.fill_(20000)
    paged_hybrid_attention_graph(**args)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = paged_hybrid_attention_graph(**args)
    for length in (20000, 7, 12345, 0):
        plen.fill_(length)
        graph.replay()
        want_out, want_lse = ref.paged_hybrid_attention(**{**case, "prefix_len": length},
                                                        mask=mask)
        torch.testing.assert_close(out.float(), want_out.float(), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(lse, want_lse, rtol=1e-2, atol=1e-2)


def test_bad_prefix_len_is_rejected() -> None:
    from lsrt.runtime.errors import InvalidRequest

    case, mask = _case(2, 1, 1, 16, 4, 16, seed=1)
    from lsrt.kernels.attention.triton_graph import paged_hybrid_attention_graph

    with pytest.raises(InvalidRequest):
        paged_hybrid_attention_graph(**{**case, "prefix_len": torch.zeros(2, dtype=torch.int32,
                                                                          device=DEVICE)},
                                     mask=mask, max_prefix=16)


def test_padded_static_step_matches_eager_runner(tmp_path):
    """GraphRunner's padded static-buffer step (run uncaptured) gives the eager logits: padding
    nodes neither leak into real nodes nor disturb the committed KV."""
    from lsrt.runtime.cuda_graphs import GraphConfig, GraphRunner
    from lsrt.runtime.model import load_model
    from lsrt.runtime.runner import ModelRunner, RunnerConfig
    from lsrt.runtime.spec.tree import DraftTree

    from tiny_models import make_tiny_model

    make_tiny_model("qwen2", tmp_path)
    ids = torch.randint(0, 96, (21,), generator=torch.Generator().manual_seed(0)).tolist()
    trees = [DraftTree.from_paths(ids[-1], [[3, 4, 5], [3, 6], [7]]),  # 6 nodes -> padded to 8
             DraftTree.chain(9, [10, 11]),                              # 3 nodes -> 4
             DraftTree.chain(12, [])]                                   # decode, 1 node
    outs = {}
    for kind in ("eager", "graph"):  # on a GPU the graph run really captures (fp32)
        runner = ModelRunner(load_model(tmp_path, device=DEVICE), RunnerConfig(
            device=DEVICE, attention="sdpa", kv_budget_mb=4, block_size=4, prefill_chunk=8))
        if kind == "graph":
            runner = GraphRunner(runner, GraphConfig(sizes=(1, 4, 8), capture=DEVICE == "cuda",
                                                     attention=_small_attention()))
        seq = runner.new_sequence()
        runner.prefill(seq, ids[:-1])
        got = []
        for tree in trees:
            got.append(runner.verify(seq, tree))
            runner.commit(seq, tree.path_to(len(tree) - 1))
        got.append(runner.verify(seq, DraftTree.chain(13, [14])))  # reads committed tree KV
        outs[kind] = got
    for a, b in zip(outs["eager"], outs["graph"]):
        assert a.shape == b.shape
        assert (a - b).abs().max() < (1e-4 if DEVICE == "cpu" else 1e-3)


def _small_attention():
    from lsrt.kernels.attention.triton_graph import GraphAttentionConfig

    return GraphAttentionConfig(block_n=16, min_split_tiles=1, num_splits=2)
