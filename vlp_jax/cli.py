"""Shared command-line plumbing for `vlp_jax.main` and `vlp_jax.bench`: the config flag and friendly errors.

Flag parsing errors (a missing config file, an unknown variant, an override naming a key that does not exist)
are reported as one line naming the flag and the fix, not as a traceback, with exit code 2. Errors at run time
(`report_errors`) are one line on stderr too, each kind with its own exit code (EXIT_CODES); `--debug` shows the
traceback. Library logs (orbax, jax, grain) are kept at WARNING unless `--library_logs`.
"""

import errno
import glob
import importlib.util
import logging
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
    """absl flag parser for app.run; exits 2 with one line. The config file runs once; only when parsing fails is
    it loaded again, to name the override key that does not exist and list the ones that do."""
    try:
        try:
            remaining = FLAGS(argv)
            if "config" in FLAGS and FLAGS["config"].present:
                FLAGS.config.keys()  # config_flags defers a load failure to the first use: surface it here
            return remaining
        except (flags.Error, AttributeError, KeyError, TypeError, OSError):
            spec = _config_argument(argv)
            if spec is not None:
                check_overrides(load_config(spec), argv)  # raises the friendlier message when it applies
            raise
    except (flags.Error, ValueError, OSError, AttributeError, KeyError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


# Exit codes of run-time errors, by exception type (the first match in order wins). 75 (preempted, saved) is
# preemption.PREEMPTED_EXIT_CODE; 2 is a bad flag or config value.
EXIT_CODES = (
    ("DiskFullError", 8),
    ("CheckpointError", 5),
    (MemoryError, 6),
    (FloatingPointError, 7),
    (PermissionError, 4),
    (FileNotFoundError, 3),
    ("ShardError", 3),  # a shard that cannot be read (truncated, corrupt): the input is not there as named
    (ValueError, 2),
)


def exit_code(error: BaseException) -> int | None:
    """The exit code of a user error, None for anything else (a bug: its traceback is shown)."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return dict(EXIT_CODES)["DiskFullError"]
    names = {cls.__name__ for cls in type(error).__mro__}
    for kind, code in EXIT_CODES:
        if (kind in names) if isinstance(kind, str) else isinstance(error, kind):
            return code
    return None


def report_errors(function, *args, debug: bool = False):
    """Runs function(*args); a user error (exit_code) becomes one line on stderr and its exit code, with the
    traceback only when `debug`."""
    try:
        return function(*args)
    except Exception as error:  # noqa: BLE001 - classified below; anything unknown is re-raised
        code = exit_code(error)
        if code is None or debug:
            raise
        message = " ".join(str(error).split("\n")[0].split()) if code != 5 else str(error).strip()
        print(f"error: {message} (exit {code}; --debug shows the traceback)", file=sys.stderr)
        sys.exit(code)


class _OwnLogsOnly(logging.Filter):
    """Passes warnings and errors from anywhere, and INFO from vlp_jax's own modules only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or f"{os.sep}vlp_jax{os.sep}" in record.pathname


def quiet_library_logs() -> None:
    """Library INFO chatter (orbax saves, jax compilation cache) off the console and log files."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(_OwnLogsOnly())
