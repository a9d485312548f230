"""The VQ tokenizer's evaluator (`reconstruction`): held-out reconstruction MSE, codebook usage and perplexity,
next to the mean-image baseline's MSE. The method must offer `reconstruct(params, codebook, images)`
(methods/vq.py); the codebook is the run's `extra`."""

import jax
import jax.numpy as jnp
import numpy as np

from vlp_jax import parallel
from vlp_jax.evaluate.context import EvalPass, Evaluator, Result, set_result
from vlp_jax.evaluate.embeddings import embed_all
from vlp_jax.models import vq


class ReconstructionEvaluator(Evaluator):
    headline = True

    def __init__(self, context, name, options):
        super().__init__(context, name, options)
        mesh, method = context.mesh, context.method
        parallel.check_batch_size(context.batch_size, mesh, flag="config.eval.batch_size")
        self.num_codes = context.config.method.codebook_size

        # float32 [b, 1 + num_patches]: each image's MSE, then its codes (exact in float32 below 2**24 codes)
        def score(params, codebook, images):
            errors, codes = method.reconstruct(params, codebook, images)
            return jnp.concatenate([errors[:, None], codes.astype(jnp.float32)], axis=1)

        self.score = jax.jit(
            score,
            in_shardings=(context.param_shardings, parallel.replicated(mesh), parallel.batch_sharding(mesh)),
            out_shardings=parallel.replicated(mesh),
        )

    def __call__(self, evaluation: EvalPass) -> Result:
        mesh, images, extra = self.context.mesh, evaluation.dataset.images, evaluation.extra
        with parallel.mesh_context(mesh):
            scores = embed_all(lambda p, batch: self.score(p, extra, batch), evaluation.params, images,
                               self.context.batch_size, mesh)
        errors, codes = scores[:, 0], scores[:, 1:].astype(np.int64)  # [n], [n, num_patches]
        counts = np.bincount(codes.reshape(-1), minlength=self.num_codes)
        metrics = {
            "reconstruction_mse": float(errors.mean()),
            "mean_image_mse": mean_image_mse(images),
            "codebook_usage": float(np.mean(counts > 0)),
            "perplexity": float(vq.perplexity(jnp.asarray(counts, jnp.float32))),
        }
        result = set_result(evaluation, "reconstruction", metrics)
        result.summary.append("  ".join(f"{key}={value:.4g}" for key, value in metrics.items()))
        return result


def mean_image_mse(images: np.ndarray) -> float:
    """The trivial baseline: MSE (pixels in [-1, 1]) of predicting every image as the set's mean image."""
    pixels = images.astype(np.float64) / 127.5 - 1.0
    return float(np.mean((pixels - pixels.mean(axis=0)) ** 2))
