"""Decode / verify step latency with and without CUDA graphs, random weights with real shapes.

    python bench/gpu_graphs.py [--models smollm2 llama3-8b] [--repeats 20] [--out FILE]
        [--elementwise torch triton] [--block-size 16] [--hf]

SmolLM2-135M shape: plain decode step (1 token) at 2K and 6K context, eager vs graphs, and
tokens/s of a 64-token greedy decode loop (verify + argmax + commit, host work included).
Llama-3.1-8B shape: decode step and 16-node verify step at 32K and 128K, eager vs graphs,
beside the HBM floor (weight bytes + KV bytes) / measured copy bandwidth. Step times are
wall-clock medians (host work included, synchronised after each step) after warm-up. The KV
pool holds random values standing in for a prefilled context (latency does not depend on them).
Each `--elementwise` choice (the decoder's norms / RoPE + KV write / SiLU-mul: torch references
or the Triton kernels) is measured on the same weights, one after the other. --hf: then
transformers' `generate` per-token latency on the Llama-3.1-8B shape at the same contexts, in
the same run (`gpu_step.hf_rows`; a context it cannot hold prints as out of memory).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gpu_step import copy_bandwidth, hf_rows  # the same probes as the step benchmark

SHAPES = {
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    tie_word_embeddings=True, rope_theta=100000.0, max_position_embeddings=8192),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      tie_word_embeddings=False, rope_theta=500000.0,
                      max_position_embeddings=131072 + 1024),
}
PLAN = {  # model -> (contexts, verify tree sizes besides decode, graph sizes)
    "smollm2": ((2048, 6144), (), (1, 2, 4, 8, 16, 32)),
    "llama3-8b": ((32768, 131072), (16,), (1, 16)),
}


def build_random_runner(shape: str, *, max_ctx: int, attention: str = "triton",
                        device: str = "cuda", dtype: str = "bfloat16", seed: int = 0,
                        block_size: int = 16):
    """A bf16 ModelRunner with random weights of `shape` and a pool for `max_ctx` tokens.

    Norm weights are 1 and embeddings N(0, 1) so that logits are peaked (greedy tests then meet
    few near-ties); matrices N(0, 0.05) so that layers actually mix tokens.
    """
    from transformers import LlamaConfig

    from lsrt.runtime.config import ModelConfig, rope_inv_freq
    from lsrt.runtime.model import DecoderModel
    from lsrt.runtime.runner import DTYPES, ModelRunner, RunnerConfig

    cfg = ModelConfig.from_hf(LlamaConfig(**SHAPES[shape], rms_norm_eps=1e-5))
    with torch.device("meta"):
        model = DecoderModel(cfg)
    model.to_empty(device=device)
    model.to(DTYPES[dtype])
    model.inv_freq = rope_inv_freq(cfg).to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.data.fill_(1.0)
        else:
            p.data.normal_(0, 1.0 if name in ("embed", "lm_head_w") else 0.05, generator=gen)
    kv_tok = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * model.embed.element_size()
    budget_mb = max(16, ((max_ctx + 2048) * kv_tok) >> 20)
    return ModelRunner(model.eval(), RunnerConfig(device=device, dtype=dtype,
                                                  kv_budget_mb=budget_mb, attention=attention,
                                                  block_size=block_size))


def wall_ms(fn, repeats: int) -> float:
    """Median wall-clock ms of `fn()` + synchronize, after 3 warm-up calls."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - t) * 1e3)
    return statistics.median(out)


def decode_loop_tps(runner, seq, tokens: int) -> float:
    """Tokens/s of plain greedy decoding through Engine.step (verify, argmax, commit)."""
    from lsrt.runtime.sampling import SamplingParams
    from lsrt.runtime.spec.engine import Engine

    engine = Engine(runner, None, ())
    params = SamplingParams(max_tokens=tokens)
    start = seq.num_tokens
    history = [1] * (start + 1)
    engine.step(seq, history, None, params, None, 0)  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(tokens):
        emitted, _ = engine.step(seq, history, None, params, None, 0)
        history.extend(emitted)
    torch.cuda.synchronize()
    seq.truncate(start)
    return tokens / (time.perf_counter() - t)


