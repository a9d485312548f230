"""Image↔text retrieval at any gallery size: exact ranks and top-k, streamed over query and gallery chunks.

Definitions, as in LAION's CLIP_benchmark (`clip_benchmark/metrics/zeroshot_retrieval.py`, the COCO / Flickr30k
protocol of CLIP-like papers):
- image→text R@k (CLIP_benchmark's `text_retrieval_recall@k`): the percentage of images with at least one of
  their captions among the k best-scoring texts;
- text→image R@k (`image_retrieval_recall@k`): the percentage of captions whose image is among the k best images.
CLIP_benchmark takes `recall_at_k(...) > 0` per query, i.e. "any positive in the top k": the same hit rule.
Three additions, which reduce to it in the plain case:
- median rank (MedR): the median over queries of the 1-based rank of the best-ranked positive;
- image groups: with `image_groups` [N], images of one group show the same content (one emoji in several art
  styles), so an image→text hit is any caption of any image of the group and a text→image hit any image of it;
- ties count against the model: every negative scoring at least as high as the best positive ranks ahead of it
  (CLIP_benchmark leaves ties to torch.topk's order), so a collapsed model that scores everything equally gets
  chance-level recall, not 100%. The two agree whenever scores are distinct. `Scorer(ties="favour")`
  (config.eval.ties) counts only strictly higher negatives instead, the rule of the open_clip training harness
  we compare against (docs/results/real-data.md), for side-by-side figures under one rule: identical caption
  texts of different images score exactly alike, so on sets with repeated captions the two rules differ.

Memory: the [queries, gallery] score matrix is never materialised. Queries and gallery are sorted by label; for
each block of `query_chunk` queries, a first sweep over the few gallery chunks that hold its positives finds each
query's best positive score, and a second sweep over all gallery chunks counts the negatives that score at least
as high: rank = 1 + that count. Each tile is one jitted [query_chunk, gallery_chunk] product with the query rows
sharded over the mesh's data-parallel devices, so device memory is O(query_chunk × gallery_chunk) and the work
is split over the devices. Both sweeps run the same compiled tile, so equal scores are bitwise equal and ties are
exact. Products use float32 at HIGHEST precision, so ranks match a float32 NumPy reference on any backend.
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vlp_jax import parallel

RECALL_KS = (1, 5, 10)
RECALL_KEYS = (
    *(f"i2t_r{k}" for k in RECALL_KS),
    *(f"t2i_r{k}" for k in RECALL_KS),
    "mean_r1",
)
# Rows per tile; config.eval.query_chunk / gallery_chunk override them. Memory per tile: query × gallery floats.
# These fit a tile's scores in a CPU's cache; accelerators want larger tiles (the non-tiny configs set them).
DEFAULT_QUERY_CHUNK = 256
DEFAULT_GALLERY_CHUNK = 4096
_GALLERY_PAD = -1  # label of the rows padding the last gallery chunk: neither a positive nor a negative
_QUERY_PAD = -2  # label of the rows padding the last query block: matches nothing, its results are dropped
_MAX_LABEL = np.iinfo(np.int32).max  # labels travel to the device as int32
TIES = ("against", "favour")  # a negative scoring exactly as high as the best positive: ranks ahead of it, or not


class Scorer:
    """Exact ranks and top-k of dot-product scores, tile by tile over a mesh (see the module docstring).

    Every process must pass the same full arrays (after `embeddings.embed_all` they are). Every tile has the
    same shape (query_chunk rounded up to a multiple of the data-parallel devices, × gallery_chunk; the last
    ones padded), so a Scorer compiles its tile once, whatever the sets it scores.
    """

    def __init__(
        self,
        mesh: Mesh | None = None,
        query_chunk: int = DEFAULT_QUERY_CHUNK,
        gallery_chunk: int = DEFAULT_GALLERY_CHUNK,
        ties: str = "against",
    ):
        if ties not in TIES:
            raise ValueError(f"config.eval.ties={ties!r}: use one of {', '.join(map(repr, TIES))}")
        self.ties = ties
        for name, value in (("query_chunk", query_chunk), ("gallery_chunk", gallery_chunk)):
            if value < 1:
                raise ValueError(f"config.eval.{name}={value} must be at least 1 (rows per retrieval tile)")
        self.mesh = mesh if mesh is not None else single_device_mesh()
        replicas = parallel.batch_parallelism(self.mesh)
        self.block = math.ceil(query_chunk / replicas) * replicas  # query rows per tile, split evenly over devices
        self.gallery_chunk = gallery_chunk
        self._replicated = parallel.replicated(self.mesh)
        self._rows = NamedSharding(self.mesh, PartitionSpec(parallel.BATCH_AXES))
        # Tiles hold no collective: query rows and per-query results stay on their device, the gallery tile is
        # replicated. (Many tiles are in flight at once; collectives in them can deadlock XLA's CPU runtime.)
        rows, full = self._rows, self._replicated
        self._rank_tile = jax.jit(
            functools.partial(_rank_tile, strict=ties == "favour"),
            in_shardings=(rows, rows, full, full, rows, rows), out_shardings=(rows, rows),
        )
        self._top_k_tile = functools.cache(  # one compiled tile per k
            lambda k: jax.jit(
                functools.partial(_top_k_tile, k=k),
                in_shardings=(rows, full, full, full, rows, rows),
                out_shardings=(rows, rows),
            )
        )

    def ranks(
        self, queries: np.ndarray, gallery: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray
    ) -> np.ndarray:
        """1-based rank of each query's best positive (a gallery item with the query's label); ties as `self.ties`.

        queries [Q, D], gallery [G, D], labels int >= 0: query_labels [Q], gallery_labels [G]. Every query needs a
        positive. Returns int64 [Q].
        """
        query_labels, gallery_labels = _labels(query_labels, "query_labels"), _labels(gallery_labels, "gallery_labels")
        query_order = np.argsort(query_labels, kind="stable")
        gallery_order = np.argsort(gallery_labels, kind="stable")
        sorted_gallery_labels = gallery_labels[gallery_order]
        sorted_query_labels = query_labels[query_order]
        first = np.searchsorted(sorted_gallery_labels, sorted_query_labels, "left")  # [Q] positives' range
        end = np.searchsorted(sorted_gallery_labels, sorted_query_labels, "right")
        lonely = np.flatnonzero(first == end)
        if lonely.size:
            raise ValueError(
                f"query {query_order[lonely[0]]} (label {sorted_query_labels[lonely[0]]}) has no positive in the "
                f"gallery ({lonely.size} such queries); every query needs a gallery item with its label"
            )
        blocks = []  # per query block: embeddings, labels (on the device) and the sorted gallery rows of its positives
        for start in range(0, len(queries), self.block):
            ids = query_order[start : start + self.block]
            blocks.append((
                self._put(_padded(queries[ids], self.block, 0.0), self._rows),
                self._put(_padded(query_labels[ids], self.block, _QUERY_PAD), self._rows),
                (first[start], end[start : start + self.block][-1]),
            ))
        best = [self._put(np.full(self.block, -np.inf, np.float32), self._rows) for _ in blocks]
        ahead = [self._put(np.zeros(self.block, np.int32), self._rows) for _ in blocks]

        def update_best(b, tile, tile_labels, offset):
            del offset
            best[b], _ = self._rank_tile(*blocks[b][:2], tile, tile_labels, best[b], ahead[b])
            return best[b]

        def update_ahead(b, tile, tile_labels, offset):
            del offset
            _, ahead[b] = self._rank_tile(*blocks[b][:2], tile, tile_labels, best[b], ahead[b])
            return ahead[b]

        def holding_positives(lo, hi):
            return [b for b, (_, _, (first_row, end_row)) in enumerate(blocks) if lo < end_row and first_row < hi]

        # Each query's best positive score, from the gallery chunks holding its block's positives only; then the
        # negatives scoring at least as high, over the whole gallery.
        self._stream(gallery, gallery_labels, gallery_order, update_best, holding_positives)
        self._stream(gallery, gallery_labels, gallery_order, update_ahead, lambda lo, hi: range(len(blocks)))
        ranks = np.empty(len(queries), np.int64)
        ranks[query_order] = 1 + np.concatenate([_to_host(a) for a in ahead])[: len(queries)]
        return ranks

    def top_k(self, queries: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k best gallery items of each query, best first (equal scores: lower index first).

        queries [Q, D], gallery [G, D]; returns (indices int64 [Q, k], scores float32 [Q, k]).
        """
        if not 1 <= k <= len(gallery):
            raise ValueError(f"top-k needs 1 <= k <= {len(gallery)} (the gallery size), got k={k}")
        blocks = [
            self._put(_padded(queries[start : start + self.block], self.block, 0.0), self._rows)
            for start in range(0, len(queries), self.block)
        ]
        best_scores = [self._put(np.full((self.block, k), -np.inf, np.float32), self._rows) for _ in blocks]
        best_ids = [self._put(np.zeros((self.block, k), np.int32), self._rows) for _ in blocks]
        merge = self._top_k_tile(k)

        def update(b, tile, tile_labels, offset):
            best_scores[b], best_ids[b] = merge(blocks[b], tile, tile_labels, offset, best_scores[b], best_ids[b])
            return best_ids[b]

        labels = np.zeros(len(gallery), np.int32)  # every row is real; padding rows get _GALLERY_PAD
        self._stream(gallery, labels, np.arange(len(gallery)), update, lambda lo, hi: range(len(blocks)))
        indices = np.concatenate([_to_host(ids) for ids in best_ids])[: len(queries)].astype(np.int64)
        return indices, np.concatenate([_to_host(scores) for scores in best_scores])[: len(queries)]

    def _stream(self, gallery, gallery_labels, order, update, wanted) -> None:
        """Streams the gallery (rows in `order`) chunk by chunk: `update(b, tile, tile_labels, offset)` for every
        query block b in `wanted(lo, hi)`, the chunk holding ordered rows [lo, hi) from `offset` = lo, padded rows
        labelled _GALLERY_PAD. Chunk i-1's results are awaited once chunk i is queued, so at most two chunks are
        in flight and host and device memory stay bounded however large the gallery."""
        in_flight = []
        for lo in range(0, len(gallery), self.gallery_chunk):
            hi = min(lo + self.gallery_chunk, len(gallery))
            blocks = wanted(lo, hi)
            if not blocks:
                continue
            rows = order[lo:hi]
            tile = self._put(_padded(gallery[rows], self.gallery_chunk, 0.0), self._replicated)
            tile_labels = self._put(_padded(gallery_labels[rows], self.gallery_chunk, _GALLERY_PAD), self._replicated)
            offset = self._put(np.int32(lo), self._replicated)
            outputs = [update(b, tile, tile_labels, offset) for b in blocks]
            jax.block_until_ready(in_flight)
            in_flight = outputs

    @staticmethod
    def _put(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
        """A host array every process holds in full, placed on the mesh (works across hosts)."""
        array = np.asarray(array)
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def scorer_from_config(eval_config: ml_collections.ConfigDict, mesh: Mesh) -> Scorer:
    """The Scorer that `config.eval` describes."""
    return Scorer(mesh, eval_config.query_chunk, eval_config.gallery_chunk, eval_config.get("ties", "against"))


def single_device_mesh() -> Mesh:
    """A mesh of this process's first device: the default for scoring outside a training run."""
    return parallel.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, model=1)), jax.local_devices()[:1])


