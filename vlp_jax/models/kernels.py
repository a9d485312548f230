"""The numerical kernels the transformer layers are made of (layers.py holds the flax modules): a dense layer's
product over many tokens, LayerNorm, the MLP's activation and softmax attention.

Each has the same values and gradients on every backend. On the CPU backend each has its own VJP, arranged for XLA
CPU: what the backward pass keeps, what it recomputes and the operand layouts of its products. Elsewhere they are
plain autodiff (unmeasured on accelerators, where XLA fuses and lays out differently). The figures in the docstrings
are the tiny CLIP's train step (64 px, width 128, 4+4 layers, batch 128, fp32) on our 2-core CPU, each change
measured alone with both versions compiled in one process and alternated; the step's "XLA temporaries" are its
compiled memory analysis' temp bytes.

On the CPU backend the step's dots run on YNNPACK or on XLA's own path, whichever is faster for the process's core
count (`cpu_dots`); the attention's backward pass takes that library's faster form, and `compiler_options` gives
the step's compile the matching XLA option.
"""

import functools
import itertools
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp

Dtype = jnp.dtype | str


def _on_cpu() -> bool:
    return jax.default_backend() == "cpu"


# Which library runs the CPU train step's matrix products: "ynn" (YNNPACK, XLA CPU's default), "xla" (XLA's own dot
# path, Eigen) or "auto" (the default: "xla" where the process has one schedulable core, "ynn" elsewhere).
CPU_DOTS_ENV = "VLP_JAX_CPU_DOTS"
CPU_DOTS = ("auto", "ynn", "xla")
# XLA CPU's option that leaves dots to XLA's own path: YNNPACK then takes only reductions
_XLA_DOTS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}
# How many batch slices the CPU attention runs as: "auto" (the default; `attention_parts`) or a whole number
CPU_ATTENTION_PARTS_ENV = "VLP_JAX_CPU_ATTENTION_PARTS"


def schedulable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, e.g. under `taskset`), else the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_dots(cores: int | None = None) -> str:
    """The library for the CPU step's dots, "ynn" or "xla": VLP_JAX_CPU_DOTS, where "auto" (the default) picks
    "xla" on one schedulable core (`cores`, by default this process's) and "ynn" on more.

    Single-threaded, XLA's own dots (Eigen) run the dense token products ([tokens, width] @ [width, mlp]) about 8%
    faster than YNNPACK, and the attention's small batched products (one Eigen call per batch entry and head) about
    half as fast; with two or more threads YNNPACK's are faster. The attention's backward pass takes the form each
    library runs faster (`_lean_attention_backward`), so the choice is made when the step is traced: `compile_step`
    compiles with the matching `compiler_options`. The tiny CLIP step (64 px, width 128, 4+4 layers, batch 128,
    fp32), both versions compiled in one process and alternated on this 2-core VM: one core ("taskset -c 1")
    0.969-0.979x the time with "xla" (medians of 8 rounds); 2 threads 1.10x (6 rounds), hence "ynn" there."""
    choice = os.environ.get(CPU_DOTS_ENV, "auto")
    if choice not in CPU_DOTS:
        raise ValueError(f"{CPU_DOTS_ENV}={choice!r}; use one of {', '.join(CPU_DOTS)} (or leave it unset)")
    if choice != "auto":
        return choice
    return "xla" if (schedulable_cores() if cores is None else cores) == 1 else "ynn"


def compiler_options() -> dict[str, str]:
    """XLA options for compiling the train step here: on the CPU backend, where `cpu_dots` picks "xla", the option
    that keeps dots out of YNNPACK; nothing elsewhere."""
    return dict(_XLA_DOTS) if _on_cpu() and cpu_dots() == "xla" else {}


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
    tiny CLIP the step takes 0.94-0.96x the time with this than without on one core and 0.91-0.93x on 2 threads.
    The MLP's and the output projection's biases, whose gradients need no transpose, measured level and stay
    outside (nn.Dense's and SelfAttention's own add)."""
    if not _on_cpu() or inputs.ndim < 2:
        product = inputs @ kernel
        return product if bias is None else product + bias
    return _token_matmul(inputs, kernel, bias)


def _after(value: jax.Array, other: jax.Array) -> jax.Array:
    """`value` as a new array that exists only once `other` does (equal to `value` unless other's first entry is
    not finite), so that what a backward pass recomputes from it is computed there, from the incoming gradient
    on. XLA CPU expands optimisation barriers before its common-subexpression pass, which would otherwise merge
    the recomputation with the forward pass's identical expressions and keep their results alive from there."""
    return value + (other.reshape(-1)[0] * 0).astype(value.dtype)


