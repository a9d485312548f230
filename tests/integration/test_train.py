"""End to end on the embedded world: the loss falls, runs are reproducible, metrics are written, OOM fails fast."""

import os
import shutil
import signal
import threading
import time

import numpy as np
import pytest

from tests.helpers import read_metrics, tiny_config
from vlp_jax import preemption, train
from vlp_jax.evaluate.retrieval import RECALL_KEYS


@pytest.fixture(scope="module")
def two_runs(tiny_run, tmp_path_factory):
    """The same config and seed trained twice in fresh workdirs."""
    workdir = tmp_path_factory.mktemp("second")
    final = train.train_and_evaluate(tiny_config(), str(workdir))
    return [tiny_run[1:], (final, read_metrics(workdir))]


def train_losses(records):
    return [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]


def test_loss_falls(two_runs):
    losses = [loss for _, loss in train_losses(two_runs[0][1])]
    assert len(losses) == 6
    assert losses[-1] < losses[0] - 0.5, losses


def test_same_config_and_seed_give_identical_loss_curves(two_runs):
    (final_a, records_a), (final_b, records_b) = two_runs
    assert train_losses(records_a) == train_losses(records_b)
    assert final_a == final_b


def test_metrics_jsonl_has_the_documented_keys(two_runs):
    final, records = two_runs[0]
    train_keys = set().union(*(r.keys() for r in records if "train/loss" in r))
    expected = {"step", "train/loss", "train/temperature", "train/grad_norm", "train/learning_rate",
                "train/pairs_per_sec", "train/mfu"}
    assert expected <= train_keys
    last = records[-1]
    assert last["step"] == 30
    for key in RECALL_KEYS:
        assert last[f"eval/embedded/{key}"] == final[key]
        assert 0.0 <= final[key] <= 100.0
    assert final["mean_r1"] == pytest.approx((final["i2t_r1"] + final["t2i_r1"]) / 2)


def test_different_seed_gives_a_different_run(two_runs, tmp_path):
    config = tiny_config(steps=5)
    config.seed = 1
    config.eval.final = False  # only the losses are compared
    train.train_and_evaluate(config, str(tmp_path))
    other = train_losses(read_metrics(tmp_path))[0][1]
    assert not np.isclose(other, train_losses(two_runs[0][1])[0][1], rtol=0, atol=1e-7)


def test_step_that_cannot_fit_fails_before_training(tmp_path):
    config = tiny_config(device_memory_bytes=1024)
    with pytest.raises(MemoryError, match=r"needs .* per device but only .* available.*batch_size.*remat.*fsdp"):
        train.train_and_evaluate(config, str(tmp_path))
    assert not (tmp_path / "metrics.jsonl").exists()


def test_unwritable_workdir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(PermissionError, match=r"--workdir=.*file/run is not writable"):
        train.train_and_evaluate(tiny_config(), str(blocker / "run"))


def test_batch_not_divisible_by_devices_fails_before_compiling(tmp_path):
    with pytest.raises(ValueError, match=r"config.train.batch_size=60 is not divisible by the 8"):
        train.train_and_evaluate(tiny_config(batch_size=60), str(tmp_path))


def test_memory_verdict_and_plan_come_before_any_data_is_read(tmp_path, caplog):
    config = tiny_config(device_memory_bytes=1024)
    with caplog.at_level("INFO"), pytest.raises(MemoryError):
        train.train_and_evaluate(config, str(tmp_path))
    messages = [record.getMessage() for record in caplog.records]
    assert not any(message.startswith("data: ") for message in messages)  # no data was read
    assert not any(message.startswith("text tokenizer: ") for message in messages)
    assert not (tmp_path / "tokenizer.model").exists()
    assert any(message.startswith("plan: clip (tiny) with ") for message in messages)


def test_sigterm_while_the_world_renders_stops_within_seconds_leaving_nothing(tmp_path):
    config = tiny_config()
    config.data.world_storage = "shards"  # written up front (the lazy default renders nothing before reading)
    config.data.train_size = 500_000  # minutes of rendering
    sent = {}

    def send_when_rendering():
        deadline = time.monotonic() + 120
        while not list((tmp_path / "data").glob(".world-*.partial")) and time.monotonic() < deadline:
            time.sleep(0.05)
        sent["at"] = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=send_when_rendering, daemon=True).start()
    with pytest.raises(preemption.Interrupted, match="received SIGTERM while reading the data"):
        train.train_and_evaluate(config, str(tmp_path))
    assert time.monotonic() - sent["at"] < 5
    world_root = tmp_path / "data"
    assert not world_root.exists() or list(world_root.iterdir()) == []  # the staged world was removed
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").iterdir())


def test_changing_train_steps_on_resume_is_logged_with_the_learning_rate_jump(tiny_run, tmp_path, caplog):
    workdir = tmp_path / "run"
    shutil.copytree(tiny_run[0], workdir)
    config = tiny_config(steps=60)
    config.eval.final = False
    with caplog.at_level("WARNING"):
        train.train_and_evaluate(config, str(workdir), stop_after=1)
    warning = [r.getMessage() for r in caplog.records if "train.steps changed" in r.getMessage()]
    assert len(warning) == 1 and "30 -> 60 on resume" in warning[0] and "at step 30 it goes from 0 to" in warning[0]
