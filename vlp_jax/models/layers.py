"""Transformer building blocks with logical axis names on every parameter and activation.

Parameters are float32; computation runs in `dtype` (bfloat16 on accelerators, float32 in CPU tests).
"""

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = jnp.dtype | str


def partitioned(init: Callable, names: tuple[str | None, ...]) -> Callable:
    """An initializer whose parameter carries logical axis names (mapped to the mesh in parallel.py)."""
    return nn.with_logical_partitioning(init, names)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Sharding hint for an activation; a no-op outside a mesh context."""
    return nn.with_logical_constraint(x, names)


def _weight_gradient(inputs: jax.Array, grads: jax.Array) -> jax.Array:
    """inputs [..., i] and grads [..., o] -> [i, o] (the product over all leading axes, inputs [n, i]^T @ grads [n, o]
    with n their count), the weight gradient of a token-wise dense layer, arranged for XLA
    CPU: the narrower operand is transposed into a materialised [min(i, o), n] block that leads the product, and the
    result is transposed at the end where needed. XLA CPU runs a dot whose contracting dimension leads both
    operands (autodiff's form) at about half the speed of [m, n] @ [n, o], and its simplifier folds explicit
    transposes back into that form; the optimisation barriers keep them. Measured on this 2-core CPU, one core:
    [8320, 512]^T @ [8320, 128] 19.9 ms as autodiff leaves it, 12.3 ms as [128, 8320] @ [8320, 512] (incl. the
    transpose); the tiny CLIP's MLP forward and backward 0.81x the time. Where i == o XLA CPU runs autodiff's form
    as fast, given the leading axes unflattened."""
    if inputs.shape[-1] == grads.shape[-1]:
        return jnp.einsum("...i,...o->io", inputs, grads)
    inputs, grads = inputs.reshape(-1, inputs.shape[-1]), grads.reshape(-1, grads.shape[-1])
    if inputs.shape[1] > grads.shape[1]:
        transposed = jax.lax.optimization_barrier(grads.T) @ inputs  # [o, i]
        return jax.lax.optimization_barrier(transposed).T
    return jax.lax.optimization_barrier(inputs.T) @ grads


@jax.custom_vjp
def _token_matmul(inputs: jax.Array, kernel: jax.Array, bias: jax.Array | None) -> jax.Array:
    product = inputs @ kernel
    return product if bias is None else product + bias


def _token_matmul_forward(inputs, kernel, bias):
    return _token_matmul(inputs, kernel, bias), (inputs, kernel, bias)


def _token_matmul_backward(saved, grads):
    inputs, kernel, bias = saved
    weight_grad = _weight_gradient(inputs, grads).astype(kernel.dtype)
    bias_grad = None if bias is None else grads.reshape(-1, grads.shape[-1]).sum(axis=0).astype(bias.dtype)
    return grads @ kernel.T, weight_grad, bias_grad


_token_matmul.defvjp(_token_matmul_forward, _token_matmul_backward)


def matmul(inputs: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """inputs [..., i] @ kernel [i, o] (+ bias [o]): a dense layer's product over many tokens. The same values and
    gradients as `inputs @ kernel + bias`; on the CPU backend the kernel's gradient is computed in the layout XLA
    CPU runs fastest (`_weight_gradient`), elsewhere (cuBLAS and TPU take any operand layout) it is plain autodiff.

    With `bias`, its gradient (on the CPU backend) is summed from the same [tokens, o] view of the incoming
    gradient that the two products take. Where that gradient comes out of a transpose (the attention's query, key
    and value projections), autodiff's bias gradient reduces a second, separately transposed copy of it: on the
    tiny CLIP (see LayerNorm) the step takes 0.94-0.96x the time with this than without on one core and
    0.91-0.93x on 2 threads, alternated in one process. The MLP's and the output projection's biases, whose
    gradients need no transpose, measured level and stay outside (nn.Dense's and SelfAttention's own add)."""
    if jax.default_backend() != "cpu" or inputs.ndim < 2:
        product = inputs @ kernel
        return product if bias is None else product + bias
    return _token_matmul(inputs, kernel, bias)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """lax.dot_general for nn.Dense (its `dot_general` argument): `matmul` for the product nn.Dense makes (the
    input's last axis with the kernel's first, no batch axes, default precision), lax.dot_general otherwise."""
    (contract_lhs, contract_rhs), batch = dimension_numbers
    if (tuple(contract_lhs) == (lhs.ndim - 1,) and tuple(contract_rhs) == (0,) and batch == ((), ())
            and rhs.ndim == 2 and precision is None and preferred_element_type is None):
        return matmul(lhs, rhs)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type)


def dense(
    features: int, names: tuple[str | None, str | None], dtype: Dtype, name: str,
    kernel_init: Callable | None = None,
) -> nn.Dense:
    """A dense layer whose kernel (lecun-normal unless `kernel_init`) carries the logical axes `names` (in, out)
    and whose bias carries `names[1]`."""
    return nn.Dense(
        features,
        dtype=dtype,
        kernel_init=partitioned(kernel_init or nn.initializers.lecun_normal(), names),
        bias_init=partitioned(nn.initializers.zeros, (names[1],)),
        dot_general=dense_dot_general,
        name=name,
    )


def _after(value: jax.Array, other: jax.Array) -> jax.Array:
    """`value` as a new array that exists only once `other` does (equal to `value` unless other's first entry is
    not finite), so that what a backward pass recomputes from it is computed there, from the incoming gradient
    on. XLA CPU expands optimisation barriers before its common-subexpression pass, which would otherwise merge
    the recomputation with the forward pass's identical expressions and keep their results alive from there."""
    return value + (other.reshape(-1)[0] * 0).astype(value.dtype)


def _normalise(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, dtype: Dtype):
    """LayerNorm over the last axis in float32 (flax's formula: variance as E[x²] - E[x]², clipped at 0), the output
    in `dtype`; also the statistics (mean, 1/std) the backward pass needs."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(axis=-1, keepdims=True)
    variance = jnp.maximum(0.0, jnp.square(x32).mean(axis=-1, keepdims=True) - jnp.square(mean))
    inv_std = jax.lax.rsqrt(variance + epsilon)
    y = (x32 - mean) * (inv_std * scale.astype(jnp.float32)) + bias.astype(jnp.float32)
    return y.astype(dtype), (mean, inv_std)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _lean_layer_norm(x, scale, bias, epsilon, dtype):
    return _normalise(x, scale, bias, epsilon, dtype)[0]


def _lean_layer_norm_forward(x, scale, bias, epsilon, dtype):
    y, (mean, inv_std) = _normalise(x, scale, bias, epsilon, dtype)
    return y, (x, mean, inv_std, scale, bias)


def _lean_layer_norm_backward(epsilon, dtype, saved, grads):
    x, mean, inv_std, scale, bias = saved
    grads = grads.astype(jnp.float32)
    inv_std, scale32 = _after(inv_std, grads), _after(scale.astype(jnp.float32), grads)
    normalised = (x.astype(jnp.float32) - mean) * inv_std
    scaled = grads * scale32
    x_grad = inv_std * (scaled - scaled.mean(axis=-1, keepdims=True)
                        - normalised * (scaled * normalised).mean(axis=-1, keepdims=True))
    tokens = tuple(range(x.ndim - 1))
    return (x_grad.astype(x.dtype), (grads * normalised).sum(axis=tokens).astype(scale.dtype),
            grads.sum(axis=tokens).astype(bias.dtype))


_lean_layer_norm.defvjp(_lean_layer_norm_forward, _lean_layer_norm_backward)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis with a learned `scale` and `bias`: flax's nn.LayerNorm's parameters (so
    checkpoints and imported weights are unchanged) and formula (statistics in float32, output in `dtype`).

    On the CPU backend its gradient is our own VJP (`_lean_layer_norm`): it keeps the input, which is alive anyway
    (the residual stream), and two per-token statistics, and recomputes the normalised input in the backward
    pass. Autodiff keeps three [tokens, width] arrays per LayerNorm, which XLA CPU's reduction fusions want
    materialised: the normalised input and the statistics and scale broadcast to full size. On the tiny CLIP
    (64 px, width 128, 4+4 layers, batch 128, fp32; this 2-core CPU) the train step's XLA temporaries fall from
    686 to 556 MiB and its time is 0.94x (one core) and 0.93x (2 threads), alternated in one process. Elsewhere
    it is plain autodiff (unmeasured on accelerators, where XLA fuses LayerNorm differently).
    """

    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        scale = self.param("scale", partitioned(nn.initializers.ones, ("embed",)), (width,))
        bias = self.param("bias", partitioned(nn.initializers.zeros, ("embed",)), (width,))
        if jax.default_backend() == "cpu":
            return _lean_layer_norm(x, scale, bias, self.epsilon, jnp.dtype(self.dtype))
        return _normalise(x, scale, bias, self.epsilon, self.dtype)[0]


def layer_norm(dtype: Dtype, name: str | None = None, epsilon: float = 1e-6) -> LayerNorm:
    """LayerNorm with logical axes; `epsilon` 1e-6 is flax's default, torch's (imported CLIP weights) is 1e-5."""
    return LayerNorm(epsilon=epsilon, dtype=dtype, name=name)


class MaskEmbedding(nn.Module):
    """Replaces the embeddings at masked positions with one learned vector: x [b, t, d], mask bool [b, t]."""

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        embedding = self.param("embedding", partitioned(nn.initializers.normal(stddev=0.02), ("embed",)),
                               (x.shape[-1],))
        return jnp.where(mask[..., None], embedding.astype(x.dtype), x)


# On the CPU backend the MLP's activation keeps only its input for the backward pass, which recomputes the rest:
# autodiff keeps the input, the output (which fc2 keeps anyway) and, for tanh GELU, the tanh, [tokens, mlp_dim]
# each. On the tiny CLIP (see LayerNorm) the step's XLA temporaries fall from 556 to 467 MiB (peak RSS from
# about 1.05 to 0.95 GiB) for 1.003x the time on one core and 1.01x on 2 threads.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lean_activation(activation: Callable, x: jax.Array) -> jax.Array:
    return activation(x)


def _lean_activation_forward(activation, x):
    return activation(x), x


def _lean_activation_backward(activation, x, grads):
    return jax.vjp(activation, _after(x, grads))[1](grads)


_lean_activation.defvjp(_lean_activation_forward, _lean_activation_backward)


# MLP activations by name (config.model.activation): "gelu" is flax's tanh approximation (our default);
# "gelu_exact" the erf form (torch's nn.GELU, open_clip); "quick_gelu" x·σ(1.702x) (OpenAI CLIP's checkpoints).
ACTIVATIONS = {
    "gelu": nn.gelu,
    "gelu_exact": lambda x: nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def activation_fn(name: str) -> Callable:
    if name not in ACTIVATIONS:
        raise ValueError(f"config.model.activation={name!r}; use one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class MlpBlock(nn.Module):
    """Two dense layers with an activation (ACTIVATIONS, GELU by default): [b, t, d] -> [b, t, mlp_dim] -> [b, t, d]."""

    mlp_dim: int
    dtype: Dtype = jnp.float32
    activation: str = "gelu"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        x = nn.Dense(
            self.mlp_dim,
            dtype=self.dtype,
            kernel_init=partitioned(nn.initializers.xavier_uniform(), ("embed", "mlp")),
            bias_init=partitioned(nn.initializers.zeros, ("mlp",)),
            dot_general=dense_dot_general,
            name="fc1",
        )(x)
        activation = activation_fn(self.activation)
        if jax.default_backend() == "cpu":
            x = _lean_activation(activation, x)
        else:
            x = activation(x)
        x = constrain(x, ("batch", "act_len", "act_mlp"))
        return nn.Dense(
            width,
            dtype=self.dtype,
            kernel_init=partitioned(nn.initializers.xavier_uniform(), ("mlp", "embed")),
            bias_init=partitioned(nn.initializers.zeros, ("embed",)),
            dot_general=dense_dot_general,
            name="fc2",
        )(x)


# config.model.attention: how jax.nn.dot_product_attention runs. "xla": XLA's fused path with a boolean mask
# (every backend); "cudnn": cuDNN's flash attention (NVIDIA GPUs; bfloat16/float16, head dim a multiple of 8, padding
# as sequence lengths and causality as a flag instead of a mask); "auto": cuDNN where those hold, XLA elsewhere.
ATTENTION = ("xla", "cudnn", "auto")


def attention_implementation(choice: str, dtype: Dtype, head_dim: int, mask: jax.Array | None) -> str:
    """The implementation `choice` (ATTENTION) resolves to for these inputs: "xla" or "cudnn"."""
    if choice not in ATTENTION:
        raise ValueError(f"config.model.attention={choice!r}; use one of {', '.join(ATTENTION)}")
    fits = (jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0
            and (mask is None or mask.ndim == 2))
    if choice == "cudnn" and not fits:
        raise ValueError(f"config.model.attention='cudnn' needs bfloat16/float16 (model dtype {jnp.dtype(dtype)}), "
                         f"a head dim that is a multiple of 8 (got {head_dim}) and a padding mask of shape [b, t]; "
                         "use 'auto' to fall back to XLA where these do not hold")
    if choice == "auto":
        return "cudnn" if fits and jax.default_backend() == "gpu" else "xla"
    return choice


def attention_arguments(mask: jax.Array | None, causal: bool, as_lengths: bool, length: int) -> dict:
    """jax.nn.dot_product_attention's masking arguments for a padding `mask` ([b, t] True at real tokens, padding
    at the end; or [b, t_q, t_k] for XLA only) and `causal`: a boolean mask (XLA) or, `as_lengths`, key sequence
    lengths and is_causal (what cuDNN takes; the same attention for end-padded masks)."""
    if as_lengths:
        lengths = None if mask is None else mask.sum(axis=-1).astype(jnp.int32)
        return {"key_value_seq_lengths": lengths, "is_causal": causal}
    # [b, 1, 1, t_k] (broadcast over heads and queries) or [b, 1, t_q, t_k] (broadcast over heads)
    attend = None if mask is None else mask[:, None, None, :] if mask.ndim == 2 else mask[:, None]
    if causal:
        lower = jnp.tril(jnp.ones((length, length), bool))[None, None]
        attend = lower if attend is None else attend & lower
    return {"mask": attend}


def softmax_attention(query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Scaled dot-product attention in the heads-major layout: query [b, h, t_q, k], key and value [b, h, t_k, k] ->
    [b, h, t_q, k]. `mask` (broadcastable to [b, h, t_q, t_k]) is True where a query may attend to a key; a query
    with no key to attend to attends uniformly to all of them (jax.nn.dot_product_attention's convention).

    The same attention as jax.nn.dot_product_attention's XLA path (float32 logits and softmax), arranged for the
    CPU: the 1/sqrt(k) scale rides in the exponent's elementwise fusion instead of a pass over the logits, and the
    softmax's normaliser divides the [t_q, k] output instead of the [t_q, t_k] weights, so the backward pass
    reduces over k (the output's rows) where the softmax's own gradient reduces over t_k. Measured on this
    2-core CPU at [128, 4, 65, 32] with its projections, forward and backward: 0.80x the time of
    jax.nn.dot_product_attention in the [b, t, h, k] layout.
    """
    weights, total = _attention_weights(query, key, mask)
    out = jnp.einsum("bhqs,bhsk->bhqk", weights.astype(value.dtype), value, preferred_element_type=jnp.float32)
    return (out / total).astype(value.dtype)


def _attention_weights(query: jax.Array, key: jax.Array, mask: jax.Array | None):
    """softmax_attention's unnormalised weights exp((logits - max) / sqrt(k)) [b, h, t_q, t_k] and their row sums
    [b, h, t_q, 1], in float32."""
    scale = query.shape[-1] ** -0.5
    logits = jnp.einsum("bhqk,bhsk->bhqs", query, key, preferred_element_type=jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    peak = jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))  # softmax is shift-invariant
    weights = jnp.exp((logits - peak) * scale)
    return weights, weights.sum(axis=-1, keepdims=True)


def _transposed(x: jax.Array) -> jax.Array:
    """x [..., m, n] as a materialised [..., n, m] that XLA's simplifier cannot fold into the dot that takes it."""
    return jax.lax.optimization_barrier(jnp.swapaxes(x, -1, -2))


@jax.custom_vjp
def lean_attention(query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """softmax_attention with our own VJP, for the CPU backend: query [b, h, t_q, k], key and value [b, h, t_k, k]
    -> [b, t_q, h, k] (the layout the output projection takes). The same values; the backward pass keeps the
    output (which the output projection keeps anyway) instead of its unnormalised form, and computes the key and
    value gradients, which contract over queries, transposed (the narrow operand transposed first, as in
    `_weight_gradient`), which XLA CPU runs through YNNPACK instead of Eigen's slower path. On the tiny CLIP (see
    LayerNorm) the train step takes 0.98x the time on one core and 0.97x on 2 threads, alternated in one process,
    and XLA's temporaries fall from 467 to 458 MiB."""
    return _lean_attention_forward(query, key, value, mask)[0]


def _lean_attention_forward(query, key, value, mask):
    weights, total = _attention_weights(query, key, mask)
    out = jnp.einsum("bhqs,bhsk->bhqk", weights.astype(value.dtype), value, preferred_element_type=jnp.float32)
    out = (out / total).astype(value.dtype).transpose(0, 2, 1, 3)  # [b, t_q, h, k]
    return out, (query, key, value, mask, weights, total, out)


def _lean_attention_backward(saved, grads):
    query, key, value, mask, weights, total, out = saved
    scale = query.shape[-1] ** -0.5
    grads = grads.astype(jnp.float32)  # [b, t_q, h, k]
    total = _after(total, grads)
    # softmax's own term: each query's (gradient . output), in the output's layout
    along_output = (grads * out.astype(jnp.float32)).sum(axis=-1).transpose(0, 2, 1)[..., None]
    normalised_grads = grads.transpose(0, 2, 1, 3) / total  # [b, h, t_q, k]
    weights_grad = jnp.einsum("bhqk,bhsk->bhqs", normalised_grads.astype(value.dtype), value,
                              preferred_element_type=jnp.float32)
    logits_grad = weights * (weights_grad - along_output / total) * scale
    if mask is not None:
        logits_grad = jnp.where(mask, logits_grad, 0.0)
    query_grad = jnp.einsum("bhqs,bhsk->bhqk", logits_grad.astype(key.dtype), key, preferred_element_type=jnp.float32)
    # the key and value gradients contract over queries, which lead the weights: computed transposed ([b, h, k, t_k],
    # the narrow operand transposed first), the form XLA CPU runs fastest, as in _weight_gradient
    key_grad = jnp.einsum("bhkq,bhqs->bhks", _transposed(query), logits_grad.astype(query.dtype),
                          preferred_element_type=jnp.float32)
    value_grad = jnp.einsum("bhkq,bhqs->bhks", _transposed(normalised_grads.astype(value.dtype)),
                            weights.astype(value.dtype), preferred_element_type=jnp.float32)
    return (query_grad.astype(query.dtype), _transposed(jax.lax.optimization_barrier(key_grad)).astype(key.dtype),
            _transposed(jax.lax.optimization_barrier(value_grad)).astype(value.dtype), None)


lean_attention.defvjp(_lean_attention_forward, _lean_attention_backward)


class SelfAttention(nn.Module):
    """Multi-head self-attention; `mask` [b, t] is True at tokens that may be attended to (padding at the end), or
    [b, t_q, t_k] per query; `causal` adds a causal mask (CLIP's text tower).

    The kernels are [embed, heads, kv] parameters (flax's DenseGeneral initialises a flattened kernel, which
    cannot carry 3-axis logical partitioning); each projection is one product over the kernel viewed as
    [embed, heads * kv] (`matmul`, with the bias inside for the query, key and value).
    `attention` picks the kernel (ATTENTION): cuDNN through jax.nn.dot_product_attention in the [b, t, h, k] layout
    the projections give, XLA through `softmax_attention` in the [b, h, t, k] layout (the projections' outputs
    transposed), on the CPU backend through `lean_attention` (the same attention with our own VJP).
    """

    heads: int
    dtype: Dtype = jnp.float32
    causal: bool = False
    attention: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        width = x.shape[-1]
        if width % self.heads:
            raise ValueError(f"width {width} is not divisible by heads {self.heads}; fix config.model.*.heads")
        head_dim = width // self.heads
        implementation = attention_implementation(self.attention, self.dtype, head_dim, mask)
        # the activations' layout: cuDNN takes [b, t, h, k]; our XLA attention [b, h, t, k]
        layout, names = (("bthk", ("batch", "act_len", "act_heads", "act_kv")) if implementation == "cudnn"
                         else ("bhtk", ("batch", "act_heads", "act_len", "act_kv")))
        init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=0, out_axis=(1, 2))

        def project(name: str) -> jax.Array:
            kernel = self.param(name, partitioned(init, ("embed", "heads", "kv")), (width, self.heads, head_dim))
            bias = self.param(f"{name}_bias", partitioned(nn.initializers.zeros, ("heads", "kv")),
                              (self.heads, head_dim))
            y = matmul(x.astype(self.dtype), kernel.reshape(width, width).astype(self.dtype),
                       bias.reshape(width).astype(self.dtype))
            y = y.reshape(*x.shape[:2], self.heads, head_dim)
            return constrain(y if layout == "bthk" else y.transpose(0, 2, 1, 3), names)

        query, key, value = project("query"), project("key"), project("value")
        masking = attention_arguments(mask, self.causal, implementation == "cudnn", x.shape[1])
        if implementation == "cudnn":
            y = jax.nn.dot_product_attention(query, key, value, **masking, implementation="cudnn")
        elif jax.default_backend() == "cpu":
            y = lean_attention(query, key, value, masking["mask"])  # gives [b, t, h, k]
        else:
            y = softmax_attention(query, key, value, masking["mask"]).transpose(0, 2, 1, 3)
        out_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1), out_axis=2)
        kernel = self.param("out", partitioned(out_init, ("heads", "kv", "embed")), (self.heads, head_dim, width))
        bias = self.param("out_bias", partitioned(nn.initializers.zeros, ("embed",)), (width,))
        y = matmul(y.reshape(*x.shape[:2], width), kernel.reshape(width, width).astype(self.dtype))
        return y + bias.astype(self.dtype)


class EncoderBlock(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    activation: str = "gelu"
    layer_norm_eps: float = 1e-6
    causal: bool = False
    attention: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        eps = self.layer_norm_eps
        attend = SelfAttention(self.heads, self.dtype, self.causal, self.attention, name="attention")
        x = x + attend(layer_norm(self.dtype, "ln1", eps)(x), mask)
        x = constrain(x, ("batch", "act_len", "act_embed"))
        x = x + MlpBlock(self.mlp_dim, self.dtype, self.activation, name="mlp")(layer_norm(self.dtype, "ln2", eps)(x))
        return constrain(x, ("batch", "act_len", "act_embed"))


# config.model.remat: what a block keeps for the backward pass; the rest is recomputed (jax.checkpoint policies).
REMAT_POLICIES = {
    "none": None,  # no rematerialisation: every activation kept (fastest, most memory)
    "full": jax.checkpoint_policies.nothing_saveable,  # only the block's input kept, everything recomputed
    "dots": jax.checkpoint_policies.dots_saveable,  # matmul outputs kept, elementwise work recomputed
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # weight matmuls kept, attention not
}


def remat_policy(remat: bool | str) -> tuple[bool, Callable | None]:
    """(whether to rematerialise, the jax.checkpoint policy) of config.model.remat: False/"none", True/"full",
    "dots" or "dots_no_batch"; anything else is a ValueError naming the choices."""
    name = {False: "none", True: "full"}.get(remat, remat) if isinstance(remat, bool) else remat
    if name not in REMAT_POLICIES:
        raise ValueError(f"config.model.remat={remat!r}; use one of {', '.join(REMAT_POLICIES)} (or True/False)")
    return name != "none", REMAT_POLICIES[name]


class _ScannedBlock(EncoderBlock):
    """An EncoderBlock with nn.scan's signature: (carry, broadcast mask) -> (carry, no output)."""

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None):
        return super().__call__(x, mask), None


class Encoder(nn.Module):
    """A stack of `depth` pre-LN blocks and a final LayerNorm.

    `remat` (REMAT_POLICIES) recomputes block activations in the backward pass. `scan` runs the blocks as one
    `nn.scan` over a stacked parameter set ("blocks", a leading "layers" axis) instead of `depth` unrolled copies
    ("block0", "block1", ...): one block is traced and compiled whatever the depth; with the same parameters
    (`stack_blocks`) the outputs equal the unrolled stack's.
    """

    depth: int
    heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    remat: bool | str = False
    activation: str = "gelu"
    layer_norm_eps: float = 1e-6
    scan: bool = False
    causal: bool = False  # causal self-attention on top of `mask`
    attention: str = "xla"  # ATTENTION

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        rematerialise, policy = remat_policy(self.remat)
        settings = (self.heads, self.mlp_dim, self.dtype, self.activation, self.layer_norm_eps, self.causal,
                    self.attention)
        if self.scan:
            body = nn.remat(_ScannedBlock, policy=policy, prevent_cse=False) if rematerialise else _ScannedBlock
            blocks = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=(nn.broadcast,),
                             length=self.depth, metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = blocks(*settings, name="blocks")(x, mask)
        else:
            block_cls = nn.remat(EncoderBlock, policy=policy) if rematerialise else EncoderBlock
            for i in range(self.depth):
                x = block_cls(*settings, name=f"block{i}")(x, mask)
        return layer_norm(self.dtype, "ln_final", self.layer_norm_eps)(x)


def stack_blocks(encoder: dict, depth: int) -> dict:
    """An unrolled Encoder's parameters ("block0" ... "block{depth-1}") in the scanned layout ("blocks", each leaf
    stacked on a new leading axis); other entries (ln_final) unchanged."""
    blocks = [encoder[f"block{i}"] for i in range(depth)]
    rest = {name: value for name, value in encoder.items() if not name.startswith("block")}
    return rest | {"blocks": jax.tree.map(lambda *leaves: jnp.stack(leaves), *blocks)}


def unstack_blocks(encoder: dict) -> dict:
    """The scanned layout back to the unrolled one (`stack_blocks`'s inverse)."""
    stacked = encoder["blocks"]
    depth = jax.tree.leaves(stacked)[0].shape[0]
    rest = {name: value for name, value in encoder.items() if name != "blocks"}
    return rest | {f"block{i}": jax.tree.map(lambda leaf, i=i: leaf[i], stacked) for i in range(depth)}