def normalise(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, dtype: Dtype):
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
    return normalise(x, scale, bias, epsilon, dtype)[0]


def _lean_layer_norm_forward(x, scale, bias, epsilon, dtype):
    y, (mean, inv_std) = normalise(x, scale, bias, epsilon, dtype)
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


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, dtype: Dtype) -> jax.Array:
    """LayerNorm of x over its last axis (`normalise`), output in `dtype`.

    On the CPU backend its gradient is our own VJP (`_lean_layer_norm`): it keeps the input, which is alive anyway
    (the residual stream), and two per-token statistics, and recomputes the normalised input in the backward
    pass. Autodiff keeps three [tokens, width] arrays per LayerNorm, which XLA CPU's reduction fusions want
    materialised: the normalised input and the statistics and scale broadcast to full size. On the tiny CLIP the
    step's XLA temporaries fall from 686 to 556 MiB and its time is 0.94x (one core) and 0.93x (2 threads).
    """
    if _on_cpu():
        return _lean_layer_norm(x, scale, bias, epsilon, jnp.dtype(dtype))
    return normalise(x, scale, bias, epsilon, dtype)[0]


_SQRT_2_OVER_PI = 0.7978845608028654
_CUBIC = 0.044715 * _SQRT_2_OVER_PI


def gelu_tanh(x: jax.Array) -> jax.Array:
    """GELU's tanh approximation x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x³))) (jax.nn.gelu's default, flax's
    nn.gelu), written as x (1/2 + tanh(x (a + b x²))/2): the same function (values within float32 rounding of
    jax.nn.gelu's) in fewer operations. With its derivative written out for the backward pass
    (`_gelu_tanh_derivative`, one tanh), the tiny CLIP's step takes 0.993x the time on one core and 0.991x on 2
    threads (8 rounds each) than with jax.nn.gelu and autodiff's derivative."""
    return x * (0.5 + 0.5 * _gelu_tanh_inner(x))


def _gelu_tanh_inner(x: jax.Array) -> jax.Array:
    """tanh(x (a + b x²)), a = sqrt(2/pi), b = 0.044715 a."""
    return jnp.tanh(x * (_SQRT_2_OVER_PI + _CUBIC * x * x))


