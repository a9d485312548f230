"""CMAL pieces: RoI pooling against a direct bilinear computation, the region sequence (boxes, whole image, patch
fallback), hard-negative mining equal on every mesh, and the config's checked options."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import cmal
from vlp_jax import methods, parallel
from vlp_jax.methods.cmal import mine_hard_negatives
from vlp_jax.models import regions


def bilinear(patch_map: np.ndarray, x: float, y: float) -> np.ndarray:
    """The map [g, g, d] at image fractions (x, y): patch centres at (i + 0.5) / g, clamped at the edges."""
    grid = patch_map.shape[0]
    u, v = np.clip(x * grid - 0.5, 0, grid - 1), np.clip(y * grid - 0.5, 0, grid - 1)
    u0, v0 = int(np.floor(u)), int(np.floor(v))
    u1, v1 = min(u0 + 1, grid - 1), min(v0 + 1, grid - 1)
    du, dv = u - u0, v - v0
    return ((1 - du) * (1 - dv) * patch_map[v0, u0] + du * (1 - dv) * patch_map[v0, u1]
            + (1 - du) * dv * patch_map[v1, u0] + du * dv * patch_map[v1, u1])


def direct_roi(patch_map: np.ndarray, box, samples: int) -> np.ndarray:
    """RoI-align by hand: the mean of the map at samples × samples evenly spaced points inside the box."""
    x0, y0, x1, y1 = box
    points = [(x0 + (i + 0.5) / samples * (x1 - x0), y0 + (j + 0.5) / samples * (y1 - y0))
              for i in range(samples) for j in range(samples)]
    return np.mean([bilinear(patch_map, x, y) for x, y in points], axis=0)


def test_roi_pooling_matches_the_direct_bilinear_average():
    rng = np.random.default_rng(0)
    patch_map = rng.normal(size=(2, 4, 4, 5)).astype(np.float32)
    boxes = np.array([[[0.1, 0.2, 0.6, 0.9], [0.0, 0.0, 1.0, 1.0], [0.55, 0.05, 0.7, 0.3]],
                      [[0.3, 0.3, 0.31, 0.35], [0.0, 0.5, 0.5, 1.0], [0.9, 0.9, 1.0, 1.0]]], np.float32)
    for samples in (1, 2, 3):
        pooled = np.asarray(regions.roi_pool(jnp.asarray(patch_map), jnp.asarray(boxes), samples))
        want = [[direct_roi(patch_map[b], box, samples) for box in boxes[b]] for b in range(2)]
        np.testing.assert_allclose(pooled, np.array(want), rtol=1e-5, atol=1e-6)
    # A box on one patch with one sample point at its centre is that patch.
    one = regions.roi_pool(jnp.asarray(patch_map), jnp.array([[[0.25, 0.5, 0.5, 0.75]]] * 2), 1)
    np.testing.assert_allclose(one[:, 0], patch_map[:, 2, 1], rtol=1e-6)


def test_regions_are_whole_image_then_boxes_or_else_the_patches():
    rng = np.random.default_rng(1)
    patches = jnp.asarray(rng.normal(size=(2, 9, 3)).astype(np.float32))  # a 3 × 3 grid
    boxes = jnp.array([[[0.0, 0.0, 0.5, 0.5], [0, 0, 0, 0]], [[0, 0, 0, 0], [0, 0, 0, 0]]], jnp.float32)
    box_mask = jnp.array([[True, False], [False, False]])
    found = regions.regions(patches, boxes, box_mask, samples=2, patch_fallback=True)
    assert found["features"].shape == (2, 10, 3) and regions.region_slots(2, 3, True) == 10
    pooled = regions.roi_pool(patches.reshape(2, 3, 3, 3), jnp.array([[[0, 0, 1, 1], [0, 0, 0.5, 0.5]]] * 2), 2)
    np.testing.assert_allclose(found["features"][0, :2], pooled[0], rtol=1e-6)  # whole image, then the box
    assert found["mask"][0].tolist() == [True, True] + [False] * 8
    np.testing.assert_allclose(found["features"][1, 0], pooled[1, 0], rtol=1e-6)
    np.testing.assert_allclose(found["features"][1, 1:], patches[1], rtol=1e-6)  # no box: the patches
    assert found["mask"][1].all()
    np.testing.assert_allclose(found["boxes"][1, 1 + 4], [1 / 3, 1 / 3, 2 / 3, 2 / 3], rtol=1e-6)  # centre patch
    without = regions.regions(patches, boxes, box_mask, samples=2, patch_fallback=False)
    assert without["features"].shape == (2, 3, 3)
    assert without["mask"].tolist() == [[True, True, False], [True, False, False]]


def mesh_of(shape):
    return parallel.make_mesh(ml_collections.ConfigDict(dict(zip(parallel.MESH_AXES, shape, strict=True))),
                              devices=jax.devices()[: int(np.prod(shape))])


def test_hard_negatives_are_the_same_on_every_mesh_and_never_the_positive():
    rng = np.random.default_rng(2)
    image, text = (rng.normal(size=(16, 8)).astype(np.float32) for _ in range(2))
    image, text = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (image, text))
    key, scale = jax.random.PRNGKey(3), jnp.float32(10.0)
    found = {}
    for shape in ((1, 1, 1), (8, 1, 1), (2, 2, 2)):
        mesh = mesh_of(shape)
        with parallel.mesh_context(mesh):
            batch = parallel.global_batch_from_local({"image": image, "text": text}, mesh)
            for sample in (False, True):
                picked = jax.jit(mine_hard_negatives, static_argnums=(3, 5))(batch["image"], batch["text"], scale,
                                                                             mesh, key, sample)
                found[shape, sample] = tuple(np.asarray(x) for x in picked)
    for sample in (False, True):
        for shape in ((8, 1, 1), (2, 2, 2)):
            for got, want in zip(found[shape, sample], found[(1, 1, 1), sample], strict=True):
                np.testing.assert_array_equal(got, want)
    similarity = image @ text.T
    np.fill_diagonal(similarity, -np.inf)
    hardest_text, hardest_image = found[(1, 1, 1), False]
    np.testing.assert_array_equal(hardest_text, similarity.argmax(1))
    np.testing.assert_array_equal(hardest_image, similarity.argmax(0))
    sampled_text, sampled_image = found[(1, 1, 1), True]
    assert (sampled_text != np.arange(16)).all() and (sampled_image != np.arange(16)).all()
    assert (sampled_text != hardest_text).any()  # sampling, not the argmax


@pytest.mark.parametrize("key, value", [("anchors.source", "boxes"), ("amc.target", "tag"), ("itm.mining", "easy"),
                                        ("swap_fraction", 1.5)])
def test_unknown_options_are_errors_naming_the_key(key, value):
    config = cmal.get_config("tiny")
    section, _, name = key.rpartition(".")
    (config.method[section] if section else config.method)[name] = value
    with pytest.raises(ValueError, match=f"config.method.{key}={value!r}"):
        methods.build(config, mesh_of((1, 1, 1)))


def test_every_variant_declares_the_cmal_features():
    for size in ("tiny", "small", "base", "large"):
        config = cmal.get_config(size)
        method = methods.get("cmal")
        assert method.features(config) == ("image", "text", "boxes", "anchors")
        example = method.example_batch(config)
        assert example["region_tags"].shape == (config.data.max_boxes,)
        assert example["token_tags"].shape == (config.model.text.max_len,)
        assert config.method.unified.width % config.method.unified.heads == 0
