"""Scanned transformer blocks (config.model.scan_layers) and remat policies (config.model.remat) give the unrolled
stack's loss and gradients with the same parameters, on one device and sharded; the attention kernel choice
(config.model.attention) gives the masked attention."""

import functools
import logging
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import clip
from tests.helpers import small_towers
from vlp_jax import methods, parallel, step
from vlp_jax.checkpoint import leaves_by_path
from vlp_jax.models import kernels, layers

ENCODERS = (("towers", "image_tower", "encoder"), ("towers", "text_tower", "encoder"))


def mesh_of(shape):
    devices = np.prod(shape)
    axes = ml_collections.ConfigDict(dict(zip(parallel.MESH_AXES, shape, strict=True)))
    return parallel.make_mesh(axes, devices=jax.devices()[:devices])


def config_of(scan: bool, remat="none"):
    config = small_towers(clip.get_config("tiny"))
    config.model.image.depth = config.model.text.depth = 3
    config.model.update(dict(scan_layers=scan, remat=remat))
    return config


def batch_of(config, size=8):
    rng = np.random.default_rng(0)
    text = rng.integers(4, config.model.text.vocab_size, (size, config.model.text.max_len)).astype(np.int32)
    text[:, 0], text[:, 7], text[:, 8:] = 2, 3, 0
    pixels = config.model.image.image_size
    return {"image": rng.integers(0, 256, (size, pixels, pixels, 3), dtype=np.uint8), "text": text}


def convert(params, change):
    """`params` with both towers' encoders converted by `change` (layers.stack_blocks / unstack_blocks)."""
    params = jax.tree.map(lambda x: x, params)  # a copy of the nesting
    for path in ENCODERS:
        parent = params
        for key in path[:-1]:
            parent[key] = dict(parent[key])
            parent = parent[key]
        parent[path[-1]] = change(parent[path[-1]])
    return params


def loss_and_grads(config, params, mesh):
    method = methods.build(config, mesh)
    with parallel.mesh_context(mesh):
        batch = parallel.global_batch_from_local(batch_of(config), mesh)
        fn = jax.jit(jax.value_and_grad(method.loss, has_aux=True))
        (loss, _), grads = fn(params, {}, batch, jax.random.PRNGKey(0), jnp.int32(0))
    return float(loss), grads


@pytest.fixture(scope="module")
def unrolled():
    config = config_of(scan=False)
    method = methods.build(config, mesh_of((1, 1, 1)))
    params, _ = nn.meta.unbox(jax.jit(method.init)(jax.random.PRNGKey(0), batch_of(config)))
    return params, loss_and_grads(config, params, mesh_of((1, 1, 1)))


@pytest.mark.parametrize("remat, shape", [("none", (1, 1, 1)), ("full", (1, 1, 1)), ("dots", (2, 2, 2))])
def test_scanned_blocks_give_the_unrolled_loss_and_gradients(unrolled, remat, shape):
    params, (want_loss, want_grads) = unrolled
    config = config_of(scan=True, remat=remat)
    method = methods.build(config, mesh_of(shape))
    scanned_init, _ = nn.meta.unbox(jax.jit(method.init)(jax.random.PRNGKey(0), batch_of(config)))
    stacked = convert(params, lambda encoder: layers.stack_blocks(encoder, 3))
    # The scanned model's own parameter tree has exactly the stacked layout: one "blocks" set, a leading axis of 3.
    assert jax.tree.map(jnp.shape, scanned_init) == jax.tree.map(jnp.shape, stacked)
    assert "towers/image_tower/encoder/blocks/mlp/fc1/kernel" in leaves_by_path(scanned_init)
    loss, grads = loss_and_grads(config, stacked, mesh_of(shape))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    got = leaves_by_path(convert(grads, layers.unstack_blocks))
    want = leaves_by_path(want_grads)
    assert sorted(got) == sorted(want)
    for path, value in want.items():
        np.testing.assert_allclose(got[path], value, rtol=2e-4, atol=1e-5, err_msg=path)  # sharded sums: reordered


def test_stacking_round_trips_and_bad_remat_names_are_refused(unrolled):
    params, _ = unrolled
    encoder = params["towers"]["image_tower"]["encoder"]
    back = layers.unstack_blocks(layers.stack_blocks(encoder, 3))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), back, encoder))
    with pytest.raises(ValueError, match="config.model.remat='some'; use one of none, full, dots, dots_no_batch"):
        layers.remat_policy("some")
    assert layers.remat_policy(True) == (True, jax.checkpoint_policies.nothing_saveable)
    assert layers.remat_policy(False) == (False, None)