def _gelu_tanh_derivative(x: jax.Array) -> jax.Array:
    """d gelu_tanh / dx = (1 + t)/2 + x (1 - t²) (a + 3 b x²)/2 with t = tanh(x (a + b x²))."""
    t = _gelu_tanh_inner(x)
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * (_SQRT_2_OVER_PI + 3 * _CUBIC * x * x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lean_activation(activation: Callable, x: jax.Array) -> jax.Array:
    return activation(x)


def _lean_activation_forward(activation, x):
    return activation(x), x


def _lean_activation_backward(activation, x, grads):
    x = _after(x, grads)
    if activation is gelu_tanh:
        return (grads * _gelu_tanh_derivative(x),)
    return jax.vjp(activation, x)[1](grads)


_lean_activation.defvjp(_lean_activation_forward, _lean_activation_backward)


def activate(activation: Callable, x: jax.Array) -> jax.Array:
    """activation(x) for the MLP. On the CPU backend the backward pass keeps only x and recomputes the rest
    (`_lean_activation`): autodiff keeps the input, the output (which the next layer keeps anyway) and, for tanh
    GELU, the tanh, [tokens, mlp_dim] each. On the tiny CLIP the step's XLA temporaries fall from 556 to 467 MiB
    (peak RSS from about 1.05 to 0.95 GiB) for 1.003x the time on one core and 1.01x on 2 threads."""
    return _lean_activation(activation, x) if _on_cpu() else activation(x)


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
    value gradients, which contract over queries, in the form the CPU dots' library (`cpu_dots`) runs faster:
    transposed for YNNPACK (the narrow operand transposed first, as in `_weight_gradient`), plain for XLA's own
    dots. On the tiny CLIP with YNNPACK the train step takes 0.98x the time on one core and 0.97x on 2 threads
    against autodiff's, and XLA's temporaries fall from 467 to 458 MiB."""
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
    # The key and value gradients contract over queries, which lead the weights. XLA's own batched dots (cpu_dots
    # "xla") run that plain form faster (the step 0.987x the time on one core); YNNPACK runs them faster computed
    # transposed ([b, h, k, t_k], the narrow operand transposed first), as in _weight_gradient.
    if cpu_dots() == "xla":
        key_grad = jnp.einsum("bhqs,bhqk->bhsk", logits_grad.astype(query.dtype), query,
                              preferred_element_type=jnp.float32)
        value_grad = jnp.einsum("bhqs,bhqk->bhsk", weights.astype(value.dtype), normalised_grads.astype(value.dtype),
                                preferred_element_type=jnp.float32)
    else:
        key_grad = _transposed(jax.lax.optimization_barrier(jnp.einsum(
            "bhkq,bhqs->bhks", _transposed(query), logits_grad.astype(query.dtype),
            preferred_element_type=jnp.float32)))
        value_grad = _transposed(jax.lax.optimization_barrier(jnp.einsum(
            "bhkq,bhqs->bhks", _transposed(normalised_grads.astype(value.dtype)), weights.astype(value.dtype),
            preferred_element_type=jnp.float32)))
    return query_grad.astype(query.dtype), key_grad.astype(key.dtype), value_grad.astype(value.dtype), None


lean_attention.defvjp(_lean_attention_forward, _lean_attention_backward)


def attention(query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """softmax_attention of heads-major inputs (query [b, h, t_q, k], key and value [b, h, t_k, k]) in the layout
    the output projection takes, [b, t_q, h, k]: on the CPU backend through `lean_attention` (our VJP), in
    `attention_parts` slices of the batch."""
    if not _on_cpu():
        return softmax_attention(query, key, value, mask).transpose(0, 2, 1, 3)
    return split_attention(query, key, value, mask, attention_parts(query.shape[0]))


def attention_parts(batch: int, cores: int | None = None, devices: int | None = None) -> int:
    """How many slices of the batch the CPU attention runs as (`split_attention`): VLP_JAX_CPU_ATTENTION_PARTS,
    where "auto" (the default) picks 2 where the step's dots go to YNNPACK (`cpu_dots`, two or more schedulable
    `cores`) and the process has one device (`devices`, by default jax.device_count()), else 1.

    YNNPACK spreads the attention's small batched dots over two threads poorly (1.08-1.45x the one-thread speed,
    where the dense token products reach 1.9x); two independent halves let XLA's runtime run one per thread. The
    tiny CLIP step (64 px, width 128, 4+4 layers, batch 128, fp32) on this 2-core VM, each version compiled in one
    process and alternated (`bench variants`): 0.970-0.986x the time in two parts (medians of 30, 40 and 100
    rounds' ratios; the quartiles straddle 1), 0.971x in four; on one core with XLA's dots, level (1.005x), hence
    one part there. Ours, measured on 2 cores only; with several devices the batch is sharded and a global slice
    would move data between them, hence one part."""
    choice = os.environ.get(CPU_ATTENTION_PARTS_ENV, "auto")
    if choice != "auto":
        if not choice.isdigit() or int(choice) < 1:
            raise ValueError(f"{CPU_ATTENTION_PARTS_ENV}={choice!r}; use auto or a whole number >= 1 (or leave it "
                             "unset)")
        return min(int(choice), batch)
    devices = jax.device_count() if devices is None else devices
    return 2 if batch >= 2 and devices == 1 and cpu_dots(cores) == "ynn" else 1


def split_attention(query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array | None,
                    parts: int) -> jax.Array:
    """`lean_attention` run on `parts` consecutive slices of the batch (as equal as the batch allows), the outputs
    concatenated: the same values and gradients, as independent programs XLA's CPU runtime may run at once. A mask
    with a batch of 1 broadcasts to every slice."""
    batch = query.shape[0]
    if parts <= 1:
        return lean_attention(query, key, value, mask)
    bounds = [batch * i // parts for i in range(parts + 1)]

    def piece(x, start, stop):
        return x if x is None or x.shape[0] != batch else x[start:stop]

    return jnp.concatenate([lean_attention(*(piece(x, start, stop) for x in (query, key, value, mask)))
                            for start, stop in itertools.pairwise(bounds) if stop > start])
