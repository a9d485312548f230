"""SigLIP's sigmoid loss: sharded and blocked equal the single-device formula (loss, gradients, accuracy); the
siglip method trains its bias and scale."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import siglip
from tests.helpers import small_towers
from vlp_jax import methods, parallel
from vlp_jax.objectives.sigmoid import sigmoid_loss


def reference(image, text, scale, bias):
    """-Σ_ij log σ(label_ij (t x_i·y_j + b)) / B on one device."""
    logits = scale * image @ text.T + bias
    labels = 2 * jnp.eye(len(image)) - 1
    return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / len(image)


def unit_rows(rng, shape):
    x = rng.normal(size=shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def mesh_of(shape):
    axes = ml_collections.ConfigDict(dict(zip(parallel.MESH_AXES, shape, strict=True)))
    return parallel.make_mesh(axes, devices=jax.devices()[: int(np.prod(shape))])


@pytest.mark.parametrize("shape, chunk, ring", [((1, 1, 1), 0, False), ((2, 2, 2), 0, False), ((1, 1, 1), 5, False),
                                               ((2, 2, 2), 7, False), ((8, 1, 1), 0, True), ((2, 2, 2), 3, True)])
def test_sharded_and_blocked_sigmoid_loss_equal_the_formula(shape, chunk, ring):
    """Gathered or passed round the ring of replicas, whole or in column blocks."""
    rng = np.random.default_rng(0)
    image, text = unit_rows(rng, (32, 16)), unit_rows(rng, (32, 16))
    text[[2, 9]] = image[[2, 9]]  # certain matches: the accuracy is not trivially 0
    scale, bias = jnp.float32(10.0), jnp.float32(-3.0)
    mesh = mesh_of(shape)
    sharding = parallel.batch_sharding(mesh)
    image_s, text_s = jax.device_put(image, sharding), jax.device_put(text, sharding)

    def loss(i, t, s, b):
        out = sigmoid_loss(i, t, s, b, mesh, chunk=chunk, ring=ring)
        return out["loss"], out["accuracy"]

    (got, accuracy), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(
        image_s, text_s, scale, bias)
    want, want_grads = jax.value_and_grad(reference, argnums=(0, 1, 2, 3))(image, text, scale, bias)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    assert float(accuracy) == pytest.approx(np.mean(np.argmax(image @ text.T, axis=1) == np.arange(32)))


def test_the_siglip_method_learns_its_scale_and_bias():
    config = small_towers(siglip.get_config("tiny"))
    assert (config.method.scale_init, config.method.bias_init) == (10.0, -10.0)
    mesh = mesh_of((2, 1, 1))
    method = methods.build(config, mesh)
    rng = np.random.default_rng(0)
    text = rng.integers(4, config.model.text.vocab_size, (8, config.model.text.max_len)).astype(np.int32)
    text[:, 0], text[:, 5], text[:, 6:] = 2, 3, 0
    size = config.model.image.image_size
    batch = {"image": rng.integers(0, 256, (8, size, size, 3), dtype=np.uint8), "text": text}
    params, extra = nn.meta.unbox(jax.jit(method.init)(jax.random.PRNGKey(0), batch))
    assert float(params["bias"]["bias"]) == -10.0
    with parallel.mesh_context(mesh):
        sharded = parallel.global_batch_from_local(batch, mesh)
        (loss, (metrics, _)), grads = jax.jit(jax.value_and_grad(method.loss, has_aux=True))(
            params, extra, sharded, jax.random.PRNGKey(0), jnp.int32(0))
        embeddings = jax.jit(method.encode)(params, sharded)
    want = reference(embeddings["image"], embeddings["text"], jnp.float32(10.0), jnp.float32(-10.0))
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    assert float(metrics["logit_scale"]) == pytest.approx(10.0) and float(metrics["bias"]) == -10.0
    assert float(grads["bias"]["bias"]) != 0 and float(grads["logit_scale"]["log_scale"]) != 0