@pytest.mark.parametrize("causal", [False, True])
def test_the_cudnn_masking_arguments_give_the_masked_attention(causal):
    """What cuDNN receives (key lengths and is_causal instead of a boolean mask) is the same attention: run
    through XLA here (cuDNN itself needs an NVIDIA GPU), every real query row equals the boolean-mask path's."""
    rng = np.random.default_rng(0)
    b, t, h, d = 3, 7, 2, 8
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32) for _ in range(3))
    mask = jnp.asarray(np.arange(t)[None, :] < np.array([[7], [4], [1]]))  # end padding, lengths 7, 4, 1
    masked = jax.nn.dot_product_attention(q, k, v, **layers.attention_arguments(mask, causal, False, t))
    lengths = jax.nn.dot_product_attention(q, k, v, **layers.attention_arguments(mask, causal, True, t))
    real = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(lengths)[real], np.asarray(masked)[real], rtol=1e-6, atol=1e-6)
    # The causal flag changes the attention: the comparison can fail.
    other = jax.nn.dot_product_attention(q, k, v, **layers.attention_arguments(mask, not causal, True, t))
    assert np.abs(np.asarray(other)[real] - np.asarray(masked)[real]).max() > 1e-3


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
@pytest.mark.parametrize("causal, lengths", [(False, None), (True, (77, 30, 5, 1))])
def test_cudnn_attention_equals_xla_attention_in_bfloat16_on_a_gpu(causal, lengths):
    """The attention layer with config.model.attention='cudnn' against 'xla', both in bfloat16 with the same
    parameters, at the base text tower's shape (77 tokens, width 512, 8 heads): outputs and parameter gradients at
    real tokens each within twice the XLA path's own bfloat16 error (against float32 XLA) plus 0.01 of the
    reference's scale. The image tower's case has no mask; the text tower's has end padding and a causal mask."""
    rng = np.random.default_rng(0)
    b, t, width = 4, 77, 512
    x = jnp.asarray(rng.normal(size=(b, t, width)), jnp.float32)
    mask = None if lengths is None else jnp.asarray(np.arange(t)[None, :] < np.array(lengths)[:, None])
    real = np.ones((b, t), bool) if mask is None else np.asarray(mask)
    cotangent = jnp.asarray(rng.normal(size=(b, t, width)), jnp.float32) * jnp.asarray(real)[..., None]
    params = layers.SelfAttention(8, causal=causal).init(jax.random.key(0), x, mask)

    def run(dtype, attention):
        module = layers.SelfAttention(8, dtype=dtype, causal=causal, attention=attention)
        out, pullback = jax.vjp(lambda p: module.apply(p, x.astype(dtype), mask).astype(jnp.float32), params)
        return np.asarray(out)[real], jax.tree.leaves(pullback(cotangent)[0])

    reference, reference_grads = run(jnp.float32, "xla")
    xla, xla_grads = run(jnp.bfloat16, "xla")
    cudnn, cudnn_grads = run(jnp.bfloat16, "cudnn")

    def within(ours, theirs, ref):
        ours, theirs, ref = (np.asarray(a, np.float32) for a in (ours, theirs, ref))
        bound = 2 * np.abs(theirs - ref).max() + 0.01 * np.abs(ref).max()
        assert np.abs(ours - ref).max() <= bound, (np.abs(ours - ref).max(), bound)

    within(cudnn, xla, reference)
    for ours, theirs, ref in zip(cudnn_grads, xla_grads, reference_grads, strict=True):
        within(ours, theirs, ref)


def test_attention_choices_resolve_by_dtype_head_dim_and_backend():
    mask = jnp.ones((2, 4), bool)
    assert layers.attention_implementation("xla", jnp.bfloat16, 64, mask) == "xla"
    expected = "cudnn" if jax.default_backend() == "gpu" else "xla"
    assert layers.attention_implementation("auto", jnp.bfloat16, 64, mask) == expected
    assert layers.attention_implementation("auto", jnp.float32, 64, mask) == "xla"  # cuDNN needs 16-bit floats
    assert layers.attention_implementation("auto", jnp.bfloat16, 12, None) == "xla"  # head dim not a multiple of 8
    with pytest.raises(ValueError, match="'cudnn' needs bfloat16/float16 .*float32"):
        layers.attention_implementation("cudnn", jnp.float32, 64, mask)
    with pytest.raises(ValueError, match="config.model.attention='flash'; use one of xla, cudnn, auto"):
        layers.attention_implementation("flash", jnp.bfloat16, 64, mask)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("masking", ["none", "padding+causal", "per-query with an empty row"])
