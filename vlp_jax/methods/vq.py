"""The VQ visual tokenizer as a method of the generic train loop, and the helpers COTS uses to read its codes.

[ours] COTS does not specify its tokenizer; models/vq.py documents our VQ-VAE. Training minimises
reconstruction MSE (pixels scaled to [-1, 1]) + β × commitment loss; the EMA codebook lives in `extra`.

For COTS: `image_codes(vq_config, tokenizer, images)` gives the code of every ViT patch, in the ViT's patch order;
a tokenizer is the pytree {"params": VQ-VAE parameters, "codebook": {"cluster_size", "embed_sum"}}, read from a
finished VQ run by the loop (checkpoint.load_params: its params and extra). Its evaluation is the
`reconstruction` evaluator (evaluate/reconstruction.py), declared in configs/vq.py.
"""

import jax
import jax.numpy as jnp
import ml_collections

from vlp_jax.methods.base import Batch, Feature, Method, PyTree
from vlp_jax.models import vq
from vlp_jax.models.heads import l2_normalize
from vlp_jax.models.vit import normalize_images

NAME = "vq"  # config.method.name of a tokenizer run


def check_config(config: ml_collections.ConfigDict) -> None:
    """Clear errors for settings the tokenizer cannot train with."""
    image, method = config.model.image, config.method
    if image.image_size % image.patch_size:
        raise ValueError(
            f"config.model.image.image_size={image.image_size} is not divisible by patch_size={image.patch_size}; "
            "the tokenizer gives one code per ViT patch"
        )
    if not 0.0 <= method.ema_decay < 1.0:
        raise ValueError(f"config.method.ema_decay={method.ema_decay} must be in [0, 1)")
    if method.dead_code_threshold <= 0:
        raise ValueError(
            f"config.method.dead_code_threshold={method.dead_code_threshold} must be positive: it keeps every "
            "code's EMA count above zero (models/vq.py)"
        )
    if method.codebook_size < 1:
        raise ValueError(f"config.method.codebook_size={method.codebook_size} must be at least 1")


def build_model(config: ml_collections.ConfigDict) -> vq.VQVAE:
    """The VQ-VAE of a tokenizer run config: one code per patch of `config.model.image`."""
    net = config.model.vq
    return vq.VQVAE(
        patch_size=config.model.image.patch_size,
        code_dim=config.method.code_dim,
        width=net.width,
        res_blocks=net.res_blocks,
        dtype=config.model.dtype,
    )


def check_images(config: ml_collections.ConfigDict, images: jax.Array) -> None:
    size = config.model.image.image_size
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise ValueError(
            f"images have shape {tuple(images.shape)} but the tokenizer expects [b, {size}, {size}, 3] "
            "(config.model.image.image_size)"
        )


class VQMethod(Method):
    """Implements the Method protocol for the VQ-VAE tokenizer; `extra` is its EMA codebook."""

    def __init__(self, config, mesh, pretrained):
        check_config(config)
        super().__init__(config, mesh, pretrained)
        self.model = build_model(config)

    @classmethod
    def features(cls, config):
        del config
        return ("image",)

    @classmethod
    def example_batch(cls, config):
        size = config.model.image.image_size
        return {"image": Feature((size, size, 3), "uint8")}

    @classmethod
    def evaluators(cls, config):
        del config
        return {"reconstruction": {"type": "reconstruction", "every": -1}}

    def init(self, rng: jax.Array, batch: Batch) -> tuple[PyTree, PyTree]:
        check_images(self.config, batch["image"])
        params = self.model.init(rng, batch["image"])["params"]
        method = self.config.method
        return params, vq.init_codebook(method.codebook_size, method.code_dim, method.dead_code_threshold)

    def autoencode(self, params, codebook, images: jax.Array) -> dict[str, jax.Array]:
        """Encode, quantise (straight-through), decode: the pixels in [-1, 1] and every intermediate."""
        pixels = normalize_images(images)  # float32 [b, H, W, 3]
        vectors = self.model.apply({"params": params}, pixels, method=vq.VQVAE.encode)  # [b, h, w, d]
        quantized, codes = vq.quantize(vectors, codebook)
        reconstruction = self.model.apply({"params": params}, quantized, method=vq.VQVAE.decode)
        return dict(pixels=pixels, vectors=vectors, quantized=quantized, codes=codes, reconstruction=reconstruction)

    def loss(self, params, extra, batch, rng, step):
        del step  # the objective does not change over training
        method = self.config.method
        out = self.autoencode(params, extra, batch["image"])
        vectors, codes = out["vectors"], out["codes"]
        reconstruction_mse = jnp.mean((out["reconstruction"] - out["pixels"]) ** 2)
        # Pulls the encoder towards its codes; the codes themselves move by the EMA update only.
        commitment = jnp.mean((vectors - jax.lax.stop_gradient(out["quantized"])) ** 2)
        loss = reconstruction_mse + method.commitment_weight * commitment
        codebook, reseeded = vq.update_codebook(
            extra, vectors, codes, method.ema_decay, method.dead_code_threshold, rng
        )
        counts = vq.code_counts(codes, method.codebook_size)
        metrics = {
            "reconstruction_mse": reconstruction_mse,
            "commitment_loss": commitment,
            "perplexity": vq.perplexity(counts),
            "codebook_usage": jnp.mean(counts > 0),  # fraction of codes used by this global batch
            "dead_codes_reseeded": reseeded,
        }
        return loss, (metrics, codebook)

    def encode(self, params, batch):
        """The mean of an image's (unquantised) code vectors, L2-normalised: a plain image embedding."""
        if "image" not in batch:
            return {}
        vectors = self.model.apply({"params": params}, batch["image"], method=vq.VQVAE.encode)
        return {"image": l2_normalize(vectors.mean(axis=(1, 2)))}

    def reconstruct(self, params, codebook, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Per-image reconstruction MSE float32 [b] and codes int32 [b, num_patches] through the quantiser."""
        out = self.autoencode(params, codebook, images)
        errors = jnp.mean((out["reconstruction"] - out["pixels"]) ** 2, axis=(1, 2, 3))
        return errors, out["codes"].reshape(len(images), -1)


def image_codes(vq_config: ml_collections.ConfigDict, params: PyTree, images: jax.Array) -> jax.Array:
    """The tokenizer's code of every patch: int32 [b, num_patches], row-major over the patch grid like the ViT.

    `vq_config` and `params` (the tokenizer pytree {"params", "codebook"}) come from `load_tokenizer`;
    `images` are uint8 [b, H, W, 3] (or floats in [-1, 1]). Pure and jittable.
    """
    check_images(vq_config, images)
    vectors = build_model(vq_config).apply({"params": params["params"]}, images, method=vq.VQVAE.encode)
    codes = vq.nearest_codes(vectors.reshape(-1, vectors.shape[-1]), vq.codebook_vectors(params["codebook"]))
    return codes.reshape(images.shape[0], -1)
