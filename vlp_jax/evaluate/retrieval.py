"""Image↔text retrieval recall with several captions per image (the COCO / Flickr30k protocol).

Definitions follow LAION's CLIP_benchmark: image→text is a hit at k when ANY of the image's captions is among
its k best texts; text→image is a hit at k when the caption's one image is among its k best images.
"""

import numpy as np

RECALL_KS = (1, 5, 10)
RECALL_KEYS = (
    *(f"i2t_r{k}" for k in RECALL_KS),
    *(f"t2i_r{k}" for k in RECALL_KS),
    "mean_r1",
)
DEFAULT_CHUNK_SIZE = 1024


def retrieval_metrics(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    text_to_image: np.ndarray,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> dict[str, float]:
    """Recall@{1,5,10} in percent both ways, their mean R@1, and the median rank of the first hit.

    image_emb [N, D] and text_emb [M, D] are L2-normalised (scores are dot products); text_to_image [M] gives
    each caption's image index. Ranks are 1-based and ties count PESSIMISTICALLY: every non-matching item that
    scores at least as high as the best match is ranked ahead of it, so a collapsed model whose scores are all
    equal gets chance-level recall instead of 100%. Queries are scored `chunk_size` at a time, so memory is
    O(chunk_size × gallery size).
    """
    image_emb, text_emb, text_to_image = _validated(image_emb, text_emb, text_to_image, chunk_size)
    image_ids = np.arange(len(image_emb))
    # image→text: the positives of image i are the captions labelled i.
    i2t = first_hit_ranks(image_emb, text_emb, image_ids, text_to_image, chunk_size)
    # text→image: the positive of caption t is the image text_to_image[t].
    t2i = first_hit_ranks(text_emb, image_emb, text_to_image, image_ids, chunk_size)

    metrics = {}
    for direction, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in RECALL_KS:
            metrics[f"{direction}_r{k}"] = 100.0 * float(np.mean(ranks <= k))
    metrics["mean_r1"] = (metrics["i2t_r1"] + metrics["t2i_r1"]) / 2
    metrics["i2t_median_rank"] = float(np.median(i2t))
    metrics["t2i_median_rank"] = float(np.median(t2i))
    return metrics


def first_hit_ranks(
    queries: np.ndarray,
    gallery: np.ndarray,
    query_labels: np.ndarray,
    gallery_labels: np.ndarray,
    chunk_size: int,
) -> np.ndarray:
    """1-based rank of each query's best positive (a gallery item with the query's label); ties pessimistic.

    queries [Q, D], gallery [G, D], query_labels [Q], gallery_labels [G]; every query needs a positive.
    Returns int64 [Q].
    """
    ranks = np.empty(len(queries), dtype=np.int64)
    for start in range(0, len(queries), chunk_size):
        stop = start + chunk_size
        scores = queries[start:stop] @ gallery.T  # [c, G]
        positive = query_labels[start:stop, None] == gallery_labels[None, :]  # [c, G]
        best_positive = np.where(positive, scores, -np.inf).max(axis=1)  # [c]
        ahead = (scores >= best_positive[:, None]) & ~positive  # [c, G] negatives ranked before the best hit
        ranks[start:stop] = 1 + np.count_nonzero(ahead, axis=1)
    return ranks


def format_table(results: dict[str, dict[str, float]]) -> str:
    """Fixed-width text table: one row per eval set, one column per recall key (percent, 2 decimals)."""
    name_header = "eval set"
    name_width = max([len(name_header), *(len(name) for name in results)])
    widths = [max(len(key), len("100.00")) for key in RECALL_KEYS]

    def row(name: str, cells: list[str]) -> str:
        padded = (cell.rjust(width) for cell, width in zip(cells, widths, strict=True))
        return "  ".join([name.ljust(name_width), *padded])

    header = row(name_header, list(RECALL_KEYS))
    lines = [header, "-" * len(header)]
    for name, metrics in results.items():
        cells = [f"{metrics[key]:.2f}" if metrics.get(key) is not None else "n/a" for key in RECALL_KEYS]
        lines.append(row(name, cells))
    return "\n".join(lines)


def _validated(
    image_emb: np.ndarray, text_emb: np.ndarray, text_to_image: np.ndarray, chunk_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Checks shapes, labels and values; returns the embeddings in a common float dtype (≥ float32)."""
    image_emb, text_emb = np.asarray(image_emb), np.asarray(text_emb)
    text_to_image = np.asarray(text_to_image)
    for name, emb in (("image_emb", image_emb), ("text_emb", text_emb)):
        if emb.ndim != 2 or emb.shape[0] == 0:
            raise ValueError(f"{name} must be a non-empty 2-D array [count, dim], got shape {emb.shape}")
    num_images, num_texts = len(image_emb), len(text_emb)
    if image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(
            "image_emb and text_emb must share the embedding dim, "
            f"got {image_emb.shape[1]} and {text_emb.shape[1]}"
        )
    if text_to_image.shape != (num_texts,):
        raise ValueError(
            f"text_to_image must hold one image index per caption, shape ({num_texts},), "
            f"got {text_to_image.shape}"
        )
    if not np.issubdtype(text_to_image.dtype, np.integer):
        raise ValueError(f"text_to_image must hold integer image indices, got dtype {text_to_image.dtype}")
    out_of_range = np.flatnonzero((text_to_image < 0) | (text_to_image >= num_images))
    if out_of_range.size:
        caption = out_of_range[0]
        raise ValueError(
            f"text_to_image[{caption}] = {text_to_image[caption]} is out of range for {num_images} images "
            f"({out_of_range.size} captions out of range)"
        )
    uncaptioned = np.flatnonzero(np.bincount(text_to_image, minlength=num_images) == 0)
    if uncaptioned.size:
        raise ValueError(
            f"image {uncaptioned[0]} has no caption in text_to_image ({uncaptioned.size} images without "
            f"captions, first: {uncaptioned[:10].tolist()}); "
            "drop such images from image_emb or add their captions"
        )
    dtype = np.result_type(image_emb.dtype, text_emb.dtype, np.float32)
    image_emb, text_emb = image_emb.astype(dtype, copy=False), text_emb.astype(dtype, copy=False)
    for name, emb in (("image_emb", image_emb), ("text_emb", text_emb)):
        bad_rows = np.flatnonzero(~np.isfinite(emb).all(axis=1))
        if bad_rows.size:
            raise ValueError(f"{name} row {bad_rows[0]} has NaN or inf ({bad_rows.size} such rows)")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    return image_emb, text_emb, text_to_image
