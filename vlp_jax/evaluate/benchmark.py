"""Retrieval at scale (`python -m vlp_jax.bench retrieval`): time and peak memory of exact image↔text retrieval.

Random unit embeddings stand in for a model's (scoring cost does not depend on what they mean): caption t lies
near image t % N. The score matrix is never built (retrieval.py streams it tile by tile), so the peak RSS is the
embeddings plus the tiles in flight, however large N × M.
"""

import resource
import time

import numpy as np

from vlp_jax import parallel
from vlp_jax.evaluate.retrieval import retrieval_metrics, scorer_from_config


def unit_rows(rows: np.ndarray) -> np.ndarray:
    """`rows` scaled to unit L2 norm, in place."""
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows


def random_retrieval_set(num_images: int, num_texts: int, dim: int, noise: float, seed: int):
    """(images [N, dim], texts [M, dim], text_to_image [M]): unit embeddings, caption t noisy around image t % N.

    Texts are drawn a block at a time into the final array, so building them costs no [M, dim] temporary.
    """
    rng = np.random.default_rng(seed)
    images = unit_rows(rng.standard_normal((num_images, dim), np.float32))
    text_to_image = np.arange(num_texts) % num_images
    texts = np.empty((num_texts, dim), np.float32)
    for start in range(0, num_texts, num_images):
        block = texts[start : start + num_images]
        block[:] = images[text_to_image[start : start + num_images]]
        block += noise * rng.standard_normal(block.shape, np.float32)
        unit_rows(block)
    return images, texts, text_to_image


def run(config, num_images: int, num_texts: int, dim: int, noise: float) -> dict[str, float]:
    """Time and peak host RSS of exact retrieval both ways (evaluate/retrieval.py) on random embeddings."""
    images, texts, text_to_image = random_retrieval_set(num_images, num_texts, dim, noise, config.seed)
    scorer = scorer_from_config(config.eval, parallel.make_mesh(config.mesh))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    results = retrieval_metrics(images, texts, text_to_image, scorer=scorer)
    seconds = time.perf_counter() - started
    return {
        **results,
        "seconds": seconds,
        "scores_per_s": 2 * num_images * num_texts / seconds,  # each pair is scored once per direction
        "embedding_bytes": images.nbytes + texts.nbytes,
        "score_matrix_bytes": num_images * num_texts * np.dtype(np.float32).itemsize,
        "peak_rss_before_bytes": rss_before,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
