"""Launchers: the exact gcloud / sbatch / srun commands (recorded by fake executables on PATH and compared with
tests/data/launch/*), re-runs after exit 75, SLURM requeue, and stopping the other local processes on a failure.
A real 2-process run through launch.local is the reference run of tests/integration/test_checkpoint.py's
two-process preemption test (it costs nothing extra there)."""

import json
import os
import stat
import subprocess
import sys
import time

import pytest

from launch import common, local, slurm, tpu
from vlp_jax import preemption

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXPECTED = os.path.join(ROOT, "tests", "data", "launch")

# A stand-in for gcloud, sbatch, srun, scontrol or python: appends its argv to $LAUNCH_RECORD (a JSON line), keeps a
# copy of a script it is given (sbatch), and exits with the next code of $FAKE_EXIT_<NAME> ("75,0": 75 then 0).
FAKE = """#!{python}
import json, os, sys, time
name = os.path.basename(sys.argv[0])
record = os.environ["LAUNCH_RECORD"]
with open(record, "a") as f:
    f.write(json.dumps([name, *sys.argv[1:]]) + "\\n")
if name == "sbatch":
    with open(record + ".script", "w") as f:
        f.write(open(sys.argv[-1]).read())
process = "".join(a for a in sys.argv if a.startswith("--process_id="))  # each process counts its own calls
counter = f"{{record}}.{{name}}{{process}}.count"
calls = int(open(counter).read()) if os.path.exists(counter) else 0
open(counter, "w").write(str(calls + 1))
codes = os.environ.get("FAKE_EXIT_" + name.upper(), "0").split(",")
sleep = float(os.environ.get("FAKE_SLEEP_" + name.upper(), "0"))
time.sleep(sleep if "--process_id=0" in sys.argv else 0)
sys.exit(int(codes[min(calls, len(codes) - 1)]))
"""


