"""COOKIE's shared head and configuration: one parameter set trained by both modalities, clear errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import clip, common, cookie
from tests.helpers import small_towers
from vlp_jax import methods, parallel, step
from vlp_jax.checkpoint import leaves_by_path
from vlp_jax.methods.cookie import CookieMethod


def small_cookie(**head) -> ml_collections.ConfigDict:
    config = small_towers(cookie.get_config("tiny"))
    config.method.head.update(dict(width=32, depth=1, heads=2, mlp_dim=64, **head))
    return config


def one_device():
    return parallel.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, model=1)), devices=jax.devices()[:1])


def batch_of(config, size=4):
    rng = np.random.default_rng(0)
    text = rng.integers(4, config.model.text.vocab_size, (size, config.model.text.max_len)).astype(np.int32)
    text[:, 0], text[:, 9], text[:, 10:] = 2, 3, 0  # BOS, words, EOS, padding
    pixels = config.model.image.image_size
    return {"image": rng.integers(0, 256, (size, pixels, pixels, 3), dtype=np.uint8), "text": text}


def test_the_head_exists_once_and_both_modalities_train_it():
    config = small_cookie(pool="cls")  # mean pooling is the default the sharded tests use
    method = methods.build(config, one_device())
    batch = batch_of(config)
    params, _ = nn.meta.unbox(jax.jit(method.init)(jax.random.PRNGKey(0), batch))
    paths = leaves_by_path(params)
    # One transformer for both towers: its blocks appear once, under shared_head, and nowhere else.
    blocks = sorted(path.split("/")[0] for path in paths if path.endswith("/block0/mlp/fc1/kernel"))
    assert blocks == ["image_tower", "shared_head", "text_tower"]
    direction = jax.random.normal(jax.random.PRNGKey(1), (config.model.embed_dim,))

    def grads(p):  # of a linear readout of each modality's embeddings, in one program (one compile)
        def readout(p, modality):
            return jnp.sum(method.encode(p, {modality: batch[modality]})[modality] @ direction)
        return jax.grad(readout)(p, "image"), jax.grad(readout)(p, "text")

    image, text = map(leaves_by_path, jax.jit(grads)(params))
    shared = [path for path in paths if path.startswith("shared_head/") and "adapter" not in path
              and "modality_embedding" not in path]
    for path in shared:  # every shared parameter (blocks, pooling token, projection) learns from both modalities
        assert np.abs(image[path]).sum() > 0 and np.abs(text[path]).sum() > 0, path
    assert np.abs(image["shared_head/image_adapter/kernel"]).sum() > 0
    assert np.abs(image["shared_head/text_adapter/kernel"]).sum() == 0  # each modality has its own adapter
    assert np.abs(text["shared_head/image_adapter/kernel"]).sum() == 0
    # Row 0 of the modality embedding marks image tokens, row 1 text tokens.
    rows = [np.abs(grads["shared_head/modality_embedding"]).sum(axis=1) > 0 for grads in (image, text)]
    assert rows[0].tolist() == [True, False] and rows[1].tolist() == [False, True]


def test_every_size_builds_and_the_weights_switch_terms_off():
    for size in common.SIZES:
        config = cookie.get_config(size)
        assert config.method.head.width % config.method.head.heads == 0, size
    config = small_cookie()
    config.method.weights.textual = 0.0
    config.method.teacher.image = "none"
    method = methods.build(config, one_device())
    assert method.terms == ("cross",)
    params, extra = nn.meta.unbox(jax.jit(method.init)(jax.random.PRNGKey(0), batch_of(config)))
    assert list(params["temperatures"]) == ["cross"] and extra == {}


def test_bad_teacher_settings_are_clear_errors():
    config = small_cookie()
    config.method.teacher.image = "ema"
    with pytest.raises(ValueError, match="config.method.teacher.image='ema'"):
        methods.build(config, one_device())
    config = small_cookie()
    config.method.teacher.image = "frozen"
    with pytest.raises(ValueError, match="config.method.teacher.image_run is empty"):
        step.load_pretrained(config, one_device())
    # A frozen teacher without a frozen parameter group would be moved by weight decay.
    teacher = small_towers(clip.get_config("tiny"))
    run = step.random_run(teacher, ("params",), one_device())
    with pytest.raises(ValueError, match="frozen group"):
        CookieMethod(config, one_device(), {"visual_teacher": run})
    config.train.param_groups = {"teachers": cookie.FROZEN_GROUP}
    CookieMethod(config, one_device(), {"visual_teacher": run})
    # A text teacher reads our token ids: its tokenizer must be ours.
    config = small_cookie()
    config.method.teacher.update(dict(text="frozen", text_run="/nowhere"))
    config.train.param_groups = {"teachers": cookie.FROZEN_GROUP}
    with pytest.raises(ValueError, match="--config.data.tokenizer.path=/nowhere/tokenizer.model"):
        CookieMethod(config, one_device(), {"textual_teacher": run})
    run.config.method.name = "brivl"
    config.method.teacher.update(dict(image="frozen", image_run="/brivl", text="momentum"))
    with pytest.raises(ValueError, match="a 'brivl' run, which has no image encoder"):
        CookieMethod(config, one_device(), {"visual_teacher": run})


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_encode_flops_count_the_shared_head_as_xla_does(pool):
    """COOKIE's FLOPs per image / text (the efficiency evaluator's FLOP rate) are the towers' plus the head's: the
    head's part agrees with XLA's count of the encode programs' difference (COOKIE minus the bare towers)."""
    from vlp_jax import flops

    config = small_cookie(pool=pool)
    method = methods.build(config, one_device())
    batch = batch_of(config, size=1)
    params, _ = nn.meta.unbox(jax.jit(method.init)(jax.random.PRNGKey(0), batch))
    ours = CookieMethod.encode_flops(config)
    towers = flops.tower_encode_flops(config.model)
    for modality in ("image", "text"):
        xla = flops.step_flops(jax.jit(method.encode).lower(params, {modality: batch[modality]}), config)
        # XLA also counts LayerNorms, softmax and GELU, which our matmul count leaves out (measured: 0.92 of XLA's
        # count; the towers alone are 0.43-0.55 of it).
        assert 0.85 < ours[modality] / xla < 1.1, (modality, ours[modality], xla)
        assert towers[modality] / xla < 0.85
