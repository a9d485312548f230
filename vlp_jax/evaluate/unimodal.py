"""Unimodal retrieval (COOKIE's image retrieval and text matching): image→image and text→text recall.

- image→image across views: query i's right answers are the other views of its content (the same scene
  re-rendered with other noise and a small shift in the embedded world, evaluate/world.py; with image groups,
  any view of any image of its group).
- within one set (`same_label_recall`): the first item of every label that has several is a query, every other
  item is the gallery, and a hit is any gallery item with the query's label. Text→text uses it with caption →
  image (or image group) labels: "find another caption of the same image"; image→image uses it with image groups
  when a set carries them (one emoji in several art styles).
Recalls are R@1/5/10 in percent from `retrieval.Scorer.ranks`, so ties count against the model as in image↔text
retrieval.
"""

import numpy as np

from vlp_jax.evaluate.retrieval import Scorer, recalls


def cross_view_recall(
    query_emb: np.ndarray, view_emb: np.ndarray, labels: np.ndarray | None = None, *, scorer: Scorer | None = None
) -> dict[str, float]:
    """image→image R@k, keyed "i2i_r{k}": query_emb [N, d] against view_emb [N, d], view i showing query i.

    labels int [N] (image groups, optional) make every view of the query's group a right answer.
    """
    if query_emb.shape != view_emb.shape:
        raise ValueError(
            f"image→image needs one other view per query image, got query {query_emb.shape} and views {view_emb.shape}"
        )
    labels = np.arange(len(query_emb)) if labels is None else np.asarray(labels)
    return recalls("i2i", (scorer or Scorer()).ranks(query_emb, view_emb, labels, labels))


def same_label_recall(
    direction: str, embeddings: np.ndarray, labels: np.ndarray, *, scorer: Scorer | None = None
) -> dict[str, float]:
    """R@k, keyed f"{direction}_r{k}", of finding another item with the query's label: embeddings [n, d], labels [n].

    Queries are the first item of each label with at least two items; the gallery is every other item, so an
    item whose label has no partner is only a distractor.
    """
    labels = np.asarray(labels)
    values, first, counts = np.unique(labels, return_index=True, return_counts=True)
    queries = first[counts >= 2]  # [Q] item ids
    if not queries.size:
        raise ValueError(f"{direction} retrieval needs a label with at least two items; every label has one")
    gallery = np.setdiff1d(np.arange(len(labels)), queries)  # [G] item ids
    ranks = (scorer or Scorer()).ranks(embeddings[queries], embeddings[gallery], labels[queries], labels[gallery])
    return recalls(direction, ranks)
