"""The VQ tokenizer: EMA codebook against NumPy, dead-code re-seeding, the straight-through gradient, sharded =
single-device, the patch order of its codes, a short training run's quality and the checkpoint round trip."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import clip
from configs import vq as vq_configs
from vlp_jax import parallel, step, train
from vlp_jax.checkpoint import Checkpointer, CheckpointError, config_as_json
from vlp_jax.data import synthetic
from vlp_jax.methods import vq as vq_method
from vlp_jax.methods.cots import CotsMethod
from vlp_jax.models import vq

# The short training run below must beat these bars on its 128 held-out scenes; measured, it reaches a
# reconstruction MSE of 0.18 where the mean image scores 0.30 (ratio 0.6), and uses 98% of the codebook.
MAX_MSE_RATIO = 0.75  # reconstruction MSE / the mean-image baseline's MSE
MIN_USAGE = 0.5  # fraction of the codebook used on the held-out images


def small_config(**method_overrides) -> ml_collections.ConfigDict:
    config = vq_configs.get_config("tiny")
    config.method.update(method_overrides)
    return config


def random_images(count: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def init_method(config, mesh=None):
    mesh = mesh or parallel.make_mesh(config.mesh)
    method = vq_method.VQMethod(config, mesh, {})
    size = config.model.image.image_size
    variables = method.init(jax.random.PRNGKey(0), {"image": np.zeros((1, size, size, 3), np.uint8)})
    return method, *jax.device_get(nn.meta.unbox(variables))  # host arrays: usable on any mesh


@pytest.fixture(scope="module")
def tokenizer():
    """The tiny config's (method, params, codebook), initialised once."""
    return init_method(small_config())


