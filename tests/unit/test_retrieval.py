"""Retrieval: equality with a full-sort reference (multi-caption, ties, image groups), tiled and sharded scoring
equal to one tile on one device, top-k, bounded tiles, errors, and the retrieval benchmark."""

import ml_collections
import numpy as np
import pytest

from tests.helpers import normalised, reference_ranks
from vlp_jax import parallel
from vlp_jax.evaluate import benchmark, retrieval


@pytest.fixture(scope="module")
def mesh8():
    """All 8 fake devices on the data axis: each tile's query rows are split 8 ways."""
    return parallel.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1)))


def reference_metrics(image_emb, text_emb, text_to_image, image_groups=None, ties="against"):
    labels = np.arange(len(image_emb)) if image_groups is None else np.asarray(image_groups)
    is_positive = labels[None, text_to_image] == labels[:, None]  # [N, M]: caption of the image's group
    i2t = reference_ranks(image_emb, text_emb, is_positive, ties)
    t2i = reference_ranks(text_emb, image_emb, is_positive.T, ties)
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


def correlated_embeddings(rng, text_to_image, dim, noise):
    """Images and captions that share a direction, so recalls are neither 0 nor 100."""
    image_emb = normalised(rng.normal(size=(text_to_image.max() + 1, dim)))
    text_emb = normalised(image_emb[text_to_image] + noise * rng.normal(size=(len(text_to_image), dim)))
    return image_emb.astype(np.float32), text_emb.astype(np.float32)


def assert_metrics_equal(got, want):
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key]), key


@pytest.mark.parametrize("seed", range(3))
def test_matches_full_sort_reference_on_random_embeddings(seed, mesh8):
    rng = np.random.default_rng(seed)
    text_to_image = random_captions(rng, num_images=60, max_captions=5)
    image_emb, text_emb = correlated_embeddings(rng, text_to_image, dim=16, noise=1.0)
    scorer = retrieval.Scorer(mesh8, query_chunk=13, gallery_chunk=17)
    got = retrieval.retrieval_metrics(image_emb, text_emb, text_to_image, scorer=scorer)
    assert_metrics_equal(got, reference_metrics(image_emb, text_emb, text_to_image))
    assert 0 < got["i2t_r1"] < 100 and 0 < got["t2i_r1"] < 100


def test_image_groups_count_every_image_and_caption_of_the_group(mesh8):
    rng = np.random.default_rng(5)
    text_to_image = random_captions(rng, num_images=48, max_captions=4)
    groups = rng.integers(0, 15, size=48)  # about three "styles" per content, some groups of one
    image_emb, text_emb = correlated_embeddings(rng, text_to_image, dim=8, noise=1.0)
    image_emb = normalised(image_emb + 0.8 * normalised(rng.normal(size=(15, 8)))[groups]).astype(np.float32)
    scorer = retrieval.Scorer(mesh8, query_chunk=8, gallery_chunk=11)
    got = retrieval.retrieval_metrics(image_emb, text_emb, text_to_image, image_groups=groups, scorer=scorer)
    assert_metrics_equal(got, reference_metrics(image_emb, text_emb, text_to_image, groups))
    plain = retrieval.retrieval_metrics(image_emb, text_emb, text_to_image, scorer=scorer)
    assert got["i2t_r1"] > plain["i2t_r1"] and got["t2i_r1"] > plain["t2i_r1"]  # more right answers per query


