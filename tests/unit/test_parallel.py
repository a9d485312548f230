"""Mesh construction, the logical-axis table and batch checks: shapes and the errors users see."""

import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from configs import clip
from vlp_jax import methods, parallel
from vlp_jax.optimizer import make_optimizer
from vlp_jax.state import create_train_state


def mesh_config(data, fsdp, model):
    return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, model=model))


def test_wildcard_axis_takes_the_remaining_devices():
    assert parallel.mesh_shape(mesh_config(-1, 2, 1), 8) == (4, 2, 1)
    assert dict(parallel.make_mesh(mesh_config(2, -1, 2)).shape) == {"data": 2, "fsdp": 2, "model": 2}


@pytest.mark.parametrize(
    "axes, message",
    [((4, 4, 1), "needs 16 devices but 8 are available"), ((-1, 3, 1), "not divisible"), ((-1, -1, 1), "at most one")],
)
def test_mesh_not_matching_devices_is_a_clear_error(axes, message):
    with pytest.raises(ValueError, match=message) as error:
        parallel.mesh_shape(mesh_config(*axes), 8)
    assert "--config.mesh" in str(error.value)


def test_batch_not_divisible_names_the_flag():
    mesh = parallel.make_mesh(mesh_config(4, 2, 1))
    parallel.check_batch_size(16, mesh)
    with pytest.raises(ValueError, match=r"config.train.batch_size=12 is not divisible by the 8") as error:
        parallel.check_batch_size(12, mesh)
    assert "--config.train.batch_size=8" in str(error.value)


def test_state_is_created_sharded_by_the_logical_rules():
    config = clip.get_config("tiny")
    mesh = parallel.make_mesh(mesh_config(2, 2, 2))
    method = methods.build(config, mesh)
    batch = {"image": np.zeros((1, 32, 32, 3), np.uint8), "text": np.zeros((1, config.model.text.max_len), np.int32)}
    with parallel.mesh_context(mesh):
        state, _ = create_train_state(method, make_optimizer(config.train), batch, mesh, seed=0)
    mlp = state.params["towers"]["image_tower"]["encoder"]["block0"]["mlp"]["fc1"]["kernel"]
    assert mlp.sharding.spec == PartitionSpec("fsdp", "model")  # ('embed', 'mlp') through LOGICAL_AXIS_RULES
    assert mlp.addressable_shards[0].data.shape == (config.model.image.width // 2, config.model.image.mlp_dim // 2)
    # Adam's first moment follows its parameter's sharding.
    mu = state.opt_state[1][0].mu["towers"]["image_tower"]["encoder"]["block0"]["mlp"]["fc1"]["kernel"]
    assert mu.sharding == mlp.sharding
