"""Shared command-line plumbing for `vlp_jax.main` and `vlp_jax.bench`: the config flag and friendly errors.

Flag parsing errors (a missing config file, an unknown variant, an override naming a key that does not exist)
are reported as one line naming the flag and the fix, not as a traceback.
"""

import glob
import importlib.util
import os
import sys

import ml_collections
from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS


def define_config_flag() -> None:
    config_flags.DEFINE_config_file(
        "config", None, "Config file and variant, e.g. configs/clip.py:tiny.", lock_config=True
    )
    flags.mark_flags_as_required(["config"])


def _config_argument(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Imports `path.py` from `path.py[:variant]` and returns its get_config(variant)."""
    path, _, variant = spec.partition(":")
    if not os.path.isfile(path):
        candidates = sorted(glob.glob(os.path.join(os.path.dirname(path) or ".", "*.py")))
        available = ", ".join(c for c in candidates if "def get_config" in open(c, encoding="utf-8").read())
        raise ValueError(f"--config={spec}: no config file {path!r}. Available here: {available or 'none'}")
    module_spec = importlib.util.spec_from_file_location("vlp_jax_user_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant) if variant else module.get_config()


def check_overrides(config: ml_collections.ConfigDict, argv: list[str]) -> None:
    """Every `--config.a.b=value` must name an existing key; the error lists the keys that do exist."""
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        dotted = arg[len("--config.") :].split("=", 1)[0]
        node, walked = config, "config"
        for key in dotted.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or key not in node:
                keys = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else "none"
                raise ValueError(f"{arg}: {walked} has no key {key!r}. Its keys: {keys}")
            node, walked = node[key], f"{walked}.{key}"


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parser for app.run: checks the config arguments first, then parses; exits 2 with one line."""
    try:
        spec = _config_argument(argv)
        if spec is not None:
            check_overrides(load_config(spec), argv)
        return FLAGS(argv)
    except (flags.Error, ValueError, OSError, AttributeError, KeyError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
