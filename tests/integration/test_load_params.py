"""The partial checkpoint reader: selected leaves of a run's params (or extra), renamed, into a target or alone;
every problem of a selection reported at once; warm starts from config.init_from + config.init."""

import jax
import numpy as np
import pytest

from tests.helpers import tiny_config
from vlp_jax import step
from vlp_jax.checkpoint import Checkpointer, CheckpointError, abstract_like, leaves_by_path, load_params, warm_start

IMAGE_TOWER = "towers/image_tower/.*"


@pytest.fixture(scope="module")
def saved_run(trained_runs):
    """The shared tiny CLIP run: (workdir, its saved params, fresh params of the same config (sharded jax.Arrays))."""
    config, workdir, _, _ = trained_runs("clip")
    run = step.setup(config)
    checkpointer = Checkpointer(workdir, config.checkpoint)
    state, _ = checkpointer.restore(checkpointer.latest_step(), abstract_like(run.state, run.shardings))
    checkpointer.close()
    return workdir, leaves_by_path(jax.device_get(state.params)), run.state.params


def assert_leaves(tree, expected: dict, paths):
    leaves = leaves_by_path(jax.device_get(tree))
    for path in paths:
        np.testing.assert_array_equal(leaves[path], expected[path], err_msg=path)


def test_everything_loads_into_the_fresh_params(saved_run):
    workdir, saved, fresh = saved_run
    loaded = load_params(workdir, target=fresh)
    assert loaded.step == 30 and loaded.directory.name == "30" and loaded.config.method.name == "clip"
    assert set(loaded.paths) == set(saved)
    assert_leaves(loaded.tree, saved, saved)
    for leaf, like in zip(jax.tree.leaves(loaded.tree), jax.tree.leaves(fresh), strict=True):
        assert isinstance(leaf, jax.Array) and leaf.sharding == like.sharding and leaf.dtype == like.dtype
    assert not all(np.array_equal(saved[path], value) for path, value in leaves_by_path(jax.device_get(fresh)).items())


def test_include_replaces_only_the_selected_leaves(saved_run):
    workdir, saved, fresh = saved_run
    initial = leaves_by_path(jax.device_get(fresh))
    image = {path for path in saved if path.startswith("towers/image_tower/")}
    loaded = load_params(workdir, include=(IMAGE_TOWER,), target=fresh)
    assert set(loaded.paths) == image
    assert_leaves(loaded.tree, saved, image)
    assert_leaves(loaded.tree, initial, set(saved) - image)


def test_exclude_drops_leaves_after_include(saved_run):
    workdir, saved, fresh = saved_run
    initial = leaves_by_path(jax.device_get(fresh))
    dropped = {path for path in saved if path.startswith("towers/image_tower/") or path.endswith("bias")}
    loaded = load_params(workdir, exclude=(IMAGE_TOWER, ".*bias"), target=fresh)
    assert set(loaded.paths) == set(saved) - dropped
    assert_leaves(loaded.tree, saved, set(saved) - dropped)
    assert_leaves(loaded.tree, initial, dropped)


def test_without_target_the_selection_comes_back_as_host_arrays_under_renamed_paths(saved_run):
    workdir, saved, _ = saved_run
    loaded = load_params(workdir, include=(IMAGE_TOWER,), rename=((r"^towers/image_tower/", "vision/"),))
    assert list(loaded.tree) == ["vision"]
    tree = leaves_by_path(loaded.tree)
    assert set(tree) == {path.replace("towers/image_tower/", "vision/") for path in saved if "image_tower" in path}
    assert all(isinstance(value, np.ndarray) for value in tree.values())
    np.testing.assert_array_equal(tree["vision/cls"], saved["towers/image_tower/cls"])


def test_rename_loads_a_saved_block_into_another(saved_run):
    workdir, saved, fresh = saved_run
    initial = leaves_by_path(jax.device_get(fresh))
    block0 = [path for path in saved if path.startswith("towers/image_tower/encoder/block0/")]
    loaded = load_params(workdir, include=("towers/image_tower/encoder/block0/.*",),
                         rename=("encoder/block0/=encoder/block1/",), target=fresh)
    leaves = leaves_by_path(jax.device_get(loaded.tree))
    for path in block0:
        np.testing.assert_array_equal(leaves[path.replace("block0", "block1")], saved[path])
        np.testing.assert_array_equal(leaves[path], initial[path])