def retrieval_metrics(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    text_to_image: np.ndarray,
    *,
    image_groups: np.ndarray | None = None,
    scorer: Scorer | None = None,
) -> dict[str, float]:
    """Recall@{1,5,10} in percent both ways, their mean R@1, and the median rank of the best positive.

    image_emb [N, D] and text_emb [M, D] are L2-normalised (scores are dot products); text_to_image int [M] gives
    each caption's image; image_groups int [N] (optional) puts images showing the same content in one group.
    """
    image_emb, text_emb, text_to_image = _validated(image_emb, text_emb, text_to_image)
    image_labels = np.arange(len(image_emb)) if image_groups is None else _groups(image_groups, len(image_emb))
    text_labels = image_labels[text_to_image]
    scorer = scorer or Scorer()
    ranks = {
        "i2t": scorer.ranks(image_emb, text_emb, image_labels, text_labels),
        "t2i": scorer.ranks(text_emb, image_emb, text_labels, image_labels),
    }
    metrics = {}
    for direction, direction_ranks in ranks.items():
        metrics |= recalls(direction, direction_ranks)
    metrics["mean_r1"] = (metrics["i2t_r1"] + metrics["t2i_r1"]) / 2
    for direction, direction_ranks in ranks.items():
        metrics[f"{direction}_median_rank"] = float(np.median(direction_ranks))
    return metrics


