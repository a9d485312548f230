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
        self.image_tower = image_tower(cfg)
        self.text_tower = text_tower(cfg)
        dtype = jnp.dtype(cfg.dtype)
        self.image_projection = Projection(cfg.embed_dim, dtype)
        self.text_projection = Projection(cfg.embed_dim, dtype)

    def encode_image(
        self, images: jax.Array, patch_mask: jax.Array | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """-> (unit-norm [b, embed_dim], {"tokens", "pooled"}); `patch_mask` masks patches (see the ViT)."""
        pooled, extras = self.image_tower(images, patch_mask)
        return self.image_projection(pooled), {**extras, "pooled": pooled}

    def encode_text(
        self, tokens: jax.Array, token_mask: jax.Array | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """-> (unit-norm [b, embed_dim], {"tokens", "mask", "pooled"}); `token_mask` masks tokens."""
        pooled, extras = self.text_tower(tokens, token_mask)
        return self.text_projection(pooled), {**extras, "pooled": pooled}

    def __call__(self, images: jax.Array, tokens: jax.Array) -> dict[str, jax.Array]:
        image, _ = self.encode_image(images)
        text, _ = self.encode_text(tokens)
        return {"image": image, "text": text}


def image_tower(cfg: ml_collections.ConfigDict) -> VisionTransformer:
    """The ViT described by config.model."""
    return VisionTransformer(
        image_size=cfg.image.image_size, patch_size=cfg.image.patch_size, width=cfg.image.width,
        depth=cfg.image.depth, heads=cfg.image.heads, mlp_dim=cfg.image.mlp_dim, pool=cfg.image.pool,
        dtype=jnp.dtype(cfg.dtype), remat=cfg.remat, pre_norm=cfg.image.get("pre_norm", False),
        scan=cfg.get("scan_layers", False), attention=cfg.get("attention", "xla"),
        activation=cfg.get("activation", "gelu"), layer_norm_eps=cfg.get("layer_norm_eps", 1e-6),
    )


def text_tower(cfg: ml_collections.ConfigDict) -> TextTransformer:
    """The text transformer described by config.model."""
    return TextTransformer(
        vocab_size=cfg.text.vocab_size, max_len=cfg.text.max_len, width=cfg.text.width,
        depth=cfg.text.depth, heads=cfg.text.heads, mlp_dim=cfg.text.mlp_dim, pool=cfg.text.pool,
        dtype=jnp.dtype(cfg.dtype), remat=cfg.remat, causal=cfg.text.get("causal", False),
        activation=cfg.get("activation", "gelu"), layer_norm_eps=cfg.get("layer_norm_eps", 1e-6),
        scan=cfg.get("scan_layers", False), attention=cfg.get("attention", "xla"),
    )
