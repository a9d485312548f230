"""Two independent towers (ViT + text transformer) each with a projection into one L2-normalised joint space.

Every seed method (CLIP, BriVL, COTS, COOKIE, CMAL) starts from this pair; methods add their heads around it.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlp_jax.models.heads import Projection
from vlp_jax.models.text import TextTransformer
from vlp_jax.models.vit import VisionTransformer


class DualEncoder(nn.Module):
    """Image tower + text tower + projections; no interaction between the streams."""

    config: ml_collections.ConfigDict  # config.model

    def setup(self):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        self.image_tower = VisionTransformer(
            image_size=cfg.image.image_size, patch_size=cfg.image.patch_size, width=cfg.image.width,
            depth=cfg.image.depth, heads=cfg.image.heads, mlp_dim=cfg.image.mlp_dim, pool=cfg.image.pool,
            dtype=dtype, remat=cfg.remat,
        )
        self.text_tower = TextTransformer(
            vocab_size=cfg.text.vocab_size, max_len=cfg.text.max_len, width=cfg.text.width,
            depth=cfg.text.depth, heads=cfg.text.heads, mlp_dim=cfg.text.mlp_dim, pool=cfg.text.pool,
            dtype=dtype, remat=cfg.remat,
        )
        self.image_projection = Projection(cfg.embed_dim, dtype)
        self.text_projection = Projection(cfg.embed_dim, dtype)

    def encode_image(self, images: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        pooled, extras = self.image_tower(images)
        return self.image_projection(pooled), extras  # [b, embed_dim], unit norm

    def encode_text(self, tokens: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        pooled, extras = self.text_tower(tokens)
        return self.text_projection(pooled), extras  # [b, embed_dim], unit norm

    def __call__(self, images: jax.Array, tokens: jax.Array) -> dict[str, jax.Array]:
        image, _ = self.encode_image(images)
        text, _ = self.encode_text(tokens)
        return {"image": image, "text": text}
