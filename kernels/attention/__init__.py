"""Attention over the paged KV pool: plain-torch references and Triton kernels.

`reference` runs anywhere (CPU or GPU, float32 or bf16); `triton_tree` and `triton_prefill` import
Triton when they are imported, so import them only where `lsrt.kernels.triton_available()` is true.
"""
