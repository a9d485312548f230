"""Tower shapes and behaviour: parameter counts, padding invariance, pooling, remat equivalence."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import clip
from vlp_jax import methods, parallel
from vlp_jax.models.text import TextTransformer
from vlp_jax.state import count_params


def abstract_params(config):
    mesh = parallel.make_mesh(config.mesh)
    method = methods.build(config, mesh)
    size = config.model.image.image_size
    batch = {"image": np.zeros((1, size, size, 3), np.uint8),
             "text": np.zeros((1, config.model.text.max_len), np.int32)}
    return nn.meta.unbox(jax.eval_shape(method.init, jax.random.PRNGKey(0), batch)[0])


def test_base_is_the_clip_vit_b16_shape_with_about_150m_parameters():
    config = clip.get_config()  # no variant = base
    assert (config.model.image.image_size, config.model.image.patch_size, config.model.image.width) == (224, 16, 768)
    assert (config.model.text.depth, config.model.text.width, config.model.text.max_len) == (12, 512, 77)
    assert 145e6 < count_params(abstract_params(config)) < 155e6


def test_every_parameter_carries_logical_axis_names():
    config = clip.get_config("tiny")
    method = methods.build(config, parallel.make_mesh(config.mesh))
    batch = {"image": np.zeros((1, 32, 32, 3), np.uint8), "text": np.zeros((1, 8), np.int32)}
    boxed = jax.eval_shape(method.init, jax.random.PRNGKey(0), batch)[0]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    unnamed = [leaf for leaf in leaves if not isinstance(leaf, nn.Partitioned) and leaf.ndim > 0]
    assert not unnamed


def text_tower(**overrides):
    kwargs = dict(vocab_size=50, max_len=12, width=32, depth=2, heads=4, mlp_dim=64)
    return TextTransformer(**(kwargs | overrides))


@pytest.mark.parametrize("pool", ["eos", "mean", "cls"])
def test_padding_does_not_change_the_text_embedding(pool):
    model = text_tower(pool=pool)
    short = np.array([[2, 7, 9, 3]], np.int32)
    padded = np.pad(short, ((0, 0), (0, 8)))
    params = model.init(jax.random.PRNGKey(0), padded)
    a, _ = model.apply(params, short)
    b, _ = model.apply(params, padded)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_remat_gives_the_same_gradients():
    tokens = np.array([[2, 7, 9, 3, 0], [2, 5, 3, 0, 0]], np.int32)
    plain, remat = text_tower(), text_tower(remat=True)
    params = plain.init(jax.random.PRNGKey(0), tokens)

    def loss(model):
        return jax.grad(lambda p: model.apply(p, tokens)[0].sum())(params)

    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), loss(plain), loss(remat))