def recalls(direction: str, ranks: np.ndarray) -> dict[str, float]:
    """{f"{direction}_r{k}": percent of ranks <= k} for k in RECALL_KS."""
    return {f"{direction}_r{k}": 100.0 * float(np.mean(ranks <= k)) for k in RECALL_KS}


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


def _rank_tile(query, query_labels, gallery, gallery_labels, best, ahead, *, strict=False):
    """One tile: (best positive score so far, negatives at or above `best` so far) of each query row; with
    `strict`, negatives strictly above it (ties in the positive's favour).

    query [b, D], gallery [c, D], labels int32 [b] / [c], best float32 [b], ahead int32 [b].
    """
    scores = jnp.dot(query, gallery.T, precision=jax.lax.Precision.HIGHEST)  # [b, c]
    positive = query_labels[:, None] == gallery_labels[None, :]
    new_best = jnp.maximum(best, jnp.max(jnp.where(positive, scores, -jnp.inf), axis=1))
    negative_scores = jnp.where(positive | (gallery_labels == _GALLERY_PAD)[None, :], -jnp.inf, scores)
    above = negative_scores > best[:, None] if strict else negative_scores >= best[:, None]
    new_ahead = ahead + jnp.sum(above, axis=1, dtype=jnp.int32)
    return new_best, new_ahead


