"""Vision Transformer tower: patchify, learned position embedding, pre-LN encoder, CLS or mean pooling."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp_jax.models.layers import Dtype, Encoder, MaskEmbedding, constrain, layer_norm, partitioned


class VisionTransformer(nn.Module):
    """images uint8/float [b, h, w, 3] -> (pooled [b, width], {"tokens": [b, t, width]}).

    `patch_mask` bool [b, patches] (row-major over the patch grid) replaces those patch embeddings with a learned
    mask embedding before the position embedding (masked vision modelling); the parameter exists only in models
    initialised with a mask. `pre_norm` adds a LayerNorm after the position embedding (CLIP's ln_pre).
    """

    image_size: int
    patch_size: int
    width: int
    depth: int
    heads: int
    mlp_dim: int
    pool: str = "cls"
    dtype: Dtype = jnp.float32
    remat: bool | str = False
    scan: bool = False  # the encoder's blocks as one nn.scan (layers.Encoder)
    attention: str = "xla"  # layers.ATTENTION
    pre_norm: bool = False
    activation: str = "gelu"
    layer_norm_eps: float = 1e-6

    @nn.compact
    def __call__(
        self, images: jax.Array, patch_mask: jax.Array | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        if images.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(
                f"images are {images.shape[1]}x{images.shape[2]} but config.model.image.image_size is "
                f"{self.image_size}; resize the data or change the config"
            )
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"config.model.image.pool={self.pool!r}; use 'cls' or 'mean'")
        x = normalize_images(images).astype(self.dtype)
        x = nn.Conv(
            self.width,
            (self.patch_size, self.patch_size),
            strides=(self.patch_size, self.patch_size),
            padding="VALID",
            dtype=self.dtype,
            kernel_init=partitioned(nn.initializers.lecun_normal(), (None, None, None, "embed")),
            bias_init=partitioned(nn.initializers.zeros, ("embed",)),
            name="patch_embed",
        )(x)
        batch = x.shape[0]
        x = x.reshape(batch, -1, self.width)  # [b, patches, width]
        if patch_mask is not None:
            x = MaskEmbedding(name="mask_embedding")(x, patch_mask)
        if self.pool == "cls":
            cls = self.param("cls", partitioned(nn.initializers.zeros, (None, None, "embed")), (1, 1, self.width))
            x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, self.width)).astype(self.dtype), x], axis=1)
        pos = self.param(
            "pos_embedding",
            partitioned(nn.initializers.normal(stddev=0.02), (None, "length", "embed")),
            (1, x.shape[1], self.width),
        )
        x = constrain(x + pos.astype(self.dtype), ("batch", "act_len", "act_embed"))
        if self.pre_norm:
            x = layer_norm(self.dtype, "ln_pre", self.layer_norm_eps)(x)
        x = Encoder(self.depth, self.heads, self.mlp_dim, self.dtype, self.remat, self.activation, self.layer_norm_eps,
                    self.scan, attention=self.attention, name="encoder")(x)
        pooled = x[:, 0] if self.pool == "cls" else x.mean(axis=1)
        return pooled, {"tokens": x}


def normalize_images(images: jax.Array) -> jax.Array:
    """uint8 pixels -> floats in [-1, 1]; float inputs are assumed already normalised."""
    if jnp.issubdtype(images.dtype, jnp.integer):
        return images.astype(jnp.float32) / 127.5 - 1.0
    return images