@pytest.fixture
def fakes(tmp_path, monkeypatch):
    """Fake executables first on PATH; returns a function reading the recorded commands as shell lines."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("gcloud", "sbatch", "srun", "scontrol", "python"):
        path = bin_dir / name
        path.write_text(FAKE.format(python=sys.executable))
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    record = tmp_path / "record.jsonl"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("LAUNCH_RECORD", str(record))

    def recorded() -> list[str]:
        lines = record.read_text().splitlines() if record.exists() else []
        return [normalised(common.quoted(json.loads(line)), tmp_path) for line in lines]

    return recorded


def normalised(text: str, tmp_path) -> str:
    """Machine-specific paths replaced by $TMP and $ROOT, as in the expected files."""
    return text.replace(str(tmp_path), "$TMP").replace(ROOT, "$ROOT")


def expected(name: str) -> list[str]:
    with open(os.path.join(EXPECTED, name), encoding="utf-8") as f:
        return f.read().splitlines()


TPU = ["--name=vlp", "--zone=us-central2-b", "--project=my-project"]
TPU_SESSION = [  # one pod's life; the run is preempted once (exit 75) and re-run
    ["create", *TPU, "--accelerator=v4-32", "--spot"],
    ["setup", *TPU, "--wheel=dist/vlp_jax-0.1.0-py3-none-any.whl"],
    ["setup", *TPU, "--source=git+https://github.com/ORG/vlp_jax@v0.1.0"],
    ["run", *TPU, "--config=configs/clip.py:base", "--workdir=gs://bucket/runs/b16", "--",
     "--config.train.steps=1000"],
    ["logs", *TPU, "--workers=0,3", "--lines=20"],
    ["stop", *TPU],
    ["delete", *TPU],
]


def test_preempted_exit_code_is_the_runs():
    assert common.PREEMPTED_EXIT_CODE == preemption.PREEMPTED_EXIT_CODE


def test_tpu_commands_are_the_expected_ones_and_a_preempted_run_is_rerun(fakes, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_EXIT_GCLOUD", "0,0,0,0,0,75,0")  # the 6th gcloud call is the run's first start
    assert [tpu.main(argv) for argv in TPU_SESSION] == [0] * len(TPU_SESSION)
    assert fakes() == expected("tpu.txt")
    capsys.readouterr()
    for argv in TPU_SESSION:
        assert tpu.main([*argv[:1], "--dry-run", *argv[1:]]) == 0
    commands = expected("tpu.txt")
    assert capsys.readouterr().out.splitlines() == commands[:6] + commands[7:]  # printed once: no run to re-run


def test_tpu_run_stops_rerunning_after_a_failure_or_when_restarts_run_out(fakes, monkeypatch):
    monkeypatch.setenv("FAKE_EXIT_GCLOUD", "0,75,3,0,75")  # copy, run (75), run (3); copy, run (75) from then on
    assert tpu.main(TPU_SESSION[3][:-2]) == 3
    assert len(fakes()) == 3
    assert tpu.main([*TPU_SESSION[3][:-2], "--max_restarts=2"]) == common.PREEMPTED_EXIT_CODE
    assert len(fakes()) == 3 + 1 + 3


def test_tpu_setup_needs_one_source(fakes):
    with pytest.raises(SystemExit, match="exactly one"):
        tpu.main(["setup", *TPU])
    assert fakes() == []


SLURM = ["--nodes=2", "--gpus_per_node=8", "--time=04:00:00", "--config=configs/clip.py:base", "--partition=gpu",
         "--account=vlp", "--sbatch=--qos=high"]


def test_slurm_script_and_submission_are_the_expected_ones_and_exit_75_requeues(fakes, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    argv = [*SLURM, f"--workdir={tmp_path}/run", "--", "--config.train.steps=1000"]
    assert slurm.main(argv) == 0
    script = normalised((tmp_path / "record.jsonl.script").read_text(), tmp_path)
    assert script == "\n".join(expected("slurm.sbatch")) + "\n"
    assert slurm.main(["--dry-run", *argv]) == 0
    assert normalised(capsys.readouterr().out, tmp_path).splitlines() == [
        "# $TMP/run/vlp_jax.sbatch", *expected("slurm.sbatch"), "", *expected("slurm.txt")[:1]]
    # The job itself, under fake srun/scontrol: a run that saved after SIGTERM (75) requeues the job; 0 does not.
    for srun_code, job in (("75", "1234"), ("0", "1235")):
        monkeypatch.setenv("FAKE_EXIT_SRUN", srun_code)
        (tmp_path / "record.jsonl.srun.count").unlink(missing_ok=True)
        job_env = {**os.environ, "SLURM_JOB_ID": job}
        finished = subprocess.run(["bash", str(tmp_path / "run" / "vlp_jax.sbatch")], env=job_env, check=False)
        assert finished.returncode == int(srun_code)
    assert fakes() == expected("slurm.txt")


def test_local_dry_run_prints_each_process_command(capsys):
    argv = ["--processes=2", "--config=configs/clip.py:tiny", "--workdir=/tmp/run", "--port=8476",
            "--python=python3", "--dry-run", "--", "--config.train.steps=10"]
    assert local.main(argv) == 0
    gpus = local.main([*argv[:-2], "--platform=gpu", "--devices_per_process=4"])
    assert gpus == 0
    assert capsys.readouterr().out.splitlines() == expected("local.txt")


def test_local_reruns_after_75_and_stops_the_others_when_one_fails(fakes, tmp_path, monkeypatch):
    python = str(tmp_path / "bin" / "python")
    argv = ["--processes=2", "--config=configs/clip.py:tiny", f"--workdir={tmp_path}/run", f"--python={python}"]
    monkeypatch.setenv("FAKE_EXIT_PYTHON", "75,0")  # both processes of the first attempt are preempted
    assert local.main(argv) == 0
    assert len(fakes()) == 4 and {line.split("--process_id=")[1] for line in fakes()} == {"0", "1"}
    assert sorted(os.listdir(tmp_path / "run" / "logs")) == ["process0.log", "process1.log"]
    # Process 0 would run for a minute; process 1 fails at once (exit 3): process 0 is stopped, the launcher exits 3.
    for counter in tmp_path.glob("record.jsonl.python*.count"):
        counter.unlink()
    monkeypatch.setenv("FAKE_EXIT_PYTHON", "3")
    monkeypatch.setenv("FAKE_SLEEP_PYTHON", "60")
    started = time.monotonic()
    assert local.main(argv) == 3
    assert time.monotonic() - started < 30
