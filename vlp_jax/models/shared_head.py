"""COOKIE's weight-sharing head: one transformer on top of both towers, so both paths attend to the same semantics.

[paper] a weight-sharing transformer is built on top of the visual and the textual encoder. [ours] everything
below: a per-modality linear adapter maps each tower's token features to the head width, a learned modality-type
embedding marks which tower the tokens came from, then `depth` pre-LN transformer blocks — one parameter set,
applied to the image tokens and to the text tokens in two separate calls (no cross-stream attention, so retrieval
stays two-stream) — pooling, and one shared projection into the joint space, L2-normalised.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp_jax.models.heads import Projection
from vlp_jax.models.layers import Dtype, Encoder, constrain, dense, partitioned

MODALITIES = ("image", "text")  # rows of the modality-type embedding
POOLS = ("mean", "cls")


class SharedHead(nn.Module):
    """tokens [b, t, tower width] of one modality (+ mask bool [b, t], None = all valid) -> unit-norm [b, features].

    pool 'mean': the mean of the head's outputs over valid tokens; 'cls': the output at a learned head token
    prepended to every sequence (one token for both modalities, told apart by the modality embedding).
    """

    width: int
    depth: int
    heads: int
    mlp_dim: int
    features: int  # the joint embedding width
    pool: str = "mean"
    dtype: Dtype = jnp.float32
    remat: bool = False

    def setup(self):
        if self.pool not in POOLS:
            raise ValueError(f"config.method.head.pool={self.pool!r}; use one of {', '.join(POOLS)}")
        self.image_adapter = dense(self.width, (None, "embed"), self.dtype, None)
        self.text_adapter = dense(self.width, (None, "embed"), self.dtype, None)
        self.modality_embedding = self.param(
            "modality_embedding", partitioned(nn.initializers.normal(stddev=0.02), (None, "embed")),
            (len(MODALITIES), self.width))
        if self.pool == "cls":
            self.cls = self.param("cls", partitioned(nn.initializers.normal(stddev=0.02), ("embed",)), (self.width,))
        self.encoder = Encoder(self.depth, self.heads, self.mlp_dim, self.dtype, self.remat)
        self.projection = Projection(self.features, self.dtype)

    def __call__(self, tokens: jax.Array, modality: str, mask: jax.Array | None = None) -> jax.Array:
        if modality not in MODALITIES:
            raise ValueError(f"modality {modality!r}; use one of {', '.join(MODALITIES)}")
        adapter = self.image_adapter if modality == "image" else self.text_adapter
        x = adapter(tokens.astype(self.dtype))  # [b, t, width]
        batch = x.shape[0]
        mask = jnp.ones(x.shape[:2], jnp.bool_) if mask is None else mask
        if self.pool == "cls":
            cls = jnp.broadcast_to(self.cls.astype(x.dtype), (batch, 1, self.width))
            x = jnp.concatenate([cls, x], axis=1)
            mask = jnp.concatenate([jnp.ones((batch, 1), jnp.bool_), mask], axis=1)
        x = x + self.modality_embedding[MODALITIES.index(modality)].astype(x.dtype)
        x = constrain(x, ("batch", "act_len", "act_embed"))
        x = self.encoder(x, mask)
        if self.pool == "cls":
            pooled = x[:, 0]
        else:
            weights = mask[..., None].astype(x.dtype)
            pooled = (x * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1.0)
        return self.projection(pooled)
