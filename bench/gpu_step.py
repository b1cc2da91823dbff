"""Whole-model step latency on a GPU at long context, random weights with real shapes.

    python bench/gpu_step.py [--shape llama3-8b] [--contexts 32768 131072] [--tree 16]
                             [--attention triton sdpa] [--repeats 20] [--hf]

For each context: one plain decode step (1 token) and one verify step (a tree of --tree nodes)
through lsrt's runner, beside the HBM floor (weight bytes + KV bytes) / measured copy bandwidth,
and (with --hf) transformers' `generate` per-token latency on the same shape, all in this run.
Medians of --repeats timed runs (CUDA events) after warm-up. The KV pool is filled with random
values; no prefill is needed to time a step.
"""

from __future__ import annotations

import argparse
import statistics

import torch

SHAPES = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      max_position_embeddings=131072 + 1024, rope_theta=500000.0),
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                 rope_theta=10000.0),  # CPU smoke test of this script
}


def hf_config(shape: str):
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[shape], rms_norm_eps=1e-5, tie_word_embeddings=False)


def copy_bandwidth(device: str) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    if device == "cpu":
        return 1e10
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    times = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        y.copy_(x)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del x, y
    return 2 * (1 << 30) / statistics.median(times)


def timed(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    if not torch.cuda.is_available():
        import time

        out = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1e3)
        return statistics.median(out)
    torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b))
    return statistics.median(out)


def once(fn) -> float:
    """Milliseconds of one call (synchronised)."""
    import time

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3


def build_runner(shape: str, attention: str, max_ctx: int, device: str):
    from lsrt.runtime.config import ModelConfig, rope_inv_freq
    from lsrt.runtime.model import DecoderModel
    from lsrt.runtime.runner import ModelRunner, RunnerConfig

    cfg = ModelConfig.from_hf(hf_config(shape))
    with torch.device("meta"):
        model = DecoderModel(cfg)
    model.to_empty(device=device)
    model.to(torch.bfloat16)
    model.inv_freq = rope_inv_freq(cfg).to(device)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    kv_bytes_per_tok = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2
    budget = (max_ctx + 4096) * kv_bytes_per_tok
    runner = ModelRunner(model, RunnerConfig(device=device, dtype="bfloat16",
                                             kv_budget_mb=budget >> 20, attention=attention))
    runner.pool.k.normal_(0, 1)
    runner.pool.v.normal_(0, 1)
    return runner, cfg, kv_bytes_per_tok


def lsrt_rows(args, bw: float) -> list[str]:
    from lsrt.runtime.spec.tree import DraftTree

    rows = []
    for attention in args.attention:
        runner, cfg, kv_tok = build_runner(args.shape, attention, max(args.contexts),
                                           args.device)
        weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
        for ctx in args.contexts:
            seq = runner.new_sequence()
            seq.reserve(ctx + args.tree + 1)
            seq.num_tokens = ctx  # random KV stands in for a prefilled context
            one = DraftTree.chain(7, [])
            tree = DraftTree.from_paths(7, [[i + 1] * 1 for i in range(args.tree - 1)])
            decode_ms = timed(lambda: runner.verify(seq, one), args.repeats)
            verify_ms = timed(lambda: runner.verify(seq, tree), args.repeats)
            floor_ms = (weight_bytes + ctx * kv_tok) / bw * 1e3
            rows.append(f"| {attention} | {ctx} | {decode_ms:.2f} | {floor_ms:.2f} | "
                        f"{decode_ms / floor_ms:.2f}x | {verify_ms:.2f} | "
                        f"{verify_ms / decode_ms:.2f}x |")
            print(rows[-1], flush=True)
            seq.release()
            del seq
        del runner
        import gc

        gc.collect()
        torch.cuda.empty_cache()
    return rows


def hf_rows(args) -> list[str]:
    from transformers import AutoModelForCausalLM

    rows = []
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(hf_config(args.shape), dtype=torch.bfloat16,
                                                 attn_implementation="sdpa").eval()
    for ctx in args.contexts:
        ids = torch.randint(0, 500, (1, ctx), device=args.device)
        with torch.no_grad():
            def gen(n):
                return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                      pad_token_id=0)
            try:
                gen(1)  # warm-up at this length (a full prefill each: no repeats at 128K)
                t1 = once(lambda: gen(1))
                t9 = once(lambda: gen(9))
                result = f"{(t9 - t1) / 8:.2f} ms/token"
            except torch.OutOfMemoryError as err:  # e.g. a materialised mask at 128K
                result = f"out of memory ({str(err).splitlines()[0][:60]})"
        rows.append(f"| transformers generate | {ctx} | {result} |")
        print(rows[-1], flush=True)
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--tree", type=int, default=16)
    ap.add_argument("--attention", nargs="+", default=["triton", "sdpa"])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--hf", action="store_true")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/gpu_step.py needs a CUDA device (or --device cpu --shape tiny)")
        return
    bw = copy_bandwidth(args.device)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"{name}, copy bandwidth {bw / 1e12:.2f} TB/s, "
          f"shape {args.shape}, bf16, tree {args.tree}, median of {args.repeats}")
    print("| attention | context | decode step ms | floor ms | decode/floor | "
          f"verify {args.tree} ms | verify/decode |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    lsrt_rows(args, bw)
    if args.hf:
        hf_rows(args)


if __name__ == "__main__":
    main()
