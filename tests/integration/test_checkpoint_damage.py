"""A damaged latest checkpoint is moved aside and the run resumes bit-identically from the one before; a full disk
during a save is one DiskFullError that keeps the last complete checkpoint."""

import errno
import logging
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.helpers import small_towers, tiny_config
from vlp_jax import step, train
from vlp_jax.checkpoint import DAMAGED_DIR, Checkpointer, CheckpointError, DiskFullError, abstract_like

STEPS = 4


def run_config():
    """4 steps of small towers, a checkpoint at every step, no final evaluation: seconds per rerun."""
    config = small_towers(tiny_config(steps=STEPS))
    config.checkpoint.update(dict(every=1, keep=None))
    config.eval.final = False
    return config


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run's workdir, with checkpoints at steps 1..4."""
    workdir = tmp_path_factory.mktemp("reference")
    assert train.train_and_evaluate(run_config(), str(workdir)) == {}
    return workdir


def copy_of(reference, tmp_path, keep_steps=STEPS):
    """A copy of the reference workdir holding its checkpoints up to `keep_steps`."""
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    for later in range(keep_steps + 1, STEPS + 1):
        shutil.rmtree(workdir / "checkpoints" / str(later))
    return workdir


def restored(workdir, at):
    """(state, data position) of checkpoint `at`, restored onto the default mesh."""
    run = step.setup(run_config())
    checkpointer = Checkpointer(workdir, run_config().checkpoint)
    try:
        return checkpointer.restore(at, abstract_like(run.state, run.shardings))
    finally:
        checkpointer.close()


def assert_same_checkpoint(workdir, reference, at):
    (state, data), (expected, expected_data) = restored(workdir, at), restored(reference, at)
    assert data == expected_data
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), state, expected)


def truncate_largest_file(state_dir):
    largest = max((path for path in state_dir.rglob("*") if path.is_file()), key=lambda path: path.stat().st_size)
    with open(largest, "r+b") as file:
        file.truncate(largest.stat().st_size // 2)


DAMAGE = {
    "truncated_data": truncate_largest_file,
    "missing_metadata": lambda state_dir: (state_dir / "_METADATA").unlink(),
    "missing_state": shutil.rmtree,
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_latest_checkpoint_is_moved_aside_and_the_run_resumes_from_the_previous(
        damage, reference, tmp_path, caplog):
    workdir = copy_of(reference, tmp_path)
    DAMAGE[damage](workdir / "checkpoints" / str(STEPS) / "state")
    with caplog.at_level(logging.WARNING):
        assert train.train_and_evaluate(run_config(), str(workdir)) == {}
    aside = workdir / DAMAGED_DIR / str(STEPS)
    assert aside.is_dir() and (aside / "config").is_dir()  # moved, not deleted
    warnings = [r.getMessage() for r in caplog.records if "damaged checkpoint" in r.getMessage()]
    assert len(warnings) == 1
    assert str(workdir / "checkpoints" / str(STEPS)) in warnings[0] and "1 step(s) will be redone" in warnings[0]
    assert_same_checkpoint(workdir, reference, STEPS)  # redone step 4 is bit-identical to the uninterrupted one


def test_no_restorable_checkpoint_is_one_line_error_and_moves_nothing(reference, tmp_path):
    workdir = copy_of(reference, tmp_path, keep_steps=2)
    for at in (1, 2):
        shutil.rmtree(workdir / "checkpoints" / str(at) / "state")
    run = step.setup(run_config())
    checkpointer = Checkpointer(workdir, run_config().checkpoint)
    try:
        with pytest.raises(CheckpointError, match="none of the 2 checkpoints") as raised:
            checkpointer.restore_latest(abstract_like(run.state, run.shardings), run_config())
    finally:
        checkpointer.close()
    assert "\n" not in str(raised.value) and "--workdir" in str(raised.value)
    assert str(workdir / "checkpoints") in str(raised.value)
    assert not (workdir / DAMAGED_DIR).exists() and (workdir / "checkpoints" / "2").is_dir()


def no_space():
    return OSError(errno.ENOSPC, "No space left on device")


def fail_in_save(monkeypatch):
    """The save of step 3 raises ENOSPC at once."""
    original = ocp.CheckpointManager.save

    def save(self, at, *args, **kwargs):
        if at == 3:
            raise no_space()
        return original(self, at, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)


def fail_in_wait(monkeypatch):
    """The save of step 3 writes nothing, and waiting for it raises ENOSPC wrapped as orbax's writer thread does."""
    original_save, original_wait = ocp.CheckpointManager.save, ocp.CheckpointManager.wait_until_finished
    failed = []

    def save(self, at, *args, **kwargs):
        if at == 3:
            failed.append(at)
            return True
        return original_save(self, at, *args, **kwargs)

    def wait(self):
        if failed:
            raise RuntimeError("Save Finalize thread failed") from no_space()
        return original_wait(self)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", wait)


@pytest.mark.parametrize("fail", [fail_in_save, fail_in_wait])
def test_full_disk_is_one_error_and_keeps_the_last_checkpoint(fail, reference, tmp_path, monkeypatch):
    workdir = copy_of(reference, tmp_path, keep_steps=2)
    fail(monkeypatch)
    with pytest.raises(DiskFullError) as raised:
        train.train_and_evaluate(run_config(), str(workdir), stop_after=1)  # step 3, then its save fails
    message = str(raised.value)
    directory = workdir / "checkpoints"
    assert f"in {directory}:" in message and " bytes) and " in message and "is free" in message
    assert f"last complete checkpoint is {directory / '2'} (step 2)" in message
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    monkeypatch.undo()
    assert_same_checkpoint(workdir, reference, 2)
