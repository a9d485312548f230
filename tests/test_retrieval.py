"""Retrieval recall: equality with a full-sort reference, a hand-checked case, chunking, errors."""

import numpy as np
import pytest

from vlp_jax.evaluate import retrieval


def reference_ranks(queries, gallery, is_positive):
    """Full sort per query; among equal scores negatives come first (pessimistic ties). is_positive [Q, G]."""
    ranks = []
    for query, positive in zip(queries, is_positive, strict=True):
        scores = gallery @ query  # [G]
        order = np.lexsort((positive, -scores))  # by score descending, then negatives before positives
        ranks.append(1 + np.flatnonzero(positive[order])[0])
    return np.array(ranks)


def reference_metrics(image_emb, text_emb, text_to_image):
    is_caption_of = text_to_image[None, :] == np.arange(len(image_emb))[:, None]  # [N, M]
    i2t = reference_ranks(image_emb, text_emb, is_caption_of)
    t2i = reference_ranks(text_emb, image_emb, is_caption_of.T)
    metrics = {f"i2t_r{k}": 100.0 * np.mean(i2t <= k) for k in (1, 5, 10)}
    metrics |= {f"t2i_r{k}": 100.0 * np.mean(t2i <= k) for k in (1, 5, 10)}
    metrics["mean_r1"] = (metrics["i2t_r1"] + metrics["t2i_r1"]) / 2
    metrics["i2t_median_rank"] = np.median(i2t)
    metrics["t2i_median_rank"] = np.median(t2i)
    return metrics


def random_captions(rng, num_images, max_captions):
    """text_to_image with 1..max_captions captions per image, shuffled. [M]"""
    counts = rng.integers(1, max_captions + 1, size=num_images)
    return rng.permutation(np.repeat(np.arange(num_images), counts))


def normalised(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def correlated_embeddings(rng, text_to_image, dim, noise):
    """Images and captions that share a direction, so recalls are neither 0 nor 100."""
    image_emb = normalised(rng.normal(size=(text_to_image.max() + 1, dim)))
    text_emb = normalised(image_emb[text_to_image] + noise * rng.normal(size=(len(text_to_image), dim)))
    return image_emb, text_emb


@pytest.mark.parametrize("seed", range(4))
def test_matches_full_sort_reference_on_random_embeddings(seed):
    rng = np.random.default_rng(seed)
    text_to_image = random_captions(rng, num_images=60, max_captions=5)
    image_emb, text_emb = correlated_embeddings(rng, text_to_image, dim=16, noise=1.0)
    got = retrieval.retrieval_metrics(image_emb, text_emb, text_to_image, chunk_size=13)
    want = reference_metrics(image_emb, text_emb, text_to_image)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key]), key
    assert 0 < got["i2t_r1"] < 100 and 0 < got["t2i_r1"] < 100


def test_matches_reference_with_deliberate_ties():
    # Small integer embeddings make every dot product exact, and duplicated rows tie with each other.
    rng = np.random.default_rng(7)
    text_to_image = random_captions(rng, num_images=30, max_captions=4)
    image_emb = rng.integers(-2, 3, size=(30, 3)).astype(np.float64)
    image_emb[10:20] = image_emb[0:10]
    text_emb = image_emb[text_to_image] + rng.integers(-1, 2, size=(len(text_to_image), 3))
    text_emb[1::2] = text_emb[0::2][: len(text_emb) // 2]
    got = retrieval.retrieval_metrics(image_emb, text_emb, text_to_image)
    want = reference_metrics(image_emb, text_emb, text_to_image)
    for key in want:
        assert got[key] == pytest.approx(want[key]), key


def test_hand_built_case_counts_ties_pessimistically():
    image_emb = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    text_emb = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0], [0.0, -1.0]])
    text_to_image = np.array([0, 0, 1, 2, 2])
    got = retrieval.retrieval_metrics(image_emb, text_emb, text_to_image)
    # i2t first-hit ranks [1, 2, 1]: image 1's caption (0.8) is beaten by caption 1 (1.0).
    # t2i ranks [1, 3, 1, 1, 2]: caption 1 scores 0 with its image, 1 with image 1 and ties at 0 with image 2;
    # caption 4 ties at 0 with image 0. Optimistic ties would give [1, 2, 1, 1, 1].
    assert got == pytest.approx(
        {
            "i2t_r1": 200 / 3, "i2t_r5": 100.0, "i2t_r10": 100.0,
            "t2i_r1": 60.0, "t2i_r5": 100.0, "t2i_r10": 100.0,
            "mean_r1": (200 / 3 + 60.0) / 2,
            "i2t_median_rank": 1.0, "t2i_median_rank": 1.0,
        }
    )