@pytest.mark.parametrize("ours_of", ["softmax_attention", "cpu vjp, ynn dots", "cpu vjp, xla dots"])
def test_our_xla_attention_equals_jax_dot_product_attention(dtype, masking, ours_of, monkeypatch):
    """kernels.softmax_attention (heads-major, the scale in the exponent, the normaliser on the output) and the CPU
    path's attention with its own VJP (kernels.lean_attention, jitted; its backward in each CPU dot library's form)
    are jax.nn.dot_product_attention's attention: values and gradients of q, k and v agree, in float32 and
    bfloat16, with padding, causal and per-query masks, a query with nothing to attend to included."""
    monkeypatch.setenv(kernels.CPU_DOTS_ENV, ours_of.split(", ")[-1].split()[0] if "dots" in ours_of else "auto")
    rng = np.random.default_rng(1)
    b, t, h, d = 3, 7, 2, 8
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, h, d)), dtype) for _ in range(3))
    lengths = np.array([[7], [4], [1]])
    if masking == "none":
        mask = None
    elif masking == "padding+causal":
        mask = layers.attention_arguments(jnp.asarray(np.arange(t)[None, :] < lengths), True, False, t)["mask"]
    else:
        per_query = rng.random((b, t, t)) < 0.6
        per_query[1, 2] = False  # query 2 of example 1 may attend to nothing: uniform attention in both
        mask = jnp.asarray(per_query)[:, None]
    cotangent = jnp.asarray(rng.normal(size=(b, t, h, d)), dtype)

    def reference(q, k, v):
        return (jax.nn.dot_product_attention(q, k, v, mask=mask).astype(jnp.float32) * cotangent).sum()

    def ours(q, k, v):  # [b, t, h, d] <-> the heads-major layout
        heads_major = [x.transpose(0, 2, 1, 3) for x in (q, k, v)]
        if ours_of.startswith("cpu vjp"):
            y = kernels.lean_attention(*heads_major, mask)  # gives [b, t, h, d]
        else:
            y = kernels.softmax_attention(*heads_major, mask).transpose(0, 2, 1, 3)
        return (y.astype(jnp.float32) * cotangent).sum()

    tolerance = dict(rtol=2e-2, atol=2e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    value, grads = jax.jit(jax.value_and_grad(ours, argnums=(0, 1, 2)))(q, k, v)
    value_ref, grads_ref = jax.value_and_grad(reference, argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(value, value_ref, **tolerance)
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        np.testing.assert_allclose(np.asarray(grad, np.float32), np.asarray(grad_ref, np.float32), **tolerance)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("widths", [(24, 8), (8, 24), (16, 16)])
def test_token_matmul_gives_the_plain_product_and_its_gradients(dtype, widths):
    """kernels.matmul (a dense layer's product whose kernel gradient is laid out for XLA CPU) equals `x @ w` in value
    and in the gradients of x and w, for inputs wider, narrower and as wide as the outputs; with a bias it equals
    `x @ w + b` likewise (and b's gradient); nn.Dense through layers.dense_dot_general likewise, jitted."""
    assert jax.default_backend() == "cpu"  # the rearranged gradient is the CPU path
    rng = np.random.default_rng(2)
    inputs, outputs = widths
    x = jnp.asarray(rng.normal(size=(3, 5, inputs)), dtype)
    w = jnp.asarray(rng.normal(size=(inputs, outputs)), dtype)
    cotangent = jnp.asarray(rng.normal(size=(3, 5, outputs)), jnp.float32)

    def objective(product):
        return lambda x, w: (product(x, w).astype(jnp.float32) * cotangent).sum()

    tolerance = dict(rtol=2e-2, atol=5e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    ours = jax.jit(jax.value_and_grad(objective(kernels.matmul), argnums=(0, 1)))(x, w)
    reference = jax.value_and_grad(objective(lambda x, w: x @ w), argnums=(0, 1))(x, w)
    for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(reference), strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **tolerance)

    bias = jnp.asarray(rng.normal(size=(outputs,)), dtype)  # kernels.matmul with a bias
    ours = jax.jit(jax.value_and_grad(lambda x, w, b: objective(lambda x, w: kernels.matmul(x, w, b))(x, w),
                                      argnums=(0, 1, 2)))(x, w, bias)
    reference = jax.value_and_grad(lambda x, w, b: objective(lambda x, w: x @ w + b)(x, w),
                                   argnums=(0, 1, 2))(x, w, bias)
    for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(reference), strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **tolerance)

    def dense(dot_general):
        return nn.Dense(outputs, dtype=dtype, dot_general=dot_general)

    params = dense(None).init(jax.random.PRNGKey(0), x)
    got = jax.jit(jax.grad(lambda p: objective(lambda x, _: dense(layers.dense_dot_general).apply(p, x))(x, w)))(params)
    want = jax.grad(lambda p: objective(lambda x, _: dense(None).apply(p, x))(x, w))(params)
    for leaf, leaf_ref in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(leaf, np.float32), np.asarray(leaf_ref, np.float32), **tolerance)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layer_norm_gives_flax_layer_norms_values_and_gradients_and_keeps_less(dtype):
    """layers.LayerNorm (our VJP on CPU) equals flax's nn.LayerNorm in value and in the gradients of its input,
    scale and bias, for float32 and bfloat16 compute; its parameters are flax's (same names and shapes), and a
    stack of them keeps less for the backward pass than flax's: XLA's temporaries for the gradient are smaller."""
    assert jax.default_backend() == "cpu"  # our VJP is the CPU path
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(4, 9, 32)) * 3 + 1, jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    ours, flax_ln = layers.layer_norm(dtype, epsilon=1e-5), nn.LayerNorm(epsilon=1e-5, dtype=dtype)
    params = nn.meta.unbox(ours.init(jax.random.PRNGKey(0), x))
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, flax_ln.init(jax.random.PRNGKey(0), x))
    params = jax.tree.map(lambda a: a + jnp.asarray(rng.normal(size=a.shape) * 0.3, a.dtype), params)

    def objective(module):
        return lambda p, x: (module.apply(p, x).astype(jnp.float32) * cotangent).sum()

    got = jax.jit(jax.value_and_grad(objective(ours), argnums=(0, 1)))(params, x)
    want = jax.jit(jax.value_and_grad(objective(flax_ln), argnums=(0, 1)))(params, x)
    for leaf, leaf_ref in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert leaf.dtype == leaf_ref.dtype
        np.testing.assert_allclose(np.asarray(leaf), np.asarray(leaf_ref), rtol=1e-5, atol=2e-5)

    def stack_temps(module):  # eight LayerNorms with residual adds, as in a transformer's blocks
        def loss(p, x):
            for _ in range(8):
                x = x + jnp.tanh(module.apply(p, x))
            return x.sum()
        big = jnp.zeros((64, 65, 128), jnp.float32)
        p = nn.meta.unbox(module.init(jax.random.PRNGKey(0), big))
        return jax.jit(jax.grad(loss)).lower(p, big).compile().memory_analysis().temp_size_in_bytes

    assert stack_temps(layers.layer_norm(jnp.float32)) < 0.8 * stack_temps(nn.LayerNorm(dtype=jnp.float32))


