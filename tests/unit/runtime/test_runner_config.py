"""RunnerConfig: its checks and the per-device defaults that `lsrt serve/chat/generate` use."""

from __future__ import annotations

import argparse

import pytest

from lsrt.runtime.runner import GPU_BLOCK_SIZE, RunnerConfig


def test_device_defaults_and_explicit_fields() -> None:
    cpu = RunnerConfig.for_device("cpu")
    assert (cpu.dtype, cpu.block_size) == ("float32", 16)
    gpu = RunnerConfig.for_device("cuda", kv_budget_mb=512)
    assert (gpu.device, gpu.dtype, gpu.block_size, gpu.kv_budget_mb) == (
        "cuda", "bfloat16", GPU_BLOCK_SIZE, 512)
    assert GPU_BLOCK_SIZE % 64 == 0  # pages hold whole 64-key tiles (TMA, see triton_tree)
    mine = RunnerConfig.for_device("cuda", dtype="float32", block_size=16)
    assert (mine.dtype, mine.block_size) == ("float32", 16)


def test_cli_builds_the_device_config() -> None:
    from lsrt.clients.cli import runner_config

    args = argparse.Namespace(device="cuda", dtype=None, attention="triton", kv_budget_mb=0,
                              tree_budget=None)
    cfg = runner_config(args)
    assert (cfg.dtype, cfg.block_size, cfg.attention) == ("bfloat16", GPU_BLOCK_SIZE, "triton")
    assert not cfg.cost_aware_trees  # a GPU: the full node budget unless asked
    args = argparse.Namespace(device="cpu", dtype=None, attention=None, kv_budget_mb=64,
                              tree_budget="full")
    cfg = runner_config(args)
    assert (cfg.dtype, cfg.block_size, cfg.kv_budget_mb) == ("float32", 16, 64)
    assert (cfg.tree_budget, cfg.cost_aware_trees) == ("full", False)


@pytest.mark.parametrize("bad", [{"block_size": 0}, {"dtype": "int8"}, {"attention": "flash"},
                                 {"graph_sizes": ()}, {"tree_budget": "none"}])
def test_bad_fields_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        RunnerConfig.for_device("cuda", **bad)


@pytest.mark.parametrize("argv", [["serve"], ["chat", "--session", "s"],
                                  ["generate", "--prompt", "x"]])
def test_every_command_takes_the_tree_budget(argv: list[str]) -> None:
    from lsrt.clients.cli import build_parser
    from lsrt.clients.commands import backend_kwargs

    parser = build_parser()
    assert parser.parse_args(argv).tree_budget is None  # the device's default
    args = parser.parse_args([*argv, "--tree-budget", "full"])
    assert args.tree_budget == "full"
    if argv[0] != "generate":  # serve and chat build a backend
        assert backend_kwargs(args)["tree_budget"] == "full"
    with pytest.raises(SystemExit):
        parser.parse_args([*argv, "--tree-budget", "some"])
