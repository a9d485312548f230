"""The sharded local-loss InfoNCE equals the single-device loss on the global batch, values and gradients."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vlp_jax import parallel
from vlp_jax.objectives.contrastive import clip_loss


def reference_loss(image, text, scale):
    """Plain symmetric InfoNCE over the whole batch on one device."""
    logits = scale * image @ text.T  # [B, B]
    labels = jnp.arange(len(image))
    i2t = -jax.nn.log_softmax(logits, axis=1)[labels, labels]
    t2i = -jax.nn.log_softmax(logits.T, axis=1)[labels, labels]
    return (i2t.mean() + t2i.mean()) / 2


def unit_rows(rng, shape):
    x = rng.normal(size=shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("shape", [(8, 1, 1), (4, 2, 1), (2, 2, 2)])
def test_sharded_loss_and_grads_equal_single_device(shape):
    rng = np.random.default_rng(0)
    image, text = unit_rows(rng, (32, 16)), unit_rows(rng, (32, 16))
    scale = jnp.float32(10.0)
    mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(zip(parallel.MESH_AXES, shape, strict=True))))
    sharding = parallel.batch_sharding(mesh)
    image_s, text_s = jax.device_put(image, sharding), jax.device_put(text, sharding)

    def sharded(i, t, s):
        return clip_loss(i, t, s, mesh)[0]

    loss, grads = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2)))(image_s, text_s, scale)
    ref_loss, ref_grads = jax.value_and_grad(reference_loss, argnums=(0, 1, 2))(image, text, scale)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_accuracy_counts_matching_pairs():
    mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=8, fsdp=1, model=1)))
    eye = np.eye(16, dtype=np.float32)
    text = eye.copy()
    text[[0, 1]] = text[[1, 0]]  # two swapped captions: 14 of 16 images find their own text
    _, metrics = jax.jit(lambda i, t: clip_loss(i, t, jnp.float32(10.0), mesh))(eye, text)
    assert float(metrics["i2t_accuracy"]) == pytest.approx(14 / 16)
