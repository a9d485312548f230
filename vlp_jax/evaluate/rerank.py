"""Re-ranked retrieval: the two-tower top-k of every query scored again by a method's cross-modal matching score
(CMAL's unified encoder), with the cost of each stage.

The method provides `match_scores(params, images [n, S, S, 3], tokens [n, L]) -> [n]` (higher = matched). Each
query's k best two-tower candidates are re-ordered by it; the rest keep their two-tower order, so R@r for r > k
is the two-tower figure. Cost: the two towers take N + M encoder passes and one matrix product; re-ranking adds
(N + M)·k pair passes; a full cross-encoder would take N·M (estimated from the measured time per pair).
"""

import time

import jax
import numpy as np

from vlp_jax import parallel
from vlp_jax.evaluate.context import EvalPass, Evaluator, Result, set_result
from vlp_jax.evaluate.evaluators import image_labels

RECALL_AT = (1, 5, 10)


class RerankEvaluator(Evaluator):
    """Options: `k` (candidates re-ranked per query; default config.method.rerank.k)."""

    def __init__(self, context, name, options):
        super().__init__(context, name, options)
        self._match = None

    def score_pairs(self, params, images: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Matching scores of pairs (images[i], tokens[i]) in global batches of the eval batch size: float32 [n]."""
        context = self.context
        if self._match is None:
            rows = parallel.batch_sharding(context.mesh)
            self._match = jax.jit(context.method.match_scores, in_shardings=(context.param_shardings, rows, rows),
                                  out_shardings=parallel.replicated(context.mesh))
        size = context.batch_size
        local = size // jax.process_count()
        first = jax.process_index() * local
        scores = []
        with parallel.mesh_context(context.mesh):
            for start in range(0, len(images), size):
                chunk = {"image": images[start : start + size], "text": tokens[start : start + size]}
                count = len(chunk["image"])
                padded = {key: np.concatenate([value, np.zeros((size - count, *value.shape[1:]), value.dtype)])
                          [first : first + local] for key, value in chunk.items()}
                batch = parallel.global_batch_from_local(padded, context.mesh)
                scores.append(np.asarray(self._match(params, batch["image"], batch["text"]))[:count])
        return np.concatenate(scores).astype(np.float32)

    def __call__(self, evaluation: EvalPass) -> Result:
        image_emb, text_emb = evaluation.embeddings()
        dataset, scorer = evaluation.dataset, self.context.scorer
        k = int(self.options.get("k", 0) or self.context.config.method.rerank.k)
        labels = image_labels(dataset)
        text_labels = labels[dataset.caption_image]
        self.score_pairs(evaluation.params, dataset.images[:1], dataset.captions[:1])  # compile before timing
        metrics, seconds, pairs = {}, 0.0, 0
        for direction, queries, gallery, query_labels, gallery_labels in (
            ("i2t", image_emb, text_emb, labels, text_labels),
            ("t2i", text_emb, image_emb, text_labels, labels),
        ):
            depth = min(max(k, *RECALL_AT), len(gallery))
            top, _ = scorer.top_k(queries, gallery, depth)  # [Q, depth]
            kept = min(k, depth)
            query_ids = np.repeat(np.arange(len(queries)), kept)
            candidates = top[:, :kept].reshape(-1)
            image_ids, text_ids = (query_ids, candidates) if direction == "i2t" else (candidates, query_ids)
            started = time.perf_counter()
            scores = self.score_pairs(evaluation.params, dataset.images[image_ids], dataset.captions[text_ids])
            seconds += time.perf_counter() - started
            pairs += len(scores)
            order = np.argsort(-scores.reshape(-1, kept), axis=1, kind="stable")
            reranked = np.concatenate([np.take_along_axis(top[:, :kept], order, axis=1), top[:, kept:]], axis=1)
            hits = gallery_labels[reranked] == query_labels[:, None]
            for r in RECALL_AT:
                metrics[f"{direction}_r{r}"] = 100.0 * float(hits[:, :r].any(axis=1).mean())
        metrics["mean_r1"] = (metrics["i2t_r1"] + metrics["t2i_r1"]) / 2
        image_seconds, text_seconds = evaluation.seconds()
        per_pair = seconds / max(pairs, 1)
        metrics |= {"k": k, "pairs": pairs, "rerank_s": seconds, "seconds_per_pair": per_pair,
                    "two_tower_encode_s": image_seconds + text_seconds,
                    "cross_encoder_s_estimated": per_pair * len(image_emb) * len(text_emb)}
        result = set_result(evaluation, "rerank", metrics, key_prefix="rerank/")
        result.summary.append(
            f"{evaluation.name} re-ranked top-{k}: i2t R@1 {metrics['i2t_r1']:.1f}  t2i R@1 {metrics['t2i_r1']:.1f}  "
            f"mean R@1 {metrics['mean_r1']:.1f}; {pairs} pair passes {seconds:.3g} s (two towers "
            f"{metrics['two_tower_encode_s']:.3g} s; full cross-encoder ~{metrics['cross_encoder_s_estimated']:.3g} s)"
        )
        return result
