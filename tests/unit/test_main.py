"""The command line: friendly one-line errors for bad flags, and the default workdir."""

import logging
import os
import subprocess
import sys

import pytest

from vlp_jax import cli
from vlp_jax.main import default_workdir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_main(*args):
    return subprocess.run(
        [sys.executable, "-m", "vlp_jax.main", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config=configs/nope.py"],
         "no config file 'configs/nope.py'. Available here: configs/brivl.py, configs/clip.py, "),
        (["--config=configs/clip.py:huge"], "Unknown config variant 'huge'. Use one of tiny, small, base, large"),
        (["--config=configs/clip.py:tiny", "--config.train.bogus=3"], "config.train has no key 'bogus'. Its keys: b1"),
        (["--config=configs/clip.py:tiny", "--config.train.steps=abc"], "--config.train.steps=abc"),
    ],
)
def test_bad_flags_exit_with_one_clear_line(args, message):
    result = run_main(*args, "--workdir=/tmp/unused")
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_default_workdir_names_config_and_variant():
    assert default_workdir("configs/clip.py:tiny") == os.path.join("workdir", "clip-tiny")
    assert default_workdir("configs/clip.py") == os.path.join("workdir", "clip-base")


def test_override_check_walks_nested_keys():
    config = cli.load_config(os.path.join(ROOT, "configs/clip.py:tiny"))
    cli.check_overrides(config, ["--config.model.image.width=64", "--workdir=x"])
    with pytest.raises(ValueError, match="config.model.image has no key 'widht'"):
        cli.check_overrides(config, ["--config.model.image.widht=64"])


def test_checkpoint_flag_outside_eval_mode_is_refused_with_the_fix():
    result = run_main("--config=configs/clip.py:tiny", "--checkpoint=/tmp/some_run", "--workdir=/tmp/unused")
    assert result.returncode != 0
    assert "--checkpoint=/tmp/some_run is only read with --mode=eval" in result.stderr
    assert "--config.init_from" in result.stderr


def test_library_info_logs_are_filtered_but_warnings_and_our_own_pass():
    own_logs = cli._OwnLogsOnly()

    def record(path, level):
        return logging.LogRecord("absl", level, path, 1, "message", None, None)

    assert not own_logs.filter(record("/site-packages/orbax/checkpoint/checkpoint_manager.py", logging.INFO))
    assert own_logs.filter(record("/site-packages/orbax/checkpoint/checkpoint_manager.py", logging.WARNING))
    assert own_logs.filter(record(os.path.join(ROOT, "vlp_jax", "train.py"), logging.INFO))


@pytest.mark.parametrize(
    "error, code",
    [(ValueError("x"), 2), (FileNotFoundError("x"), 3), (PermissionError("x"), 4), (MemoryError("x"), 6),
     (FloatingPointError("x"), 7), (OSError(28, "No space left on device"), 8), (RuntimeError("bug"), None)],
)
def test_each_kind_of_user_error_has_its_exit_code(error, code):
    assert cli.exit_code(error) == code


def test_importing_the_package_starts_no_backend():
    """--distributed needs jax.distributed.initialize before any JAX computation: a module-level jnp array
    anywhere in the package (methods, models, train) would start the backend on import and break every
    multi-process run."""
    code = ("from jax._src import xla_bridge; import vlp_jax.main, vlp_jax.train, vlp_jax.methods, "
            "vlp_jax.evaluate.run; print(bool(xla_bridge._backends))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"
