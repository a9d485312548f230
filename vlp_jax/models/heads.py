"""Heads on top of the towers: projection to the joint space and the learnable contrastive temperature."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp_jax.models.layers import Dtype, partitioned


class Projection(nn.Module):
    """Linear map from a tower's width to the joint embedding space (no bias), then L2 normalisation."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.Dense(
            self.features,
            use_bias=False,
            dtype=self.dtype,
            kernel_init=partitioned(nn.initializers.lecun_normal(), ("embed", "joint")),
            name="dense",
        )(x)
        return l2_normalize(y.astype(jnp.float32))


class LogitScale(nn.Module):
    """Learnable log of the inverse temperature, initialised at log(1/τ₀); returns the clipped scale exp(·)."""

    temperature_init: float
    max_scale: float

    @nn.compact
    def __call__(self) -> jax.Array:
        log_scale = self.param("log_scale", nn.initializers.constant(jnp.log(1.0 / self.temperature_init)), ())
        return jnp.minimum(jnp.exp(log_scale), self.max_scale)


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))
