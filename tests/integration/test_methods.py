"""Every method's shared run (conftest.method_run): it trains with finite losses to a full evaluation, and
`--mode=eval` of its checkpoint — a fresh process's path: stages found finished, the method's pretrained inputs
read again, parameters shaped by its declared example — reproduces that evaluation exactly."""

import json

import numpy as np

from vlp_jax.evaluate import run as eval_run
from vlp_jax.evaluate.retrieval import RECALL_KEYS


def test_every_method_trains_to_a_full_evaluation(method_run):
    name, config, workdir, final, records = method_run
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert losses and all(np.isfinite(losses)), (name, losses)
    assert set(RECALL_KEYS) <= set(final) and all(0.0 <= final[key] <= 100.0 for key in RECALL_KEYS)
    report = json.loads((workdir / eval_run.EVAL_DIR / f"step_{config.train.steps}.json").read_text())
    assert report["sets"]["embedded"]["retrieval"] == final


def test_eval_mode_reproduces_every_methods_final_evaluation(method_run, tmp_path):
    name, config, workdir, final, _ = method_run
    assert eval_run.evaluate_checkpoint(config, str(tmp_path), str(workdir)) == final, name
