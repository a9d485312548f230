"""Parameter groups: frozen parameters never change and hold no optimizer state, an lr multiplier scales the
update exactly, and without groups the optimizer is the plain clip + AdamW chain, state layout included."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from tests.helpers import tiny_config
from vlp_jax import parallel, step
from vlp_jax.checkpoint import leaves_by_path
from vlp_jax.optimizer import decay_mask, learning_rate_schedule, make_optimizer

IMAGE_TOWER = "towers/image_tower/.*"


def random_batch(config, size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random pixels and token ids of the tiny two-tower shapes."""
    image, text = config.model.image, config.model.text
    return {
        "image": rng.integers(0, 256, (size, image.image_size, image.image_size, 3), dtype=np.uint8),
        "text": rng.integers(0, text.vocab_size, (size, text.max_len), dtype=np.int32),
    }


def moment_paths(opt_state, name: str) -> list[str]:
    """Paths of every Adam moment array (`name` = "mu" or "nu") in the optimizer state, over all groups."""
    trees = optax.tree_utils.tree_get_all_with_path(opt_state, name)
    return [path for _, tree in trees for path in leaves_by_path(tree)]


def toy_params() -> dict:
    rng = np.random.default_rng(0)
    shapes = {"image_tower": {"kernel": (4, 3), "bias": (3,)}, "text_tower": {"kernel": (3, 5), "scale": (5,)}}
    return {"towers": jax.tree.map(lambda shape: jnp.asarray(rng.normal(size=shape), jnp.float32), shapes,
                                   is_leaf=lambda x: isinstance(x, tuple))}


def toy_train(**groups) -> ml_collections.ConfigDict:
    train = tiny_config(steps=10, warmup_steps=0).train
    train.param_groups = ml_collections.ConfigDict(groups)
    return train


def run_updates(tx, params, grads_list):
    """Applies `tx` to each gradient in turn; returns the list of updates and the final optimizer state."""
    state, updates = tx.init(params), []
    for grads in grads_list:
        update, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, update)
        updates.append(update)
    return updates, state


def toy_grads(params, count: int, scale: float = 1.0):
    rng = np.random.default_rng(1)
    return [jax.tree.map(lambda p: jnp.asarray(scale * rng.normal(size=p.shape), jnp.float32), params)
            for _ in range(count)]


def test_frozen_group_stays_bit_identical_in_the_train_step_and_holds_no_optimizer_state():
    config = tiny_config(steps=10, warmup_steps=2)
    config.mesh = ml_collections.ConfigDict(dict(data=2, fsdp=2, model=2))  # sharded moments, on 8 devices
    config.train.param_groups = ml_collections.ConfigDict({"image": dict(pattern=IMAGE_TOWER, frozen=True)})
    run = step.setup(config)
    before = leaves_by_path(jax.device_get(run.state.params))
    frozen = {path for path in before if path.startswith("towers/image_tower/")}
    assert frozen and len(frozen) < len(before)
    for name in ("mu", "nu"):  # moments exist for the trained parameters only, sharded like them
        moments = {path: leaf for _, tree in optax.tree_utils.tree_get_all_with_path(run.state.opt_state, name)
                   for path, leaf in leaves_by_path(tree).items()}
        assert set(moments) == set(before) - frozen
        params = leaves_by_path(run.state.params)
        assert all(leaf.sharding == params[path].sharding for path, leaf in moments.items())

    rng = np.random.default_rng(0)
    state = run.state
    with parallel.mesh_context(run.mesh):
        for _ in range(10):
            batch = parallel.global_batch_from_local(random_batch(config, 16, rng), run.mesh)
            state, metrics = run.train_step(state, batch)
    assert int(state.step) == 10 and int(metrics["nonfinite_total"]) == 0
    after = leaves_by_path(jax.device_get(state.params))
    for path in before:
        if path in frozen:
            np.testing.assert_array_equal(after[path], before[path], err_msg=path)
        else:
            assert not np.array_equal(after[path], before[path]), f"{path} did not train"


def test_an_lr_multiplier_of_one_half_halves_the_update_exactly():
    params = toy_params()
    grads = toy_grads(params, 3)
    full, _ = run_updates(make_optimizer(toy_train(text=dict(pattern="towers/text_tower/.*", weight_decay=0.0))),
                          params, grads)
    half, _ = run_updates(make_optimizer(toy_train(
        text=dict(pattern="towers/text_tower/.*", weight_decay=0.0, lr_multiplier=0.5))), params, grads)
    for update_full, update_half in zip(full, half, strict=True):
        np.testing.assert_array_equal(update_half["towers"]["text_tower"]["kernel"],
                                      0.5 * update_full["towers"]["text_tower"]["kernel"])
        np.testing.assert_array_equal(update_half["towers"]["text_tower"]["scale"],
                                      0.5 * update_full["towers"]["text_tower"]["scale"])
        jax.tree.map(np.testing.assert_array_equal, update_half["towers"]["image_tower"],
                     update_full["towers"]["image_tower"])
    assert np.abs(full[-1]["towers"]["text_tower"]["kernel"]).min() > 0