@pytest.mark.parametrize("activation", list(layers.ACTIVATIONS))
def test_mlp_activation_recomputed_in_the_backward_gives_autodiffs_gradients(activation):
    """The MLP's activation on CPU keeps only its input and recomputes itself in the backward pass: the block's
    output and gradients equal plain autodiff's (the same MLP with the activation applied directly)."""
    assert jax.default_backend() == "cpu"
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(3, 7, 16)), jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    mlp = layers.MlpBlock(48, activation=activation)
    params = nn.meta.unbox(mlp.init(jax.random.PRNGKey(0), x))
    fn = layers.activation_fn(activation)

    def plain(p, x):  # the MLP by hand, with autodiff's activation
        h = x @ p["params"]["fc1"]["kernel"] + p["params"]["fc1"]["bias"]
        return fn(h) @ p["params"]["fc2"]["kernel"] + p["params"]["fc2"]["bias"]

    got = jax.jit(jax.value_and_grad(lambda p, x: (mlp.apply(p, x) * cotangent).sum(), argnums=(0, 1)))(params, x)
    want = jax.value_and_grad(lambda p, x: (plain(p, x) * cotangent).sum(), argnums=(0, 1))(params, x)
    for leaf, leaf_ref in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(leaf), np.asarray(leaf_ref), rtol=1e-5, atol=1e-5)


