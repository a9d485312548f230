"""Run-time user errors from the command line: one line on stderr naming the flag and the fix, a distinct exit
code per kind, the traceback only with --debug; --mode=eval takes the run's saved config."""

import os
import subprocess
import sys

import pytest

from configs import clip
from tests.helpers import tiny_config
from vlp_jax.data import records, synthetic
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
        (["--config.mesh.data=3"], 2, "needs 3 devices but 8 are available. Set --config.mesh.data=-1"),
        (["--config.data.train_sources={tmp}/shards"], 3, "config.data.train_sources: {tmp}/shards does not exist"),
        (["--config.data.tokenizer.path={tmp}/tok.model"], 3, "tokenizer model {tmp}/tok.model does not exist"),
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


def test_a_truncated_shard_is_one_line_naming_it(tmp_path):
    world = tiny_config().data.world
    records.write_records(synthetic.split_records(world, "train", 4), tmp_path / "shards", "train", 4)
    [shard] = (tmp_path / "shards").glob("train-*.array_record")
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size // 2])
    # Named by its dataset directory, the manifest's size check finds it; named by itself, opening it does.
    for source, code, message in [
        (tmp_path / "shards", 2, f"shard {shard} has {size // 2} bytes but manifest.json says {size}"),
        (shard, 3, f"shard {shard} is not a readable ArrayRecord file"),
    ]:
        result = run_main(f"--config.data.train_sources={source}", f"--workdir={tmp_path}/run")
        lines = error_lines(result.stderr)
        assert result.returncode == code and len(lines) == 1, result.stderr[-2000:]
        assert message in lines[0] and "Traceback" not in result.stderr


def test_debug_shows_the_traceback(tmp_path):
    result = run_main("--config.train.steps=0", f"--workdir={tmp_path}", "--debug")
    assert result.returncode == 1 and "Traceback" in result.stderr
    assert "config.train.steps=0 must be positive" in result.stderr


def test_eval_mode_needs_none_of_the_training_overrides(tiny_run, tmp_path):
    workdir, final, _ = tiny_run
    config = clip.get_config("tiny")  # the run changed steps, batch, warmup, lr and the data sizes
    config.eval = tiny_config().eval  # evaluation keys may differ; these are the run's
    assert eval_run.evaluate_checkpoint(config, str(tmp_path), str(workdir)) == final