def test_ema_update_matches_numpy():
    rng = np.random.default_rng(0)
    num_codes, dim, decay = 5, 3, 0.9
    cluster_size = rng.uniform(1.0, 4.0, num_codes).astype(np.float32)
    embed_sum = rng.normal(size=(num_codes, dim)).astype(np.float32)
    vectors = rng.normal(size=(12, dim)).astype(np.float32)
    codes = np.array([0, 0, 1, 3, 3, 3, 0, 1, 4, 4, 0, 3], np.int32)  # code 2 unused
    counts = np.bincount(codes, minlength=num_codes)
    sums = np.stack([vectors[codes == k].sum(0) for k in range(num_codes)])
    got = vq.ema_update({"cluster_size": cluster_size, "embed_sum": embed_sum}, vectors, codes, decay)
    np.testing.assert_allclose(got["cluster_size"], decay * cluster_size + (1 - decay) * counts, rtol=1e-6)
    np.testing.assert_allclose(got["embed_sum"], decay * embed_sum + (1 - decay) * sums, rtol=1e-5, atol=1e-6)
    codebook = np.asarray(vq.codebook_vectors(got))
    np.testing.assert_allclose(codebook, np.asarray(got["embed_sum"]) / np.asarray(got["cluster_size"])[:, None])
    # Quantisation picks the nearest code vector.
    nearest = np.argmin(((vectors[:, None] - codebook[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(vq.quantize(jnp.asarray(vectors), got)[1], nearest)


def test_dead_codes_are_reseeded_from_the_batch():
    rng = np.random.default_rng(1)
    threshold, decay = 1.0, 0.5
    vectors = rng.normal(size=(32, 4)).astype(np.float32)
    codebook = {"cluster_size": np.array([8.0, 1.5, 1.2, 6.0], np.float32),
                "embed_sum": rng.normal(size=(4, 4)).astype(np.float32)}
    codes = np.array([0] * 20 + [3] * 12, np.int32)  # codes 1 and 2 decay to 0.75 and 0.6: below the threshold
    update = jax.jit(vq.update_codebook, static_argnums=(3, 4))
    new, reseeded = update(codebook, vectors, codes, decay, threshold, jax.random.PRNGKey(0))
    assert int(reseeded) == 2
    np.testing.assert_allclose(new["cluster_size"][1:3], threshold)
    seeds = np.asarray(vq.codebook_vectors(new))[1:3]
    for seed in seeds:  # each re-seeded code is one of the batch's encoder outputs
        assert np.min(np.abs(vectors - seed).max(axis=1)) < 1e-6
    assert not np.allclose(seeds[0], seeds[1])
    live = vq.ema_update(codebook, vectors, codes, decay)
    for key in new:
        np.testing.assert_allclose(np.asarray(new[key])[[0, 3]], np.asarray(live[key])[[0, 3]], rtol=1e-6)

    # The initial codebook: step 1 sends everything to code 0 and re-seeds every other code from the data.
    initial = vq.init_codebook(6, 4, threshold)
    first_codes = vq.quantize(jnp.asarray(vectors), initial)[1]
    assert (np.asarray(first_codes) == 0).all()
    _, reseeded = update(initial, vectors, first_codes, decay, threshold, jax.random.PRNGKey(0))
    assert int(reseeded) == 5


def test_straight_through_gradient_reaches_the_encoder(tokenizer):
    vectors = jnp.asarray(np.random.default_rng(2).normal(size=(6, 3)), jnp.float32)
    weights = jnp.arange(18.0).reshape(6, 3)
    codebook = vq.ema_update(vq.init_codebook(4, 3, 1.0), vectors, jnp.arange(6) % 4, 0.0)
    grad = jax.grad(lambda v: jnp.sum(vq.quantize(v, codebook)[0] * weights))(vectors)
    np.testing.assert_allclose(grad, weights)  # the quantiser passes the gradient through unchanged

    # With β = 0 only the reconstruction (through the quantiser) trains the encoder: its gradient is non-zero.
    _, params, extra = tokenizer
    method = vq_method.VQMethod(small_config(commitment_weight=0.0), None, {})
    batch = {"image": random_images(8, 32)}
    step = jax.jit(jax.grad(method.loss, has_aux=True))
    _, (_, extra) = step(params, extra, batch, jax.random.PRNGKey(0), 0)  # a data-seeded codebook
    grads, _ = step(params, extra, batch, jax.random.PRNGKey(1), 1)
    for name, leaf in jax.tree_util.tree_leaves_with_path(grads["encoder"]):
        assert float(jnp.abs(leaf).max()) > 0, jax.tree_util.keystr(name)


def test_sharded_loss_equals_single_device(tokenizer):
    method, params, extra = tokenizer
    batch = {"image": random_images(16, 32, seed=3)}
    single_mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, model=1)), jax.devices()[:1])
    loss_and_grads = jax.value_and_grad(method.loss, has_aux=True)
    results = []
    for mesh in (single_mesh, parallel.make_mesh(method.config.mesh)):
        assert mesh.size in (1, 8)
        sharded = parallel.global_batch_from_local(batch, mesh)
        with parallel.mesh_context(mesh):
            results.append(jax.device_get(
                jax.jit(loss_and_grads)(params, extra, sharded, jax.random.PRNGKey(4), jnp.int32(0))
            ))
    (single, single_grads), (multi, multi_grads) = results
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), single, multi)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), single_grads, multi_grads)


def test_image_codes_follow_the_vit_patch_order():
    """With the codebook = each patch's encoder output (row-major) plus the changed patch's, codes name patches."""
    config = small_config()
    config.model.image.image_size = 64  # an 8x8 grid of 8px patches
    config.model.vq.res_blocks = 0  # a patch's code then depends on that patch's pixels only
    _, params, _ = init_method(config)
    image = random_images(1, 64, seed=5)
    changed = image.copy()
    changed[0, 8:16, 48:56] = 255 - changed[0, 8:16, 48:56]  # patch (row 1, column 6) = patch 14 in row-major order
    model = vq_method.build_model(config)
    grids = [model.apply({"params": params}, x, method=vq.VQVAE.encode) for x in (image, changed)]  # [1, 8, 8, d]
    entries = jnp.concatenate([grids[0].reshape(64, -1), grids[1][:, 1, 6]])  # [65, d]
    codebook = vq.ema_update(vq.init_codebook(65, config.method.code_dim, 1.0), entries, jnp.arange(65), 0.0)
    tokenizer = {"params": params, "codebook": codebook}
    codes = jax.jit(lambda x: vq_method.image_codes(config, tokenizer, x))(np.concatenate([image, changed]))
    assert codes.shape == (2, 64) and codes.dtype == jnp.int32
    np.testing.assert_array_equal(codes[0], np.arange(64))
    np.testing.assert_array_equal(codes[1], np.where(np.arange(64) == 14, 64, np.arange(64)))