def temp_bytes(config):
    mesh = mesh_of((1, 1, 1))
    method = methods.build(config, mesh)
    params, _ = nn.meta.unbox(jax.jit(method.init)(jax.random.PRNGKey(0), batch_of(config)))
    with parallel.mesh_context(mesh):
        batch = parallel.global_batch_from_local(batch_of(config, size=32), mesh)
        grad = jax.jit(jax.grad(lambda p: method.loss(p, {}, batch, jax.random.PRNGKey(0), jnp.int32(0))[0]))
        return grad.lower(params).compile().memory_analysis().temp_size_in_bytes


def test_remat_warns_where_it_saves_nothing_and_saves_with_scanned_blocks(caplog):
    """On the CPU backend remat with unrolled blocks is refused nothing but warned about (XLA CPU merges the
    recomputation with the forward pass); with scan_layers it lowers the compiled step's temporaries."""
    mesh = mesh_of((1, 1, 1))
    with caplog.at_level(logging.WARNING):
        step.validate(config_of(scan=False, remat="full"), mesh)
    assert "config.model.remat='full' saves no memory on the CPU backend" in caplog.text
    assert "--config.model.scan_layers=True" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        step.validate(config_of(scan=True, remat="full"), mesh)
        step.validate(config_of(scan=False), mesh)
    assert "saves no memory" not in caplog.text
    kept, recomputed = temp_bytes(config_of(scan=True)), temp_bytes(config_of(scan=True, remat="full"))
    assert recomputed < 0.7 * kept, (recomputed, kept)


def test_cpu_dots_follow_the_schedulable_cores_unless_the_environment_says(monkeypatch):
    """On one schedulable core the CPU step's dots go to XLA's own path (kernels.cpu_dots), on more to YNNPACK;
    VLP_JAX_CPU_DOTS overrides either way, and a bad value is refused by name."""
    monkeypatch.delenv(kernels.CPU_DOTS_ENV, raising=False)
    assert (kernels.cpu_dots(cores=1), kernels.cpu_dots(cores=2)) == ("xla", "ynn")
    monkeypatch.setenv(kernels.CPU_DOTS_ENV, "ynn")
    assert kernels.cpu_dots(cores=1) == "ynn" and kernels.compiler_options() == {}
    monkeypatch.setenv(kernels.CPU_DOTS_ENV, "xla")
    assert kernels.cpu_dots(cores=8) == "xla"
    assert kernels.compiler_options() == {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}
    monkeypatch.setenv(kernels.CPU_DOTS_ENV, "eigen")
    with pytest.raises(ValueError, match="VLP_JAX_CPU_DOTS='eigen'; use one of auto, ynn, xla"):
        kernels.cpu_dots()


def entry_dots(compiled) -> int:
    """How many dots the compiled program runs outside library (YNNPACK) fusions."""
    text = compiled.as_text()
    return len(re.findall(r"= \S+ dot\(", text[text.index("\nENTRY"):]))


def test_the_step_compiled_for_xla_dots_takes_the_same_step(monkeypatch):
    """The train step compiled with each CPU dot library (step.compile_step under VLP_JAX_CPU_DOTS): "xla" leaves
    the dots to XLA's own path (60 here), "ynn" fuses all but the smallest into YNNPACK (4 left), and both give the
    same loss and gradients (Adam's first moment after one step is 0.1 x the gradient)."""
    config = small_towers(clip.get_config("tiny"))
    run = step.setup(config)
    batch = parallel.global_batch_from_local(batch_of(config, config.train.batch_size), run.mesh)
    results = {}
    for dots in ("ynn", "xla"):
        monkeypatch.setenv(kernels.CPU_DOTS_ENV, dots)
        compiled, _, _ = step.compile_step(run, batch, config)
        results[dots] = (entry_dots(compiled), *compiled(jax.tree.map(lambda a: a.copy(), run.state), batch))
    (ynn_dots, ynn_state, ynn_metrics), (xla_dots, xla_state, xla_metrics) = results["ynn"], results["xla"]
    assert xla_dots > ynn_dots + 10
    for name in ("loss", "grad_norm"):
        np.testing.assert_allclose(xla_metrics[name], ynn_metrics[name], rtol=1e-5)
    want, got = leaves_by_path(ynn_state.opt_state), leaves_by_path(xla_state.opt_state)
    assert want.keys() == got.keys()
    for path in want:
        np.testing.assert_allclose(got[path], want[path], rtol=1e-4, atol=1e-7, err_msg=path)


