"""The visual tokenizer that COTS's masked vision modelling predicts: a VQ-VAE with an EMA codebook.

[ours] The COTS paper names "a VAE-style visual tokenizer" but not its design; everything here is our choice:

- The encoder maps an image to one code vector per ViT patch: the pixels of each patch (cut exactly as the
  image tower cuts them, for any patch size, 14 included) through a dense layer, residual blocks of 3x3
  convolutions on the patch grid (context from neighbouring patches), a dense projection to the code dimension.
  The decoder mirrors it and paints each patch's pixels with a two-layer MLP. Patch-level dense layers instead
  of full-resolution convolutions keep the tiny preset fast on a CPU.
- The codebook is not a parameter: it is `embed_sum / cluster_size`, two exponential moving averages of the
  encoder outputs assigned to each code and of their number (van den Oord et al. 2017, appendix; Razavi et al.
  2019). They live in the method's `extra` and are updated inside the jitted step; gradients reach the encoder
  through the straight-through estimator and the commitment loss.
- Dead codes: a code whose EMA count falls below `dead_code_threshold` (assignments per step over the global
  batch) is re-seeded with a random encoder output of the current batch and its count reset to the threshold.
  The codebook starts at zero with every count at the threshold, so the first step assigns everything to code 0
  and re-seeds all other codes from the data (a data-dependent initialisation). Every count therefore stays at
  or above the threshold, which keeps the division that defines the codebook well-defined.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp_jax.models.layers import Dtype, dense, partitioned
from vlp_jax.models.vit import normalize_images

Codebook = dict[str, jax.Array]  # {"cluster_size": float32 [K], "embed_sum": float32 [K, d]}


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """[b, H, W, c] -> [b, H/p, W/p, p*p*c]: the pixels of each ViT patch, row-major over the patch grid."""
    b, height, width, channels = images.shape
    x = images.reshape(b, height // patch_size, patch_size, width // patch_size, patch_size, channels)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, height // patch_size, width // patch_size, -1)


def unpatchify(patches: jax.Array, patch_size: int) -> jax.Array:
    """The inverse of `patchify`: [b, h, w, p*p*c] -> [b, h*p, w*p, c]."""
    b, rows, cols, features = patches.shape
    channels = features // patch_size**2
    x = patches.reshape(b, rows, cols, patch_size, patch_size, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, rows * patch_size, cols * patch_size, channels)


class ResidualBlock(nn.Module):
    """x + 1x1(relu(3x3(relu(x)))) on the patch grid (the VQ-VAE residual block): context from neighbours."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        y = nn.Conv(
            width,
            (3, 3),
            padding="SAME",
            dtype=self.dtype,
            kernel_init=partitioned(nn.initializers.lecun_normal(), (None, None, "embed", "mlp")),
            bias_init=partitioned(nn.initializers.zeros, ("mlp",)),
            name="conv3x3",
        )(nn.relu(x))
        return x + dense(width, ("mlp", "embed"), self.dtype, "conv1x1")(nn.relu(y))


class VQEncoder(nn.Module):
    """images uint8/float [b, H, W, 3] -> code vectors float32 [b, H/patch, W/patch, code_dim]."""

    patch_size: int
    code_dim: int
    width: int
    res_blocks: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = patchify(normalize_images(images).astype(self.dtype), self.patch_size)  # [b, h, w, p*p*3]
        x = dense(self.width, (None, "embed"), self.dtype, "embed_patch")(x)
        for i in range(self.res_blocks):
            x = ResidualBlock(self.dtype, name=f"res{i}")(x)
        x = dense(self.code_dim, ("embed", None), self.dtype, "to_code")(nn.relu(x))
        return x.astype(jnp.float32)


class VQDecoder(nn.Module):
    """code vectors [b, h, w, code_dim] -> images float32 [b, h*patch, w*patch, 3] in the [-1, 1] pixel scale."""

    patch_size: int
    width: int
    res_blocks: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, codes: jax.Array) -> jax.Array:
        x = dense(self.width, (None, "embed"), self.dtype, "from_code")(codes.astype(self.dtype))
        for i in range(self.res_blocks):
            x = ResidualBlock(self.dtype, name=f"res{i}")(x)
        x = dense(self.width, ("embed", "mlp"), self.dtype, "hidden")(nn.relu(x))
        x = dense(self.patch_size**2 * 3, ("mlp", None), self.dtype, "to_pixels")(nn.relu(x))
        return unpatchify(x, self.patch_size).astype(jnp.float32)


class VQVAE(nn.Module):
    """Encoder and decoder of the tokenizer; quantisation (below) sits between them and is not a module."""

    patch_size: int
    code_dim: int
    width: int
    res_blocks: int
    dtype: Dtype = jnp.float32

    def setup(self):
        self.encoder = VQEncoder(self.patch_size, self.code_dim, self.width, self.res_blocks, self.dtype)
        self.decoder = VQDecoder(self.patch_size, self.width, self.res_blocks, self.dtype)

    def __call__(self, images: jax.Array) -> jax.Array:
        """Unquantised autoencoding; used to create every parameter at init."""
        return self.decode(self.encode(images))

    def encode(self, images: jax.Array) -> jax.Array:
        return self.encoder(images)

    def decode(self, quantized: jax.Array) -> jax.Array:
        return self.decoder(quantized)


