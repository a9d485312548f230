"""Method registry: `build(config, mesh)` returns the method named by `config.method.name`."""

from collections.abc import Callable

import ml_collections
from etils import epath
from jax.sharding import Mesh

from vlp_jax.methods.base import Method
from vlp_jax.methods.brivl import BrivlMethod
from vlp_jax.methods.clip import ClipMethod
from vlp_jax.methods.cots import CotsMethod
from vlp_jax.methods.vq import VQMethod

REGISTRY: dict[str, type] = {"brivl": BrivlMethod, "clip": ClipMethod, "cots": CotsMethod, "vq": VQMethod}


def build(config: ml_collections.ConfigDict, mesh: Mesh) -> Method:
    name = config.method.name
    if name not in REGISTRY:
        raise ValueError(f"config.method.name={name!r} is unknown; known methods: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name](config, mesh)


def prepare(config: ml_collections.ConfigDict, workdir, train_fn: Callable | None) -> ml_collections.ConfigDict:
    """Runs the stages the configured method needs before its own run (COTS: its visual tokenizer) and returns
    the config to train with. A method opts in with a `prepare(config, workdir, train_fn)` static method;
    `train_fn(config, workdir)` trains a stage, None (evaluation) only accepts finished stages."""
    hook = getattr(REGISTRY.get(config.method.name), "prepare", None)
    return config if hook is None else hook(config, epath.Path(workdir), train_fn)
