"""Transformer building blocks with logical axis names on every parameter and activation.

Parameters are float32; computation runs in `dtype` (bfloat16 on accelerators, float32 in CPU tests).
"""

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp_jax.models import kernels
from vlp_jax.models.kernels import Dtype


def partitioned(init: Callable, names: tuple[str | None, ...]) -> Callable:
    """An initializer whose parameter carries logical axis names (mapped to the mesh in parallel.py)."""
    return nn.with_logical_partitioning(init, names)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Sharding hint for an activation; a no-op outside a mesh context."""
    return nn.with_logical_constraint(x, names)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """lax.dot_general for nn.Dense (its `dot_general` argument): `kernels.matmul` for the product nn.Dense makes (the
    input's last axis with the kernel's first, no batch axes, default precision), lax.dot_general otherwise."""
    (contract_lhs, contract_rhs), batch = dimension_numbers
    if (tuple(contract_lhs) == (lhs.ndim - 1,) and tuple(contract_rhs) == (0,) and batch == ((), ())
            and rhs.ndim == 2 and precision is None and preferred_element_type is None):
        return kernels.matmul(lhs, rhs)
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


class LayerNorm(nn.Module):
    """LayerNorm over the last axis with a learned `scale` and `bias`: flax's nn.LayerNorm's parameters (so
    checkpoints and imported weights are unchanged) and formula (statistics in float32, output in `dtype`).

    Its kernel is `kernels.layer_norm` (on the CPU backend with our own VJP, which keeps less).
    """

    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        scale = self.param("scale", partitioned(nn.initializers.ones, ("embed",)), (width,))
        bias = self.param("bias", partitioned(nn.initializers.zeros, ("embed",)), (width,))
        return kernels.layer_norm(x, scale, bias, self.epsilon, self.dtype)


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


# MLP activations by name (config.model.activation): "gelu" is flax's tanh approximation (our default);
# "gelu_exact" the erf form (torch's nn.GELU, open_clip); "quick_gelu" x·σ(1.702x) (OpenAI CLIP's checkpoints).
ACTIVATIONS = {
    "gelu": kernels.gelu_tanh,
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
        x = kernels.activate(activation, x)
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


class SelfAttention(nn.Module):
    """Multi-head self-attention; `mask` [b, t] is True at tokens that may be attended to (padding at the end), or
    [b, t_q, t_k] per query; `causal` adds a causal mask (CLIP's text tower).

    The kernels are [embed, heads, kv] parameters (flax's DenseGeneral initialises a flattened kernel, which
    cannot carry 3-axis logical partitioning); each projection is one product over the kernel viewed as
    [embed, heads * kv] (`kernels.matmul`, with the bias inside for the query, key and value).
    `attention` picks the kernel (ATTENTION): cuDNN through jax.nn.dot_product_attention in the [b, t, h, k] layout
    the projections give, XLA through `kernels.attention` in the [b, h, t, k] layout (the projections' outputs
    transposed; on the CPU backend with our own VJP).
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
            y = kernels.matmul(x.astype(self.dtype), kernel.reshape(width, width).astype(self.dtype),
                               bias.reshape(width).astype(self.dtype))
            y = y.reshape(*x.shape[:2], self.heads, head_dim)
            return constrain(y if layout == "bthk" else y.transpose(0, 2, 1, 3), names)

        query, key, value = project("query"), project("key"), project("value")
        masking = attention_arguments(mask, self.causal, implementation == "cudnn", x.shape[1])
        if implementation == "cudnn":
            y = jax.nn.dot_product_attention(query, key, value, **masking, implementation="cudnn")
        else:
            y = kernels.attention(query, key, value, masking["mask"])  # gives [b, t, h, k]
        out_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1), out_axis=2)
        kernel = self.param("out", partitioned(out_init, ("heads", "kv", "embed")), (self.heads, head_dim, width))
        bias = self.param("out_bias", partitioned(nn.initializers.zeros, ("embed",)), (width,))
        y = kernels.matmul(y.reshape(*x.shape[:2], width), kernel.reshape(width, width).astype(self.dtype))
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
