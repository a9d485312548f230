"""Small shared builders for tests: a tiny config that trains in seconds on 8 fake CPU devices."""

import json

import ml_collections
import numpy as np

from configs import brivl, clip, cookie, cots, siglip

# The methods every run-level test can take a trained run of (conftest.py).
METHODS = ("clip", "brivl", "cots", "cookie", "siglip")


def tiny_config(**train_overrides) -> ml_collections.ConfigDict:
    config = clip.get_config("tiny")
    config.data.train_size = 512
    config.data.eval_size = 64
    config.train.update(dict(steps=30, batch_size=64, warmup_steps=5, log_every=5, learning_rate=1e-3))
    config.train.update(train_overrides)
    config.eval.update(dict(every=1000, batch_size=64))
    return config


def small_towers(config: ml_collections.ConfigDict, queue_size: int = 0) -> ml_collections.ConfigDict:
    """Shrinks the tiny towers further so each compile takes seconds."""
    for tower in (config.model.image, config.model.text):
        tower.update(dict(width=32, depth=1, heads=2, mlp_dim=64))
    config.model.embed_dim = 16
    config.train.batch_size = 16
    config.method.queue_size = queue_size
    if "head" in config.method:
        config.method.head.update(dict(depth=1, heads=2, mlp_dim=64, hidden=32))
    return config


def method_config(name: str) -> ml_collections.ConfigDict:
    """The shared trained run of each method: CLIP 30 steps of the tiny config (the eval subset scored at steps
    10 and 20); the others 4 steps of smaller towers on the same data (COTS after a 2-step tokenizer stage)."""
    if name == "clip":
        config = tiny_config()
        config.eval.update(dict(every=10, subset_size=16))  # eval settings never change the trained parameters
        return config
    config = small_towers({"brivl": brivl, "cots": cots, "cookie": cookie, "siglip": siglip}[name].get_config("tiny"))
    config.data = tiny_config().data
    config.data.train_size = 128
    config.train.update(dict(steps=4, log_every=2, warmup_steps=1))
    config.eval.update(dict(every=1000, batch_size=16))
    if name == "cots":
        config.method.mvm.tokenizer_fraction = 0.5  # a 2-step tokenizer stage
        config.method.amf.warmup_steps = 1
    return config


def read_metrics(workdir) -> list[dict]:
    with open(f"{workdir}/metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def normalised(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm."""
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def reference_ranks(queries: np.ndarray, gallery: np.ndarray, is_positive: np.ndarray,
                    ties: str = "against") -> np.ndarray:
    """Brute-force retrieval ranks for the evaluation tests: one full sort per query, float64 scores of the
    float32 embeddings; among equal scores negatives come first (ties count against the model), or last with
    ties="favour".

    queries [Q, D], gallery [G, D], is_positive bool [Q, G]; returns the 1-based rank of each query's best positive.
    """
    queries, gallery = (np.asarray(x, np.float32).astype(np.float64) for x in (queries, gallery))
    ranks = []
    for query, positive in zip(queries, is_positive, strict=True):
        scores = gallery @ query  # [G]
        # By score descending, then negatives before positives (or after them, ties in the model's favour).
        order = np.lexsort((~positive if ties == "favour" else positive, -scores))
        ranks.append(1 + np.flatnonzero(positive[order])[0])
    return np.array(ranks)