def test_bad_configs_and_images_are_clear_errors(tokenizer):
    config = small_config()
    config.model.image.patch_size = 5
    with pytest.raises(ValueError, match=r"image_size=32 is not divisible by patch_size=5"):
        vq_method.VQMethod(config, None, {})
    with pytest.raises(ValueError, match=r"dead_code_threshold=0.0 must be positive"):
        vq_method.VQMethod(small_config(dead_code_threshold=0), None, {})
    _, params, extra = tokenizer
    with pytest.raises(ValueError, match=r"expects \[b, 32, 32, 3\]"):
        vq_method.image_codes(small_config(), {"params": params, "codebook": extra}, random_images(1, 16))


def test_matching_derives_the_tokenizer_run_of_a_cots_config():
    run = clip.get_config("tiny")
    run.seed = 7
    run.model.image.patch_size = 4
    run.mesh.fsdp = 2
    run.method.mvm = ml_collections.ConfigDict(dict(codebook_size=64, tokenizer_steps=30, tokenizer_batch_size=16))
    config = vq_configs.matching(run)
    assert config.method.name == "vq" and config.seed == 7 and config.mesh.fsdp == 2
    assert (config.model.image.image_size, config.model.image.patch_size) == (32, 4)
    assert (config.method.codebook_size, config.train.steps, config.train.batch_size) == (64, 30, 16)
    assert config.data == run.data
    defaults = vq_configs.matching(clip.get_config("tiny"))  # no mvm block: the VQ defaults
    assert defaults.train.steps == vq_configs.get_config("tiny").train.steps


def load_tokenizer(path: str):
    """(vq_config, tokenizer pytree) of a VQ run, read as a COTS run reads its tokenizer."""
    spec = CotsMethod.pretrained(None)["tokenizer"]
    run = step.load_run(path, spec)
    return run.config, {"params": run.trees["params"], "codebook": run.trees["extra"]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short tiny tokenizer run: (config, workdir, final evaluation)."""
    config = small_config()
    config.data.train_size = 512
    config.data.eval_size = 128
    config.train.update(dict(steps=100, warmup_steps=10, log_every=50))
    config.eval.batch_size = 64
    workdir = tmp_path_factory.mktemp("vq_run")
    return config, workdir, train.train_and_evaluate(config, str(workdir))


def test_short_run_beats_the_mean_image_and_uses_the_codebook(trained):
    _, _, final = trained
    assert final["reconstruction_mse"] < MAX_MSE_RATIO * final["mean_image_mse"], final
    assert final["codebook_usage"] >= MIN_USAGE, final


def test_load_tokenizer_round_trip(trained):
    config, workdir, final = trained
    vq_config, tokenizer = load_tokenizer(str(workdir))
    assert config_as_json(vq_config) == config_as_json(config)
    assert isinstance(tokenizer["codebook"]["embed_sum"], np.ndarray)
    # The restored tokenizer reproduces the run's final evaluation on the same held-out scenes.
    images = synthetic.make_split(config.data.world, "eval", config.data.eval_size).images
    codes = np.asarray(jax.jit(lambda x: vq_method.image_codes(vq_config, tokenizer, x))(images))
    assert codes.shape == (len(images), 16)
    assert np.unique(codes).size / config.method.codebook_size == pytest.approx(final["codebook_usage"])
    method = vq_method.VQMethod(vq_config, None, {})
    errors, _ = jax.jit(method.reconstruct)(tokenizer["params"], tokenizer["codebook"], images)
    assert float(errors.mean()) == pytest.approx(final["reconstruction_mse"], rel=1e-4)


def test_load_tokenizer_refuses_other_directories(tmp_path):
    with pytest.raises(CheckpointError, match=rf"tokenizer={re.escape(str(tmp_path))}/empty: .* does not exist"):
        load_tokenizer(str(tmp_path / "empty"))
    other = clip.get_config("tiny")
    checkpointer = Checkpointer(tmp_path / "clip", other.checkpoint)
    checkpointer.save(1, {"params": {"w": np.zeros(2, np.float32)}}, {"epoch": 0}, other)
    checkpointer.wait()
    checkpointer.close()
    with pytest.raises(CheckpointError, match=r"tokenizer=.*/clip is a 'clip' run, not a 'vq' run"):
        load_tokenizer(str(tmp_path / "clip"))