def test_collapsed_embeddings_score_chance_not_perfect():
    text_to_image = np.repeat(np.arange(20), 5)  # 20 images, 5 captions each
    got = retrieval.retrieval_metrics(np.ones((20, 4)) / 2, np.ones((100, 4)) / 2, text_to_image)
    # Every score ties: each caption's image ranks last (20), each image's first caption ranks 100 - 5 + 1.
    assert got["t2i_r10"] == 0.0 and got["t2i_median_rank"] == 20.0
    assert got["i2t_r10"] == 0.0 and got["i2t_median_rank"] == 96.0


@pytest.mark.parametrize("chunk_size", [1, 7, 10_000])
def test_chunk_size_does_not_change_results(chunk_size):
    rng = np.random.default_rng(3)
    text_to_image = random_captions(rng, num_images=40, max_captions=5)
    image_emb, text_emb = correlated_embeddings(rng, text_to_image, dim=8, noise=1.5)
    text_emb[5] = text_emb[6]  # a tie inside and across chunks
    assert len(text_emb) <= 10_000
    unchunked = retrieval.retrieval_metrics(image_emb, text_emb, text_to_image, chunk_size=len(text_emb))
    assert retrieval.retrieval_metrics(image_emb, text_emb, text_to_image, chunk_size=chunk_size) == unchunked


def test_low_precision_inputs_are_upcast():
    rng = np.random.default_rng(0)
    text_to_image = random_captions(rng, num_images=10, max_captions=3)
    image_emb, text_emb = correlated_embeddings(rng, text_to_image, dim=8, noise=0.1)
    image_emb, text_emb = image_emb.astype(np.float16), text_emb.astype(np.float16)
    got = retrieval.retrieval_metrics(image_emb, text_emb, text_to_image)
    assert got["i2t_r10"] == 100.0 and got["t2i_r10"] == 100.0


@pytest.mark.parametrize(
    ("image_shape", "text_shape", "text_to_image", "message"),
    [
        ((4,), (4, 8), [0, 1, 2, 3], r"image_emb must be a non-empty 2-D array .* shape \(4,\)"),
        ((0, 8), (4, 8), [0, 1, 2, 3], r"image_emb must be a non-empty 2-D array .* shape \(0, 8\)"),
        ((4, 8), (4, 6), [0, 1, 2, 3], r"share the embedding dim, got 8 and 6"),
        ((4, 8), (4, 8), [0, 1, 2], r"one image index per caption, shape \(4,\), got \(3,\)"),
        ((4, 8), (4, 8), [0.0, 1.0, 2.0, 3.0], r"integer image indices, got dtype float64"),
        ((4, 8), (4, 8), [0, 1, 4, 3], r"text_to_image\[2\] = 4 is out of range for 4 images"),
        ((4, 8), (4, 8), [0, -1, 2, 3], r"text_to_image\[1\] = -1 is out of range"),
        ((4, 8), (4, 8), [0, 0, 2, 2], r"image 1 has no caption.*2 images without captions, first: \[1, 3\]"),
    ],
)
def test_bad_inputs_raise_clear_errors(image_shape, text_shape, text_to_image, message):
    with pytest.raises(ValueError, match=message):
        retrieval.retrieval_metrics(np.ones(image_shape), np.ones(text_shape), np.array(text_to_image))


def test_non_finite_embeddings_and_bad_chunk_size_raise():
    text_emb = np.ones((3, 2))
    text_emb[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"text_emb row 2 has NaN or inf"):
        retrieval.retrieval_metrics(np.ones((3, 2)), text_emb, np.arange(3))
    with pytest.raises(ValueError, match=r"chunk_size must be at least 1, got 0"):
        retrieval.retrieval_metrics(np.ones((3, 2)), np.ones((3, 2)), np.arange(3), chunk_size=0)


def test_format_table_has_one_aligned_row_per_eval_set():
    results = {
        "coco_5k": {key: 12.3456 for key in retrieval.RECALL_KEYS},
        "flickr30k_1k": {key: 100.0 for key in retrieval.RECALL_KEYS} | {"t2i_r10": None},
    }
    lines = retrieval.format_table(results).splitlines()
    assert lines[0].split() == ["eval", "set", *retrieval.RECALL_KEYS]
    assert lines[2].split() == ["coco_5k", *["12.35"] * 7]
    assert lines[3].split() == ["flickr30k_1k", *["100.00"] * 5, "n/a", "100.00"]
    assert len({len(line) for line in lines}) == 1
