"""lsrt runtime: the model runner, paged KV cache, generation and speculative decoding."""