def _top_k_tile(query, gallery, gallery_labels, offset, best_scores, best_ids, *, k):
    """Merges one gallery tile into each query's running top k. query [b, D], gallery [c, D], labels int32 [c]
    (_GALLERY_PAD on padding rows), offset: the tile's first gallery index; best_* [b, k]."""
    scores = jnp.dot(query, gallery.T, precision=jax.lax.Precision.HIGHEST)  # [b, c]
    scores = jnp.where((gallery_labels == _GALLERY_PAD)[None, :], -jnp.inf, scores)
    ids = jnp.broadcast_to(offset + jnp.arange(gallery.shape[0], dtype=jnp.int32), scores.shape)
    # The running best come first, so among equal scores lax.top_k keeps the lower gallery index.
    merged_scores = jnp.concatenate([best_scores, scores], axis=1)
    merged_ids = jnp.concatenate([best_ids, ids], axis=1)
    top_scores, position = jax.lax.top_k(merged_scores, k)
    return top_scores, jnp.take_along_axis(merged_ids, position, axis=1)


def _to_host(array: jax.Array) -> np.ndarray:
    """The whole of a row-sharded array on this host, gathering other processes' rows when there are any."""
    if array.is_fully_addressable:
        return np.asarray(array)
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def _padded(array: np.ndarray, rows: int, fill) -> np.ndarray:
    """`array` with rows of `fill` appended up to `rows` rows; float embeddings become float32, labels int32."""
    dtype = np.float32 if np.issubdtype(array.dtype, np.floating) else np.int32
    out = np.full((rows, *array.shape[1:]), fill, dtype)
    out[: len(array)] = array
    return out


def _labels(labels: np.ndarray, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D integer array, got {labels.dtype} of shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > _MAX_LABEL):
        raise ValueError(f"{name} must lie in [0, {_MAX_LABEL}], got range [{labels.min()}, {labels.max()}]")
    return labels


def _groups(image_groups: np.ndarray, num_images: int) -> np.ndarray:
    groups = np.asarray(image_groups)
    if groups.shape != (num_images,):
        raise ValueError(f"image_groups must hold one group id per image, shape ({num_images},), got {groups.shape}")
    return _labels(groups, "image_groups")


def _validated(
    image_emb: np.ndarray, text_emb: np.ndarray, text_to_image: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Checks shapes, labels and values; returns float32 embeddings and the caption→image indices."""
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
    image_emb, text_emb = image_emb.astype(np.float32, copy=False), text_emb.astype(np.float32, copy=False)
    for name, emb in (("image_emb", image_emb), ("text_emb", text_emb)):
        bad_rows = np.flatnonzero(~np.isfinite(np.einsum("ij,ij->i", emb, emb)))  # no [count, dim] temporary
        if bad_rows.size:
            raise ValueError(f"{name} row {bad_rows[0]} has NaN or inf ({bad_rows.size} such rows)")
    return image_emb, text_emb, text_to_image
