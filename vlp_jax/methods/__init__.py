"""Method registry: `build(config, mesh, pretrained)` returns the method named by `config.method.name`.

`register(name, cls)` adds a method (a subclass of methods.base.Method) from outside the package, e.g. a test's.
"""

import ml_collections
from jax.sharding import Mesh

from vlp_jax.methods.base import LoadedRun, Method
from vlp_jax.methods.brivl import BrivlMethod
from vlp_jax.methods.clip import ClipMethod
from vlp_jax.methods.cmal import CmalMethod
from vlp_jax.methods.cookie import CookieMethod
from vlp_jax.methods.cots import CotsMethod
from vlp_jax.methods.finetune import FinetuneMethod, RetrievalFinetuneMethod
from vlp_jax.methods.siglip import SiglipMethod
from vlp_jax.methods.vq import VQMethod

REGISTRY: dict[str, type[Method]] = {
    "brivl": BrivlMethod, "clip": ClipMethod, "cmal": CmalMethod, "cookie": CookieMethod, "cots": CotsMethod,
    "finetune": FinetuneMethod, "finetune_retrieval": RetrievalFinetuneMethod, "siglip": SiglipMethod,
    "vq": VQMethod,
}


def register(name: str, method_class: type[Method]) -> None:
    """Makes `config.method.name=name` build `method_class`."""
    if not issubclass(method_class, Method):
        raise TypeError(f"{method_class.__name__} must subclass vlp_jax.methods.base.Method")
    REGISTRY[name] = method_class


def get(name: str) -> type[Method]:
    """The method class registered as `name`."""
    if name not in REGISTRY:
        raise ValueError(f"config.method.name={name!r} is unknown; known methods: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def build(config: ml_collections.ConfigDict, mesh: Mesh, pretrained: dict[str, LoadedRun] | None = None) -> Method:
    """The configured method; `pretrained` holds the other runs' weights it declared (step.load_pretrained)."""
    return get(config.method.name)(config, mesh, pretrained or {})
