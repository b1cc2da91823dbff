"""Random inputs for kernel tests and benchmarks: tree masks, paged caches, the dense oracle.

Shared by tests/unit/kernels and bench/ so that both build cases the same way.
"""

from __future__ import annotations

import torch

from lsrt.kernels.attention.reference import dense_masked_attention, gather_prefix


def tree_mask(n: int, gen: torch.Generator) -> torch.Tensor:
    """Ancestor-or-self mask [n, n] of a random tree given by parents (parent[i] < i)."""
    mask = torch.eye(n, dtype=torch.bool)
    for i in range(1, n):
        parent = int(torch.randint(0, i, (1,), generator=gen))
        mask[i] |= mask[parent]
    return mask


def causal_mask(n: int) -> torch.Tensor:
    """Lower-triangular [n, n] mask of a prefill chunk."""
    return torch.ones(n, n, dtype=torch.bool).tril()


def paged_case(*, n: int, hkv: int, group: int, d: int, prefix_len: int, block_size: int,
               gen: torch.Generator, dtype: torch.dtype = torch.float32, device: str = "cpu",
               spare_blocks: int = 3) -> dict:
    """A paged cache with the prefix in shuffled blocks, plus new tokens' q/k/v."""
    nblocks = -(-prefix_len // block_size) + spare_blocks
    slots = nblocks * block_size

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    table = torch.randperm(nblocks, generator=gen)[: max(1, -(-prefix_len // block_size))]
    return dict(
        q=rnd(n, hkv * group, d), k_cache_layer=rnd(hkv, slots, d), v_cache_layer=rnd(hkv, slots, d),
        block_table=table.to(device=device, dtype=torch.int32), prefix_len=prefix_len,
        k_new=rnd(n, hkv, d), v_new=rnd(n, hkv, d), scale=d ** -0.5, block_size=block_size,
    )


def dense_oracle(case: dict, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The naive dense-mask attention over prefix + new keys (independent of the hybrid split)."""
    kp = gather_prefix(case["k_cache_layer"], case["block_table"], case["prefix_len"],
                       case["block_size"])
    vp = gather_prefix(case["v_cache_layer"], case["block_table"], case["prefix_len"],
                       case["block_size"])
    n = case["q"].shape[0]
    full = torch.cat([torch.ones(n, case["prefix_len"], dtype=torch.bool), mask], dim=1)
    k = torch.cat([kp, case["k_new"].transpose(0, 1)], dim=1)
    v = torch.cat([vp, case["v_new"].transpose(0, 1)], dim=1)
    return dense_masked_attention(case["q"], k, v, full.to(k.device), case["scale"])