def test_group_weight_decay_applies_to_matrices_only():
    params = toy_params()
    zero_grads = [jax.tree.map(jnp.zeros_like, params)]  # Adam's step is 0: the update is the decay alone
    updates, _ = run_updates(make_optimizer(toy_train(text=dict(pattern="towers/text_tower/.*", weight_decay=0.5))),
                             params, zero_grads)
    rate = learning_rate_schedule(toy_train())(0)
    text = params["towers"]["text_tower"]
    np.testing.assert_allclose(updates[0]["towers"]["text_tower"]["kernel"], -rate * 0.5 * text["kernel"], rtol=1e-6)
    np.testing.assert_array_equal(updates[0]["towers"]["text_tower"]["scale"], 0.0)  # ndim 1: never decayed
    image_decay = toy_train().weight_decay  # the default group: the global weight decay
    np.testing.assert_allclose(updates[0]["towers"]["image_tower"]["kernel"],
                               -rate * image_decay * params["towers"]["image_tower"]["kernel"], rtol=1e-6)


def test_frozen_gradients_are_left_out_of_the_global_clipping_norm():
    params = toy_params()
    grads = toy_grads(params, 2, scale=100.0)  # far above grad_clip_norm: every step clips
    updates, state = run_updates(make_optimizer(toy_train(image=dict(pattern=IMAGE_TOWER, frozen=True))),
                                 params, grads)
    text_only = {"towers": {"text_tower": params["towers"]["text_tower"]}}
    reference, _ = run_updates(make_optimizer(toy_train()), text_only,
                               [{"towers": {"text_tower": g["towers"]["text_tower"]}} for g in grads])
    for update, expected in zip(updates, reference, strict=True):
        jax.tree.map(np.testing.assert_array_equal, update["towers"]["text_tower"], expected["towers"]["text_tower"])
        assert all(not np.any(u) for u in jax.tree.leaves(update["towers"]["image_tower"]))
    assert sorted(moment_paths(state, "mu")) == ["towers/text_tower/kernel", "towers/text_tower/scale"]


def test_without_groups_the_optimizer_is_the_plain_clip_and_adamw_chain():
    train = toy_train()
    reference = optax.chain(
        optax.clip_by_global_norm(train.grad_clip_norm),
        optax.adamw(learning_rate_schedule(train), b1=train.b1, b2=train.b2, eps=train.eps,
                    weight_decay=train.weight_decay, mask=decay_mask),
    )
    params = toy_params()
    grads = toy_grads(params, 3)
    expected, expected_state = run_updates(reference, params, grads)
    updates, state = run_updates(make_optimizer(train), params, grads)
    assert jax.tree.structure(state) == jax.tree.structure(expected_state)
    jax.tree.map(np.testing.assert_array_equal, (updates, state), (expected, expected_state))
    # One catch-all group of default settings: other state layout, the same numbers.
    grouped, _ = run_updates(make_optimizer(toy_train(everything=dict(pattern=".*"))), params, grads)
    jax.tree.map(np.testing.assert_array_equal, grouped, expected)


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ({"broken": dict(pattern="towers/(image")},
         r"config\.train\.param_groups\.broken\.pattern=.*not a valid regex"),
        ({"typo": dict(pattern="towers/imag_tower/.*")},
         r"config\.train\.param_groups\.typo\.pattern=.*matches no parameter; .*towers/image_tower/bias"),
        # Names in reverse alphabetical order: the groups are tried in the order they were written.
        ({"image": dict(pattern=IMAGE_TOWER), "again": dict(pattern=IMAGE_TOWER, frozen=True)},
         r"config\.train\.param_groups\.again\.pattern=.*matches no parameter that an earlier group"),
        ({"image": dict(pattern=IMAGE_TOWER, lr=2.0)}, r"config\.train\.param_groups\.image: takes a dict of"),
        ({"ungrouped": dict(pattern=IMAGE_TOWER)}, r"config\.train\.param_groups\.ungrouped: the name .* is reserved"),
    ],
)
def test_bad_groups_are_refused_naming_the_group(groups, message):
    with pytest.raises(ValueError, match=message):
        make_optimizer(toy_train(**groups)).init(toy_params())