def test_our_tanh_gelu_is_jax_gelu_in_value_and_gradient():
    """kernels.gelu_tanh (config.model.activation="gelu", rewritten in fewer operations) is jax.nn.gelu's tanh
    approximation: values and derivatives agree to float32 rounding across and beyond the activations' range."""
    x = jnp.concatenate([jnp.linspace(-12.0, 12.0, 20001), jnp.asarray(np.random.default_rng(5).normal(size=4096),
                                                                          jnp.float32)])
    np.testing.assert_allclose(kernels.gelu_tanh(x), jax.nn.gelu(x), rtol=1e-6, atol=1e-6)
    slope = jax.vmap(jax.grad(kernels.gelu_tanh))
    # where tanh nears -1 both derivatives are float32 cancellations of size ~1e-6
    np.testing.assert_allclose(slope(x), jax.vmap(jax.grad(jax.nn.gelu))(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kernels._gelu_tanh_derivative(x), slope(x), rtol=1e-5, atol=1e-5)


def test_an_xla_that_refuses_the_compiler_options_compiles_the_step_with_its_defaults(monkeypatch, caplog):
    """Where XLA does not know an option that kernels.compiler_options asks for, step.compile_step logs a warning
    naming it and compiles the step with XLA's defaults, which then trains."""
    monkeypatch.setattr(kernels, "compiler_options", lambda: {"xla_cpu_no_such_option": "1"})
    config = small_towers(clip.get_config("tiny"))
    run = step.setup(config)
    batch = parallel.global_batch_from_local(batch_of(config, config.train.batch_size), run.mesh)
    with caplog.at_level(logging.WARNING):
        compiled, _, _ = step.compile_step(run, batch, config)
    assert "XLA refused the compiler options {'xla_cpu_no_such_option': '1'}" in caplog.text
    _, metrics = compiled(jax.tree.map(lambda a: a.copy(), run.state), batch)
    assert np.isfinite(metrics["loss"]) and int(metrics["nonfinite_total"]) == 0


@pytest.mark.parametrize("parts", [2, 3])
@pytest.mark.parametrize("mask_batch", [None, 1, 5])
def test_attention_split_over_the_batch_gives_the_whole_batchs_values_and_gradients(parts, mask_batch):
    """kernels.split_attention (the CPU attention in slices of the batch, uneven where the batch does not divide)
    gives lean_attention's values and q, k, v gradients on the whole batch, with no mask, a mask broadcast from a
    batch of 1 and a per-example mask."""
    rng = np.random.default_rng(2)
    b, h, t, d = 5, 2, 6, 8
    q, k, v = (jnp.asarray(rng.normal(size=(b, h, t, d)), jnp.float32) for _ in range(3))
    mask = None if mask_batch is None else jnp.asarray(rng.random((mask_batch, 1, t, t)) < 0.7)
    cotangent = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)

    def loss(parts, q, k, v):
        return (kernels.split_attention(q, k, v, mask, parts) * cotangent).sum()

    whole = jax.jit(jax.value_and_grad(functools.partial(loss, 1), argnums=(0, 1, 2)))(q, k, v)
    split = jax.jit(jax.value_and_grad(functools.partial(loss, parts), argnums=(0, 1, 2)))(q, k, v)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5), split, whole)


def test_cpu_attention_parts_follow_the_dots_and_devices_unless_the_environment_says(monkeypatch):
    """The CPU attention runs in two batch slices where YNNPACK takes the dots on one device, else in one;
    VLP_JAX_CPU_ATTENTION_PARTS overrides (never more slices than examples), and a bad value is refused by name."""
    monkeypatch.delenv(kernels.CPU_DOTS_ENV, raising=False)
    monkeypatch.delenv(kernels.CPU_ATTENTION_PARTS_ENV, raising=False)
    assert kernels.attention_parts(128, cores=2, devices=1) == 2
    assert kernels.attention_parts(128, cores=1, devices=1) == 1  # XLA's dots on one core
    assert kernels.attention_parts(128, cores=2, devices=8) == 1  # a sharded batch
    assert kernels.attention_parts(1, cores=2, devices=1) == 1
    monkeypatch.setenv(kernels.CPU_ATTENTION_PARTS_ENV, "4")
    assert (kernels.attention_parts(128, cores=1, devices=8), kernels.attention_parts(3)) == (4, 3)
    monkeypatch.setenv(kernels.CPU_ATTENTION_PARTS_ENV, "two")
    with pytest.raises(ValueError, match="VLP_JAX_CPU_ATTENTION_PARTS='two'; use auto or a whole number >= 1"):
        kernels.attention_parts(128)
