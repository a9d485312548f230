"""Method registry: `build(config, mesh)` returns the method named by `config.method.name`."""

import ml_collections
from jax.sharding import Mesh

from vlp_jax.methods.base import Method
from vlp_jax.methods.clip import ClipMethod

REGISTRY: dict[str, type] = {"clip": ClipMethod}


def build(config: ml_collections.ConfigDict, mesh: Mesh) -> Method:
    name = config.method.name
    if name not in REGISTRY:
        raise ValueError(f"config.method.name={name!r} is unknown; known methods: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name](config, mesh)