@pytest.mark.parametrize("ties", retrieval.TIES)
@pytest.mark.parametrize("groups", [False, True])
def test_matches_reference_with_deliberate_ties(groups, ties, mesh8):
    # Small integer embeddings make every dot product exact, and duplicated rows tie with each other.
    rng = np.random.default_rng(7)
    text_to_image = random_captions(rng, num_images=30, max_captions=4)
    image_emb = rng.integers(-2, 3, size=(30, 3)).astype(np.float32)
    image_emb[10:20] = image_emb[0:10]
    text_emb = image_emb[text_to_image] + rng.integers(-1, 2, size=(len(text_to_image), 3))
    text_emb[1::2] = text_emb[0::2][: len(text_emb) // 2]
    image_groups = rng.integers(0, 12, size=30) if groups else None
    want = reference_metrics(image_emb, text_emb, text_to_image, image_groups, ties)
    for scorer in (retrieval.Scorer(ties=ties), retrieval.Scorer(mesh8, query_chunk=5, gallery_chunk=7, ties=ties)):
        got = retrieval.retrieval_metrics(image_emb, text_emb, text_to_image, image_groups=image_groups, scorer=scorer)
        assert_metrics_equal(got, want)
    other_rule = "favour" if ties == "against" else "against"
    other = reference_metrics(image_emb, text_emb, text_to_image, image_groups, other_rule)
    assert other != want  # the case holds ties that the two rules rank differently


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
    # Put images 0 and 1 in one group: caption 1 now finds its group (image 1) first, image 1 finds caption 1.
    grouped = retrieval.retrieval_metrics(image_emb, text_emb, text_to_image, image_groups=np.array([0, 0, 1]))
    assert grouped["i2t_r1"] == 100.0 and grouped["t2i_r1"] == 80.0
    # Ties in the model's favour (open_clip's bench harness rule): t2i ranks [1, 2, 1, 1, 1].
    favour = retrieval.retrieval_metrics(image_emb, text_emb, text_to_image, scorer=retrieval.Scorer(ties="favour"))
    assert favour["t2i_r1"] == 80.0 and favour["i2t_r1"] == pytest.approx(200 / 3)


def test_unknown_tie_rule_names_the_flag():
    with pytest.raises(ValueError, match=r"config.eval.ties='optimistic'.*'against', 'favour'"):
        retrieval.Scorer(ties="optimistic")


def test_collapsed_embeddings_score_chance_not_perfect():
    text_to_image = np.repeat(np.arange(20), 5)  # 20 images, 5 captions each
    got = retrieval.retrieval_metrics(np.ones((20, 4)) / 2, np.ones((100, 4)) / 2, text_to_image)
    # Every score ties: each caption's image ranks last (20), each image's first caption ranks 100 - 5 + 1.
    assert got["t2i_r10"] == 0.0 and got["t2i_median_rank"] == 20.0
    assert got["i2t_r10"] == 0.0 and got["i2t_median_rank"] == 96.0


@pytest.mark.parametrize(("query_chunk", "gallery_chunk"), [(1, 2), (7, 3), (64, 5), (200, 300)])
def test_tiled_and_sharded_scoring_equals_one_tile_on_one_device(query_chunk, gallery_chunk, mesh8):
    rng = np.random.default_rng(3)
    text_to_image = random_captions(rng, num_images=40, max_captions=5)
    image_emb, text_emb = correlated_embeddings(rng, text_to_image, dim=8, noise=1.5)
    text_emb[5] = text_emb[6]  # a tie inside and across tiles
    one_tile = retrieval.Scorer(None, query_chunk=len(text_emb), gallery_chunk=len(text_emb))
    unchunked = retrieval.retrieval_metrics(image_emb, text_emb, text_to_image, scorer=one_tile)
    tiled = retrieval.Scorer(mesh8, query_chunk, gallery_chunk)
    assert retrieval.retrieval_metrics(image_emb, text_emb, text_to_image, scorer=tiled) == unchunked


def test_top_k_matches_a_full_sort_and_prefers_lower_indices_on_ties(mesh8):
    rng = np.random.default_rng(4)
    queries = normalised(rng.normal(size=(11, 6))).astype(np.float32)
    gallery = normalised(rng.normal(size=(50, 6))).astype(np.float32)
    gallery[30] = gallery[2]  # a tie: 2 comes first
    indices, scores = retrieval.Scorer(mesh8, query_chunk=3, gallery_chunk=7).top_k(queries, gallery, 5)
    full = queries.astype(np.float64) @ gallery.T.astype(np.float64)
    np.testing.assert_array_equal(indices, np.argsort(-full, axis=1, kind="stable")[:, :5])
    np.testing.assert_allclose(scores, np.take_along_axis(full, indices, axis=1), rtol=1e-6)
    with pytest.raises(ValueError, match=r"1 <= k <= 50"):
        retrieval.Scorer().top_k(queries, gallery, 51)


def test_tiles_never_exceed_the_chunk_sizes(monkeypatch):
    """The score matrix is only ever built tile by tile: every tile is at most query_chunk × gallery_chunk."""
    shapes = []
    scorer = retrieval.Scorer(None, query_chunk=16, gallery_chunk=64)
    traced = scorer._rank_tile

    def recording(query, query_labels, gallery, *rest):
        shapes.append((query.shape[0], gallery.shape[0]))
        return traced(query, query_labels, gallery, *rest)

    monkeypatch.setattr(scorer, "_rank_tile", recording)
    rng = np.random.default_rng(0)
    text_to_image = np.arange(1000) % 200
    image_emb, text_emb = correlated_embeddings(rng, text_to_image, dim=4, noise=1.0)
    retrieval.retrieval_metrics(image_emb, text_emb, text_to_image, scorer=scorer)
    assert set(shapes) == {(16, 64)}
    # Sweep 1 visits only the gallery chunks holding a block's positives: well under a second full pass.
    full_pass = sum(-(-n // 16) * -(-m // 64) for n, m in ((200, 1000), (1000, 200)))
    assert full_pass < len(shapes) < 1.5 * full_pass


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


def test_bad_values_groups_and_chunks_raise_clear_errors():
    text_emb = np.ones((3, 2))
    text_emb[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"text_emb row 2 has NaN or inf"):
        retrieval.retrieval_metrics(np.ones((3, 2)), text_emb, np.arange(3))
    with pytest.raises(ValueError, match=r"image_groups must hold one group id per image, shape \(3,\)"):
        retrieval.retrieval_metrics(np.ones((3, 2)), np.ones((3, 2)), np.arange(3), image_groups=np.zeros(2, int))
    with pytest.raises(ValueError, match=r"image_groups must lie in \[0, "):
        retrieval.retrieval_metrics(np.ones((3, 2)), np.ones((3, 2)), np.arange(3), image_groups=np.array([0, -1, 1]))
    with pytest.raises(ValueError, match=r"config.eval.gallery_chunk=0 must be at least 1"):
        retrieval.Scorer(gallery_chunk=0)
    with pytest.raises(ValueError, match=r"query 1 \(label 7\) has no positive"):
        retrieval.Scorer().ranks(np.ones((2, 2)), np.ones((2, 2)), np.array([3, 7]), np.array([3, 4]))


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


def test_retrieval_benchmark_reports_time_memory_and_the_matrix_it_avoids():
    config = ml_collections.ConfigDict(
        dict(seed=0, mesh=dict(data=-1, fsdp=1, model=1), eval=dict(query_chunk=64, gallery_chunk=256))
    )
    results = benchmark.run(config, num_images=300, num_texts=1500, dim=8, noise=0.2)
    assert results["score_matrix_bytes"] == 300 * 1500 * 4
    assert results["embedding_bytes"] == (300 + 1500) * 8 * 4
    assert results["peak_rss_bytes"] >= results["peak_rss_before_bytes"] > 0
    assert results["seconds"] > 0 and 20 < results["i2t_r1"] <= 100