def init_codebook(num_codes: int, code_dim: int, dead_code_threshold: float) -> Codebook:
    """Zero vectors, each counted `dead_code_threshold` times: the first step re-seeds every unused code."""
    return {
        "cluster_size": jnp.full((num_codes,), dead_code_threshold, jnp.float32),
        "embed_sum": jnp.zeros((num_codes, code_dim), jnp.float32),
    }


def codebook_vectors(codebook: Codebook) -> jax.Array:
    """The code vectors [K, d]: the EMA mean of the encoder outputs assigned to each code."""
    return codebook["embed_sum"] / codebook["cluster_size"][:, None]


def nearest_codes(vectors: jax.Array, codes: jax.Array) -> jax.Array:
    """Index of the nearest code (squared Euclidean) for each of `vectors` [n, d] among `codes` [K, d]: int32 [n]."""
    distances = (
        jnp.sum(vectors**2, axis=-1, keepdims=True)
        - 2.0 * vectors @ codes.T
        + jnp.sum(codes**2, axis=-1)[None, :]
    )  # [n, K]
    return jnp.argmin(distances, axis=-1).astype(jnp.int32)


def quantize(vectors: jax.Array, codebook: Codebook) -> tuple[jax.Array, jax.Array]:
    """Nearest code vectors with the straight-through gradient, and their indices.

    vectors float32 [..., d] -> (quantized [..., d] whose gradient passes to `vectors` unchanged, codes int32 [...]).
    """
    code_vectors = codebook_vectors(codebook)
    codes = nearest_codes(vectors.reshape(-1, vectors.shape[-1]), code_vectors).reshape(vectors.shape[:-1])
    selected = code_vectors[codes]
    return vectors + jax.lax.stop_gradient(selected - vectors), codes


def code_counts(codes: jax.Array, num_codes: int) -> jax.Array:
    """How often each code occurs in `codes` (any shape): float32 [K]."""
    flat = codes.reshape(-1)
    return jax.ops.segment_sum(jnp.ones(flat.shape, jnp.float32), flat, num_segments=num_codes)


def ema_update(codebook: Codebook, vectors: jax.Array, codes: jax.Array, decay: float) -> Codebook:
    """One EMA step of the counts and sums with this batch's assignments; vectors [n, d], codes int32 [n]."""
    num_codes = codebook["cluster_size"].shape[0]
    counts = code_counts(codes, num_codes)  # [K]
    sums = jax.ops.segment_sum(vectors, codes, num_segments=num_codes)  # [K, d]
    return {
        "cluster_size": decay * codebook["cluster_size"] + (1.0 - decay) * counts,
        "embed_sum": decay * codebook["embed_sum"] + (1.0 - decay) * sums,
    }


def reseed_dead_codes(
    codebook: Codebook, vectors: jax.Array, threshold: float, rng: jax.Array
) -> tuple[Codebook, jax.Array]:
    """Codes counted less than `threshold` become random rows of `vectors` [n, d], counted `threshold` times.

    Returns (codebook, dead bool [K]). Rows are drawn without replacement when there are at least K of them.
    """
    num_codes = codebook["cluster_size"].shape[0]
    dead = codebook["cluster_size"] < threshold  # [K]
    rows = jax.random.choice(rng, vectors.shape[0], (num_codes,), replace=vectors.shape[0] < num_codes)
    seeds = vectors[rows]  # [K, d]
    cluster_size = jnp.where(dead, threshold, codebook["cluster_size"])
    embed_sum = jnp.where(dead[:, None], seeds * threshold, codebook["embed_sum"])
    return {"cluster_size": cluster_size, "embed_sum": embed_sum}, dead


def update_codebook(
    codebook: Codebook, vectors: jax.Array, codes: jax.Array, decay: float, threshold: float, rng: jax.Array
) -> tuple[Codebook, jax.Array]:
    """EMA update with this batch, then dead-code re-seeding; vectors [..., d], codes int32 [...].

    Returns (new codebook, number of codes re-seeded). No gradient flows into the codebook.
    """
    vectors = jax.lax.stop_gradient(vectors).reshape(-1, vectors.shape[-1])
    codebook = ema_update(codebook, vectors, codes.reshape(-1), decay)
    codebook, dead = reseed_dead_codes(codebook, vectors, threshold, rng)
    return codebook, dead.sum()


def perplexity(counts: jax.Array) -> jax.Array:
    """exp(entropy) of the code distribution given by `counts` [K]: from 1 (one code) to K (uniform use)."""
    return jnp.exp(jnp.sum(jax.scipy.special.entr(counts / counts.sum())))
