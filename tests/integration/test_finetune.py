"""Fine-tuning pre-trained runs on the world's downstream tasks: the towers load from every layout (CLIP's
`towers/`, COOKIE's top level), frozen towers stay exactly the pre-trained ones while full fine-tuning moves them,
the task's figures reach metrics.jsonl and the report, and pre-training -> fine-tuning chains as one command."""

import json

import numpy as np
import pytest

from configs.finetune import rec, retrieval, ve, vqa
from tests.helpers import read_metrics
from vlp_jax import checkpoint, train
from vlp_jax.data import world_tasks
from vlp_jax.evaluate import run


def shrink(config, steps: int = 2):
    """Two steps of batch 16 on the shared runs' small world, a one-layer fusion encoder."""
    config.data.train_size = 128
    config.data.eval_size = 32
    config.finetune.fusion.update(dict(width=32, depth=1, heads=2, mlp_dim=64))
    config.train.update(dict(steps=steps, batch_size=16, warmup_steps=1, log_every=1))
    config.eval.update(dict(batch_size=32, every=1000))
    return config


def towers(params, prefix: str = "towers/") -> dict[str, np.ndarray]:
    return {path: np.asarray(value) for path, value in checkpoint.leaves_by_path(params).items()
            if path.startswith(prefix) and "_tower/" in path}


@pytest.mark.parametrize(("task", "name"), [("ve", "clip"), ("retrieval", "cookie")])
def test_frozen_towers_are_exactly_the_pretrained_ones(task, name, trained_runs, tmp_path):
    """VE from CLIP's `towers/`, retrieval from COOKIE's top-level towers (renamed); --mode=eval reproduces the
    figures from the saved config."""
    _, run_dir, _, _ = trained_runs(name)
    config = shrink({"ve": ve, "retrieval": retrieval}[task].get_config("tiny"))
    config.init_from = str(run_dir)
    config.train.param_groups.backbone.frozen = True
    key = "ve_accuracy" if task == "ve" else "mean_r1"
    if task == "retrieval":
        config.eval.evaluators = {"retrieval": config.eval.evaluators.retrieval}
    final = train.train_and_evaluate(config, str(tmp_path))
    assert 0 <= final[key] <= 100
    tuned = checkpoint.load_params(tmp_path).tree
    pretrained = checkpoint.load_params(run_dir).tree
    expected = towers(pretrained, "towers/" if name == "clip" else "")
    got = towers(tuned)
    assert len(got) == len(expected) > 0
    for path, value in expected.items():
        np.testing.assert_array_equal(got[path if name == "clip" else f"towers/{path}"], value, err_msg=path)
    saved = json.loads((tmp_path / "eval" / "step_2.json").read_text())
    section = "downstream" if task == "ve" else "retrieval"
    assert saved["sets"]["embedded"][section][key] == final[key]
    assert any(f"eval/embedded/{key}" in record for record in read_metrics(tmp_path))
    again = run.evaluate_checkpoint(config, str(tmp_path / "again"), str(tmp_path))
    assert again[key] == final[key]


def test_full_finetuning_moves_the_towers_and_scores_rec(trained_runs, tmp_path):
    _, run_dir, _, _ = trained_runs("clip")
    config = shrink(rec.get_config("tiny"))
    config.init_from = str(run_dir)
    config.train.param_groups.backbone.lr_multiplier = 0.5
    final = train.train_and_evaluate(config, str(tmp_path))
    assert final["rec_accuracy_iou50"] >= final["rec_top1"] >= 0  # the world's boxes never overlap: equal
    assert final["rec_chance"] == pytest.approx(100 / 3)  # three objects per scene
    tuned, pretrained = towers(checkpoint.load_params(tmp_path).tree), towers(checkpoint.load_params(run_dir).tree)
    moved = [path for path in pretrained if not np.array_equal(tuned[path], pretrained[path])]
    assert len(moved) == len(pretrained)


def test_pretraining_cmal_then_vqa_as_one_command(tmp_path):
    """`vqa.py:tiny,cmal`: a CMAL stage trains into <workdir>/pretrain, then VQA fine-tunes its towers and its
    unified encoder (held frozen here: it must be exactly CMAL's) with its tokenizer; the answers are the world's."""
    config = shrink(vqa.get_config("tiny,cmal"))
    for tower in (config.model.image, config.model.text):  # the stage pre-trains these towers
        tower.update(dict(width=32, depth=1, heads=2, mlp_dim=64))
    config.model.embed_dim = 16
    config.finetune.pretrain_train = dict(steps=2, batch_size=16, warmup_steps=1, log_every=1)
    config.train.param_groups.fusion = dict(pattern="unified/.*", frozen=True)
    final = train.train_and_evaluate(config, str(tmp_path))
    assert 0 <= final["vqa_score"] <= 100 and final["vqa_in_vocabulary"] == 100
    saved, _, _ = checkpoint.saved_run(tmp_path, "test")
    assert saved.init_from == str(tmp_path / "pretrain") and saved.finetune.backbone == "cmal"
    assert tuple(saved.data.answers) == world_tasks.answer_vocabulary(config.data.world)
    assert saved.data.tokenizer.path == str(tmp_path / "pretrain" / "tokenizer.model")
    tuned, pretrained = (checkpoint.load_params(path).tree for path in (tmp_path, tmp_path / "pretrain"))
    got = {path: np.asarray(v) for path, v in checkpoint.leaves_by_path(tuned["unified"]).items()}
    cmal = checkpoint.leaves_by_path(pretrained["unified"])
    assert set(cmal) - set(got) == {f"{adapter}/{p}" for adapter in ("region_to_text", "text_to_region")
                                    for p in ("bias", "kernel")}  # the swap adapters: pre-training only
    for path, value in got.items():
        np.testing.assert_array_equal(value, cmal[path], err_msg=path)
