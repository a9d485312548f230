"""Run-time user errors from the command line: one line on stderr naming the flag and the fix, a distinct exit
code per kind, the traceback only with --debug; --mode=eval takes the run's saved config."""

import os
import subprocess
import sys

import pytest

from configs import clip
from tests.helpers import tiny_config
from vlp_jax.evaluate import run as eval_run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_main(*args):
    command = [sys.executable, "-m", "vlp_jax.main", "--config=configs/clip.py:tiny", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)  # env: 8 CPU devices


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--config.train.batch_size=60"], 2, "config.train.batch_size=60 is not divisible by the 8"),
        (["--config.train.steps=0"], 2, "config.train.steps=0 must be positive"),
        (["--workdir={tmp}/file/run"], 4, "--workdir={tmp}/file/run is not writable"),
        (["--mode=eval", "--workdir={tmp}/empty"], 3, "is neither a run directory"),
    ],
)
def test_runtime_errors_are_one_line_with_their_exit_code(tmp_path, args, code, message):
    (tmp_path / "file").write_text("not a directory")
    args = [arg.format(tmp=tmp_path) for arg in args]
    if not any(arg.startswith("--workdir") for arg in args):
        args.append(f"--workdir={tmp_path}/run")
    result = run_main(*args)
    assert result.returncode == code, result.stderr[-2000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and message.format(tmp=tmp_path) in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_debug_shows_the_traceback(tmp_path):
    result = run_main("--config.train.steps=0", f"--workdir={tmp_path}", "--debug")
    assert result.returncode == 1 and "Traceback" in result.stderr
    assert "config.train.steps=0 must be positive" in result.stderr


def test_eval_mode_needs_none_of_the_training_overrides(tiny_run, tmp_path):
    workdir, final, _ = tiny_run
    config = clip.get_config("tiny")  # the run changed steps, batch, warmup, lr and the data sizes
    config.eval = tiny_config().eval  # evaluation keys may differ; these are the run's
    assert eval_run.evaluate_checkpoint(config, str(tmp_path), str(workdir)) == final
