"""Small shared builders for tests: a tiny config that trains in seconds on 8 fake CPU devices."""

import json

import ml_collections

from configs import clip


def tiny_config(**train_overrides) -> ml_collections.ConfigDict:
    config = clip.get_config("tiny")
    config.data.train_size = 512
    config.data.eval_size = 64
    config.train.update(dict(steps=30, batch_size=64, warmup_steps=5, log_every=5, learning_rate=1e-3))
    config.train.update(train_overrides)
    config.eval.update(dict(every=1000, batch_size=64))
    return config


def read_metrics(workdir) -> list[dict]:
    with open(f"{workdir}/metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]
