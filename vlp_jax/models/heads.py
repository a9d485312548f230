"""Heads on top of the towers: projection to the joint space, the learnable contrastive temperature, BriVL's
token-pooling head and the token-prediction heads of masked language / vision modelling."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp_jax.models.layers import Dtype, Encoder, dense, layer_norm, partitioned


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


class Temperature(nn.Module):
    """1/τ: a learnable clipped scale (CLIP-style) starting at 1/`temperature`, or that fixed constant (MoCo)."""

    temperature: float
    learnable: bool
    max_logit_scale: float

    @nn.compact
    def __call__(self) -> jax.Array:
        if self.learnable:
            return LogitScale(self.temperature, self.max_logit_scale, name="scale")()
        return jnp.float32(1.0 / self.temperature)


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


class TokenPoolingHead(nn.Module):
    """BriVL's per-tower head [code]: a small transformer over a tower's token (region/patch or word) features,
    masked mean pooling, then a 2-layer MLP into the joint space, L2-normalised.

    tokens [b, t, w], mask bool [b, t] (None = all valid) -> unit-norm [b, features].
    """

    features: int
    depth: int
    heads: int
    mlp_dim: int
    hidden: int
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, tokens: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        x = Encoder(self.depth, self.heads, self.mlp_dim, self.dtype, self.remat, name="encoder")(tokens, mask)
        weights = jnp.ones(x.shape[:2], x.dtype) if mask is None else mask.astype(x.dtype)
        pooled = (x * weights[..., None]).sum(axis=1) / jnp.maximum(weights.sum(axis=1, keepdims=True), 1.0)
        hidden = nn.gelu(_xavier_dense(self.hidden, ("embed", "mlp"), self.dtype, "fc1")(pooled))
        out = _xavier_dense(self.features, ("mlp", "joint"), self.dtype, "fc2")(hidden)
        return l2_normalize(out.astype(jnp.float32))


class TokenPredictionHead(nn.Module):
    """Predicts a class per token from the token features fused with the other stream's global feature.

    COTS's MLM (word ids) and MVM (visual-tokenizer codes) heads [ours]: no cross-attention, only the paired
    global feature. fusion='add' adds a projection of it to every token; 'concat' concatenates the projection to
    every token and mixes with a dense layer. Then GELU + LayerNorm and a linear classifier.
    tokens [b, t, w], condition [b, c] -> logits float32 [b, t, num_classes].
    """

    num_classes: int
    fusion: str = "add"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, condition: jax.Array) -> jax.Array:
        width = tokens.shape[-1]
        cond = _xavier_dense(width, (None, "embed"), self.dtype, "condition")(condition)[:, None, :]
        if self.fusion == "add":
            x = tokens + cond
        elif self.fusion == "concat":
            both = jnp.concatenate([tokens, jnp.broadcast_to(cond, tokens.shape)], axis=-1)
            x = _xavier_dense(width, (None, "embed"), self.dtype, "fuse")(both)
        else:
            raise ValueError(f"config.method fusion={self.fusion!r}; use 'add' or 'concat'")
        x = layer_norm(self.dtype, "ln")(nn.gelu(_xavier_dense(width, (None, "embed"), self.dtype, "transform")(x)))
        logits = _xavier_dense(self.num_classes, ("embed", "vocab"), self.dtype, "classifier")(x)
        return logits.astype(jnp.float32)



def _xavier_dense(features: int, names: tuple[str | None, str | None], dtype: Dtype, name: str) -> nn.Dense:
    return dense(features, names, dtype, name, nn.initializers.xavier_uniform())
