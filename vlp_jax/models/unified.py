"""CMAL's cross-modal associative prompt and unified semantic encoder: one transformer over [text tokens ; regions].

The prompt is built slot by slot: a text slot holds its token feature, a region slot its pooled feature, each
through its own input adapter; a swapped slot instead holds its anchor partner's feature from the other modality
through a swap adapter (word slot <- region, region slot <- word). Modality-type embeddings and positions (a
learned text position, a region's box geometry) are added after the swap, so a swapped slot keeps the place and
the modality of the slot it fills.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp_jax.models.layers import Dtype, Encoder, constrain, dense, layer_norm, partitioned


class UnifiedEncoder(nn.Module):
    """text [b, L, wt], text_mask [b, L], regions [b, R, wv], region_boxes [b, R, 4], region_mask [b, R]; optional
    swap: text_swap [b, L, wv] (region features for the word slots in `text_swapped` bool [b, L]) and region_swap
    [b, R, wt] (word features for the slots in `region_swapped` [b, R]). -> hidden [b, L + R, width]."""

    width: int
    depth: int
    heads: int
    mlp_dim: int
    max_len: int
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, text, text_mask, regions, region_boxes, region_mask, text_swap=None, text_swapped=None,
                 region_swap=None, region_swapped=None) -> jax.Array:
        def adapter(name):
            return dense(self.width, (None, "embed"), self.dtype, name)

        text_slots = adapter("text_in")(text)
        region_slots = adapter("region_in")(regions)
        if text_swap is not None:
            text_slots = jnp.where(text_swapped[..., None], adapter("region_to_text")(text_swap), text_slots)
            region_slots = jnp.where(region_swapped[..., None], adapter("text_to_region")(region_swap), region_slots)
        types = self.param("type_embedding", partitioned(nn.initializers.normal(0.02), (None, "embed")),
                           (2, self.width))
        positions = self.param("text_position", partitioned(nn.initializers.normal(0.02), ("length", "embed")),
                               (self.max_len, self.width))
        x0, y0, x1, y1 = jnp.moveaxis(region_boxes.astype(jnp.float32), -1, 0)
        geometry = jnp.stack([x0, y0, x1, y1, (x1 - x0) * (y1 - y0)], axis=-1)  # [b, R, 5]
        text_slots = text_slots + (types[0] + positions[: text.shape[1]]).astype(self.dtype)
        region_slots = region_slots + types[1].astype(self.dtype) + adapter("box_position")(geometry)
        x = jnp.concatenate([layer_norm(self.dtype, "ln_text")(text_slots),
                             layer_norm(self.dtype, "ln_regions")(region_slots)], axis=1)
        x = constrain(x, ("batch", "act_len", "act_embed"))
        mask = jnp.concatenate([text_mask, region_mask], axis=1)
        return Encoder(self.depth, self.heads, self.mlp_dim, self.dtype, self.remat, name="encoder")(x, mask)
