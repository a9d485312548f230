"""`python -m vlp_jax.bench` as a user runs it: the step benchmark with the loss's share, the capacity search and
config variants timed side by side."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--config=configs/clip.py:tiny", "--config.model.image.width=32", "--config.model.image.depth=1",
         "--config.model.image.heads=2", "--config.model.image.mlp_dim=64", "--config.model.text.width=32",
         "--config.model.text.depth=1", "--config.model.text.heads=2", "--config.model.text.mlp_dim=64",
         "--config.model.embed_dim=16"]


def bench(*args: str) -> str:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}  # the session's XLA flags: 8 fake devices
    finished = subprocess.run([sys.executable, "-m", "vlp_jax.bench", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return finished.stdout


def test_the_step_benchmark_reports_the_loss_share_of_the_step():
    out = bench(*SMALL, "--config.train.batch_size=256", "--steps=3", "--warmup=1")
    step_ms = float(re.search(r"median step time +([\d.]+) ms", out).group(1))
    loss_ms, share = re.search(r"loss \+ gradient +([\d.]+) ms +\(([\d.]+)% of the step", out).groups()
    assert 0 < float(loss_ms) < step_ms and abs(float(loss_ms) / step_ms * 100 - float(share)) < 0.2


def test_the_capacity_command_prints_the_largest_batch_per_variant():
    out = bench("capacity", *SMALL, "--capacity_budget_gib=0.004", "--capacity_micro_rows=8",
                "--capacity_max_batch=1024", "--capacity_variants=whole,micro")
    rows = dict(re.findall(r"^(whole|micro) +([\d,]+) ", out, re.M))
    assert set(rows) == {"whole", "micro"}, out
    whole, micro = (int(rows[name].replace(",", "")) for name in ("whole", "micro"))
    assert 0 < whole < micro, out


def test_the_variants_command_times_each_variant_against_the_first():
    out = bench("variants", *SMALL, "--config.train.batch_size=64", "--steps=3", "--warmup=1", "--variant=",
                "--variant=model.scan_layers=true,env:VLP_JAX_CPU_DOTS=xla")
    rows = re.findall(r"^(\(config as given\)|model\.scan_layers=true,env:VLP_JAX_CPU_DOTS=xla) +([\d.]+) +([\d.]+) "
                      r"+[\d,]+ +n/a +[\d.]+ +([\d.]+)x \[", out, re.M)
    assert [row[0] for row in rows] == ["(config as given)", "model.scan_layers=true,env:VLP_JAX_CPU_DOTS=xla"], out
    assert rows[0][3] == "1.000"
    assert all(float(compile_s) > 0 and float(step_ms) > 0 for _, compile_s, step_ms, _ in rows)


def test_a_variant_naming_no_config_key_stops_with_one_line_naming_it():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    finished = subprocess.run([sys.executable, "-m", "vlp_jax.bench", "variants", *SMALL, "--variant=",
                               "--variant=model.scan=true"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=120)
    assert finished.returncode == 2, finished.stderr[-2000:]
    assert finished.stderr.strip().splitlines()[-1].startswith(
        "error: --variant='model.scan=true': model.scan: config.model has no key 'scan'. Its keys: "), finished.stderr
