"""Shard checksums: opening a dataset checks each shard's size; `python -m vlp_jax.data.verify` checks sha256s."""

import subprocess
import sys

import pytest

from tests.helpers import tiny_config
from vlp_jax.data import sources, verify, world_shards

SHARD = "train-00001-of-00003.array_record"


@pytest.fixture
def dataset_dir(tmp_path):
    """A tiny world written like the pipeline writes it: 12 train scenes in 3 shards, 4 eval scenes."""
    world = tiny_config().data.world
    world.records_per_shard = 4
    return world_shards.cached_shards(world, {"train": 12, "eval": 4}, tmp_path)


def open_train(data_dir):
    return sources.open_source(sources.SourceSpec(str(data_dir), "train", 1.0), "config.data.train_sources")


def test_a_good_directory_opens_and_verifies(dataset_dir, capsys):
    assert len(open_train(dataset_dir)) == 12
    assert verify.main([str(dataset_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[:-1]] == ["ok"] * 4  # 3 train shards, 1 eval shard
    assert lines[-1] == f"{dataset_dir}: 4 shards, 4 ok, 0 mismatched, 0 missing: all match the manifest"


def test_a_truncated_shard_is_a_one_line_error_on_open(dataset_dir):
    shard = dataset_dir / SHARD
    expected = shard.stat().length
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError) as error:
        open_train(dataset_dir)
    message = str(error.value)
    assert "\n" not in message
    assert f"shard {shard} has {expected - 10} bytes but manifest.json says {expected}" in message
    assert f"re-copy it or re-run the converter; `python -m vlp_jax.data.verify {dataset_dir}`" in message


def test_a_flipped_byte_passes_the_size_check_but_not_verify(dataset_dir, capsys):
    shard = dataset_dir / SHARD
    data = bytearray(shard.read_bytes())
    data[data.index(b"IDAT") + 8] ^= 0xFF  # inside a record's image: the file stays a readable ArrayRecord file
    shard.write_bytes(bytes(data))
    assert len(open_train(dataset_dir)) == 12  # same size: opens; reading that record would skip it
    assert verify.main([str(dataset_dir)]) == 1
    lines = capsys.readouterr().out.splitlines()
    [bad] = [line for line in lines if SHARD in line]
    assert bad.startswith("MISMATCH") and "sha256" in bad
    assert sum(line.startswith("ok") for line in lines) == 3
    assert lines[-1].endswith("4 shards, 3 ok, 1 mismatched, 0 missing: re-copy the bad shards or re-run the converter")


def test_a_missing_shard_is_reported(dataset_dir, capsys):
    (dataset_dir / SHARD).unlink()
    assert verify.main([str(dataset_dir)]) == 1
    assert any(line.startswith("missing") and SHARD in line for line in capsys.readouterr().out.splitlines())


def test_bad_arguments_exit_2_with_one_line(tmp_path, dataset_dir):
    run = subprocess.run([sys.executable, "-m", "vlp_jax.data.verify", str(dataset_dir), str(tmp_path / "nope")],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 2 and run.stdout == ""  # arguments are checked before any shard is read
    assert run.stderr.count("\n") == 1 and f"{tmp_path / 'nope'}/manifest.json does not exist" in run.stderr
    assert verify.main([]) == 2


def test_verify_runs_as_a_module(dataset_dir):
    run = subprocess.run([sys.executable, "-m", "vlp_jax.data.verify", str(dataset_dir)],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0 and run.stdout.count("\nok") + run.stdout.startswith("ok") == 4