def test_selection_problems_are_listed_together(saved_run):
    workdir, saved, fresh = saved_run
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), jax.device_get(fresh))
    target["towers"]["image_tower"]["cls"] = jax.ShapeDtypeStruct((1, 2, 96), np.float32)  # saved (1, 1, 96)
    del target["logit_scale"]
    with pytest.raises(CheckpointError) as error:
        load_params(workdir, target=target, flag="--config.teacher")
    message = str(error.value)
    assert message.startswith(f"--config.teacher={workdir}: cannot load its params")
    assert "towers/image_tower/cls: saved shape (1, 1, 96), target shape (1, 2, 96)" in message
    assert "no counterpart in the target (unmatched, 1):\n    logit_scale/log_scale" in message


def test_renamed_leaves_without_counterpart_are_all_listed(saved_run):
    workdir, _, fresh = saved_run
    with pytest.raises(CheckpointError, match=r"(?s)unmatched, 2\):\n    towers/text_tower/pos_embedding \(renamed "
                                              r"text/pos_embedding\)\n    towers/text_tower/token_embed/embedding"):
        load_params(workdir, include=("towers/text_tower/(pos|token)_embed.*",), rename=("^towers/text_tower/=text/",),
                    target=fresh)


def test_a_selection_of_nothing_shows_the_saved_paths(saved_run):
    workdir, _, _ = saved_run
    with pytest.raises(CheckpointError, match=r"include/exclude select none of the \d+ params arrays; their paths "
                                              r"look like logit_scale/log_scale, towers/"):
        load_params(workdir, include=("towers/vision/.*",))


def test_missing_runs_and_steps_are_refused(saved_run, tmp_path):
    workdir, _, _ = saved_run
    with pytest.raises(CheckpointError, match=r"--config.init_from=.*nowhere: .*does not exist"):
        load_params(tmp_path / "nowhere")
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"--config.x=.*empty: .*holds no complete vlp_jax checkpoint"):
        load_params(tmp_path / "empty", flag="--config.x")
    with pytest.raises(CheckpointError, match=r"has no checkpoint of step 2; it has steps \[30\]"):
        load_params(workdir, step=2)
    with pytest.raises(ValueError, match="include: '\\(' is not a valid regex"):
        load_params(workdir, include=("(",))


def test_extra_is_read_like_params(tmp_path):
    config = tiny_config()
    state = {
        "params": {"dense": {"kernel": np.ones((2, 3), np.float32)}},
        "opt_state": {"mu": np.zeros((2, 3), np.float32)},
        "extra": {"ema": {"dense": {"kernel": np.full((2, 3), 7.0, np.float32)}},
                  "queue": (np.arange(4, dtype=np.float32), np.arange(6, dtype=np.int32).reshape(2, 3))},
    }
    checkpointer = Checkpointer(tmp_path, config.checkpoint)
    checkpointer.save(5, state, {}, config)
    checkpointer.wait()
    checkpointer.close()
    loaded = load_params(tmp_path, item="extra")
    assert loaded.step == 5 and set(loaded.paths) == {"ema/dense/kernel", "queue/0", "queue/1"}
    np.testing.assert_array_equal(loaded.tree["ema"]["dense"]["kernel"], state["extra"]["ema"]["dense"]["kernel"])
    np.testing.assert_array_equal(loaded.tree["queue"]["1"], state["extra"]["queue"][1])
    only = load_params(tmp_path, include=("queue/1",), item="extra")
    assert only.paths == ("queue/1",) and only.tree["queue"]["1"].dtype == np.int32


def test_warm_start_applies_init_from_and_init(saved_run):
    workdir, saved, fresh = saved_run
    config = tiny_config()
    assert warm_start(fresh, config) is fresh  # no init_from: nothing read
    config.init_from = str(workdir)
    config.init.include = (IMAGE_TOWER,)
    config.init.exclude = (".*/block1/.*",)
    warm = leaves_by_path(jax.device_get(warm_start(fresh, config)))
    initial = leaves_by_path(jax.device_get(fresh))
    loaded = {path for path in saved if path.startswith("towers/image_tower/") and "/block1/" not in path}
    assert loaded and all(np.array_equal(warm[path], saved[path]) for path in loaded)
    assert all(np.array_equal(warm[path], initial[path]) for path in set(saved) - loaded)
