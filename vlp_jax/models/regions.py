"""Region features for CMAL: the image tower's patch-token map pooled over each box (RoI-align style), plus the
whole image; a record without boxes uses its patch tokens as regions.

RoI-align samples an s × s grid of points inside a box and averages the bilinearly interpolated map there. The
bilinear weights are separable, so the average over the grid is the outer product of the averaged 1-D weights:
pooling is one einsum with weights [b, k, g, g], no gather.
"""

import jax
import jax.numpy as jnp
import numpy as np

WHOLE_IMAGE = np.array([0.0, 0.0, 1.0, 1.0], np.float32)  # region slot 0 (numpy: import starts no backend)


def axis_weights(low: jax.Array, high: jax.Array, grid: int, samples: int) -> jax.Array:
    """Mean bilinear weights of `samples` evenly spaced points in [low, high) (image fractions) over the `grid`
    patch centres of one axis: [..., grid]. Points beyond the outer patch centres take the edge patch."""
    fractions = (jnp.arange(samples) + 0.5) / samples  # [s]
    points = low[..., None] + fractions * (high - low)[..., None]  # [..., s] image fractions
    coords = jnp.clip(points * grid - 0.5, 0.0, grid - 1.0)  # patch-centre coordinates
    weights = jnp.maximum(0.0, 1.0 - jnp.abs(coords[..., None] - jnp.arange(grid)))  # [..., s, grid]
    return weights.mean(axis=-2)


def roi_pool(patch_map: jax.Array, boxes: jax.Array, samples: int) -> jax.Array:
    """patch_map [b, g, g, d] (row = y), boxes [b, k, 4] (x0, y0, x1, y1 in [0, 1]) -> pooled [b, k, d]."""
    grid = patch_map.shape[1]
    wx = axis_weights(boxes[..., 0], boxes[..., 2], grid, samples)  # [b, k, g]
    wy = axis_weights(boxes[..., 1], boxes[..., 3], grid, samples)  # [b, k, g]
    return jnp.einsum("bky,bkx,byxd->bkd", wy, wx, patch_map.astype(jnp.float32)).astype(patch_map.dtype)


def patch_boxes(grid: int) -> jax.Array:
    """The box of every patch, row-major: [grid², 4]."""
    edges = jnp.arange(grid) / grid
    y0, x0 = jnp.meshgrid(edges, edges, indexing="ij")
    x0, y0 = x0.reshape(-1), y0.reshape(-1)
    return jnp.stack([x0, y0, x0 + 1 / grid, y0 + 1 / grid], axis=-1)


def region_slots(max_boxes: int, grid: int, patch_fallback: bool) -> int:
    """Regions per example: the whole image, then max(max_boxes, patches) slots (max_boxes without fallback)."""
    return 1 + (max(max_boxes, grid * grid) if patch_fallback else max_boxes)


def regions(patch_tokens: jax.Array, boxes: jax.Array, box_mask: jax.Array, samples: int,
            patch_fallback: bool) -> dict[str, jax.Array]:
    """The region sequence of each example from its patch tokens [b, g², d] (row-major, no CLS).

    Slot 0 is the whole image; slots 1..k the record's boxes [b, k, 4] where `box_mask` [b, k] holds, else (a row
    with no box and `patch_fallback`) slots 1..g² are the patch tokens. Returns {"features" [b, R, d],
    "boxes" [b, R, 4] (each slot's box, for its position embedding), "mask" bool [b, R]}."""
    batch, patches, width = patch_tokens.shape
    grid = int(round(patches**0.5))
    patch_map = patch_tokens.reshape(batch, grid, grid, width)
    whole = jnp.broadcast_to(WHOLE_IMAGE, (batch, 1, 4))
    slot_boxes = jnp.concatenate([whole, boxes.astype(jnp.float32)], axis=1)  # [b, 1 + k, 4]
    features = roi_pool(patch_map, slot_boxes, samples)
    mask = jnp.concatenate([jnp.ones((batch, 1), bool), box_mask], axis=1)
    if not patch_fallback:
        return {"features": features, "boxes": slot_boxes, "mask": mask}
    slots = region_slots(boxes.shape[1], grid, True) - 1

    def padded(x, rows):  # [b, rows, ...] -> [b, slots, ...] with zero rows
        return jnp.pad(x, [(0, 0), (0, slots - rows)] + [(0, 0)] * (x.ndim - 2))

    has_boxes = box_mask.any(axis=1)  # [b]

    def pick(from_boxes, from_patches):  # per row: its boxes if it has any, else its patches
        return jnp.where(has_boxes.reshape((batch,) + (1,) * (from_boxes.ndim - 1)), from_boxes, from_patches)

    grid_boxes = jnp.broadcast_to(patch_boxes(grid), (batch, patches, 4))
    return {
        "features": jnp.concatenate([features[:, :1], pick(padded(features[:, 1:], boxes.shape[1]),
                                                           padded(patch_tokens, patches))], axis=1),
        "boxes": jnp.concatenate([whole, pick(padded(slot_boxes[:, 1:], boxes.shape[1]),
                                              padded(grid_boxes, patches))], axis=1),
        "mask": jnp.concatenate([mask[:, :1], pick(padded(box_mask, boxes.shape[1]),
                                                   padded(jnp.ones((batch, patches), bool), patches))], axis=1),
    }
