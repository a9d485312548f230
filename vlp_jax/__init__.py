"""vlp_jax: vision-language pre-training in JAX/Flax (see README.md)."""

from vlp_jax import memory as _memory

_memory.keep_host_buffers()  # before XLA's threads allocate: the step's buffers are reused, not mapped afresh