def model_rows(shape: str, repeats: int, bw: float, elementwise: list[str],
               block_size: int = 16) -> list[str]:
    from lsrt.kernels.elementwise import get_elementwise_ops

    eager = build_random_runner(shape, max_ctx=max(PLAN[shape][0]), block_size=block_size)
    eager.pool.k.normal_(0, 1)
    eager.pool.v.normal_(0, 1)
    rows = []
    for ops in elementwise:
        eager.model.ops = get_elementwise_ops(ops, "cuda")
        rows += ops_rows(eager, shape, repeats, bw, ops)
    del eager
    torch.cuda.empty_cache()
    return rows


def ops_rows(eager, shape: str, repeats: int, bw: float, ops: str) -> list[str]:
    from lsrt.runtime.cuda_graphs import GraphConfig, GraphRunner
    from lsrt.runtime.spec.tree import DraftTree

    contexts, trees, sizes = PLAN[shape]
    t0 = time.perf_counter()
    graphs = GraphRunner(eager, GraphConfig(sizes=sizes))
    capture_s = time.perf_counter() - t0
    print(f"{shape} ({ops} elementwise): captured sizes {sizes} in {capture_s:.1f} s",
          flush=True)
    weight_bytes = sum(p.numel() * p.element_size() for p in eager.model.parameters())
    cfg = eager.cfg
    kv_tok = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2
    rows = []
    for ctx in contexts:
        seq = eager.new_sequence()
        seq.reserve(ctx + 64)
        seq.num_tokens = ctx  # random KV stands in for a prefilled context
        floor = (weight_bytes + ctx * kv_tok) / bw * 1e3
        for n in (1, *trees):
            tree = (DraftTree.chain(7, []) if n == 1 else
                    DraftTree.from_paths(7, [[i + 1] for i in range(n - 1)]))
            e_ms = wall_ms(lambda: eager.verify(seq, tree), repeats)
            g_ms = wall_ms(lambda: graphs.verify(seq, tree), repeats)
            step = "decode" if n == 1 else f"verify {n}"
            extra = ""
            if n == 1 and shape == "smollm2":
                e_tps, g_tps = decode_loop_tps(eager, seq, 64), decode_loop_tps(graphs, seq, 64)
                extra = f" {e_tps:.1f} / {g_tps:.1f}"
            rows.append(f"| {shape} | {ops} | {ctx} | {step} | {e_ms:.2f} | {g_ms:.2f} | "
                        f"{e_ms / g_ms:.2f}x | {floor:.2f} | {g_ms / floor:.2f}x |{extra} |")
            print(rows[-1], flush=True)
        seq.release()
    del graphs
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(PLAN), choices=list(PLAN))
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default="")
    ap.add_argument("--elementwise", nargs="+", default=["torch", "triton"],
                    choices=["torch", "triton"])
    ap.add_argument("--block-size", type=int, default=16, help="tokens per KV page")
    ap.add_argument("--hf", action="store_true",
                    help="also transformers' generate on the Llama-3.1-8B shape, same contexts")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu_graphs.py needs a CUDA device")
        return
    bw = copy_bandwidth("cuda")
    lines = [f"{torch.cuda.get_device_name()}, copy bandwidth {bw / 1e12:.2f} TB/s, bf16, "
             f"attention triton, {args.block_size}-token pages, wall-clock median of "
             f"{args.repeats}",
             "| model | elementwise | context | step | eager ms | graph ms | speedup | floor ms | "
             "graph/floor | decode loop tok/s eager / graph |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    print("\n".join(lines), flush=True)
    for shape in args.models:
        lines += model_rows(shape, args.repeats, bw, args.elementwise, args.block_size)
    if args.hf:
        lines += hf_rows(argparse.Namespace(shape="llama3-8b", contexts=PLAN["llama3-8b"][0],
                                            device="cuda"))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
