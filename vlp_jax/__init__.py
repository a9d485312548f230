"""vlp_jax: vision-language pre-training in JAX/Flax (see README.md)."""

from vlp_jax import host_memory as _host_memory

_host_memory.keep_host_buffers()  # before XLA's threads allocate: the step's buffers are reused, not mapped afresh
