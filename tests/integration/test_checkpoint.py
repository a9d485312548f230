"""Never lose a run: exact resume, preemption, restore onto other meshes, non-finite guard, config checks."""

import dataclasses
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import ml_collections
import numpy as np
import portpicker
import pytest

from configs import clip
from tests.helpers import read_metrics, tiny_config
from vlp_jax import methods, parallel, preemption, step, train
from vlp_jax.checkpoint import Checkpointer, CheckpointError, abstract_like
from vlp_jax.data import pipeline, records, synthetic
from vlp_jax.evaluate import run as eval_run
from vlp_jax.optimizer import make_optimizer
from vlp_jax.state import create_train_state

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def final_state(workdir, config=None):
    """The latest checkpoint of a run, restored onto the default mesh."""
    config = config or tiny_config()
    run = step.setup(config)
    checkpointer = Checkpointer(workdir, config.checkpoint)
    state, data = checkpointer.restore(checkpointer.latest_step(), abstract_like(run.state, run.shardings))
    checkpointer.close()
    return state, data


def assert_trees_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(tiny_run, tmp_path):
    # 512 scenes / batch 64 = 8 steps per epoch: stops at 7 (mid-epoch) and 16 (epoch boundary).
    for stop_after in (7, 9):
        assert train.train_and_evaluate(tiny_config(), str(tmp_path), stop_after=stop_after) is None
    final = train.train_and_evaluate(tiny_config(), str(tmp_path))
    reference_dir, reference_final, reference_records = tiny_run
    resumed, resumed_data = final_state(tmp_path)
    uninterrupted, uninterrupted_data = final_state(reference_dir)
    assert int(resumed.step) == 30 and resumed_data == uninterrupted_data
    assert_trees_equal(resumed, uninterrupted)
    assert final == reference_final
    losses = {r["step"]: r["train/loss"] for r in read_metrics(tmp_path) if "train/loss" in r}
    reference = {r["step"]: r["train/loss"] for r in reference_records if "train/loss" in r}
    assert set(losses) - set(reference) == {7, 16}  # each interrupted invocation also logs its last step
    assert {step: losses[step] for step in reference} == reference


def test_restore_onto_another_mesh_gives_identical_values(tmp_path):
    config = clip.get_config("tiny")
    batch = {"image": np.zeros((1, 32, 32, 3), np.uint8), "text": np.zeros((1, config.model.text.max_len), np.int32)}

    def state_on(mesh):
        with parallel.mesh_context(mesh):
            return create_train_state(methods.build(config, mesh), make_optimizer(config.train), batch, mesh, seed=0)

    saved, _ = state_on(parallel.make_mesh(ml_collections.ConfigDict(dict(data=8, fsdp=1, model=1))))
    saved = saved.replace(params=jax.tree.map(lambda x: x + 1.5, saved.params))  # differs from a fresh init
    checkpointer = Checkpointer(tmp_path, config.checkpoint)
    checkpointer.save(5, saved, {"epoch": 0, "index": 5}, config)
    checkpointer.wait()
    for num_devices, axes in ((4, (4, 1, 1)), (8, (2, 2, 2))):  # saved on 8 devices, restored on 4 and on 2x2x2
        mesh_config = ml_collections.ConfigDict(dict(zip(parallel.MESH_AXES, axes, strict=True)))
        fresh, shardings = state_on(parallel.make_mesh(mesh_config, devices=jax.devices()[:num_devices]))
        restored, data = checkpointer.restore(5, abstract_like(fresh, shardings))
        assert data == {"epoch": 0, "index": 5}
        assert_trees_equal(restored, saved)
        kernel = restored.params["towers"]["image_tower"]["encoder"]["block0"]["mlp"]["fc1"]["kernel"]
        assert kernel.sharding.mesh.devices.size == num_devices
        assert kernel.sharding.spec == shardings.params["towers"]["image_tower"]["encoder"]["block0"]["mlp"]["fc1"][
            "kernel"].spec
    checkpointer.close()


def test_a_relative_workdir_is_saved_and_restored(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tiny_config()
    state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    checkpointer = Checkpointer("workdir/relative", config.checkpoint)
    checkpointer.save(1, state, {"epoch": 0, "index": 1}, config)
    checkpointer.wait()
    restored, data = checkpointer.restore(1, {"w": jax.ShapeDtypeStruct((2, 3), np.float32)})
    checkpointer.close()
    np.testing.assert_array_equal(restored["w"], state["w"])
    assert (tmp_path / "workdir/relative/checkpoints/1").is_dir() and data == {"epoch": 0, "index": 1}


def test_changed_shapes_are_refused_and_harmless_changes_allowed(tiny_run):
    workdir, final, _ = tiny_run
    changed = tiny_config()
    changed.model.text.width = 64
    changed.train.learning_rate = 0.5
    with pytest.raises(CheckpointError, match=r"(?s)different config.*model.text.width: 96 -> 64.*learning_rate"):
        train.train_and_evaluate(changed, str(workdir))
    harmless = tiny_config()
    harmless.eval.every = 7
    harmless.train.log_every = 3
    assert eval_run.evaluate_checkpoint(harmless, str(workdir)) == final  # --mode=eval on the saved run


def test_init_from_a_directory_that_is_not_a_run_is_refused(tmp_path):
    config = tiny_config()
    config.init_from = str(tmp_path / "somewhere")
    (tmp_path / "somewhere").mkdir()
    with pytest.raises(CheckpointError, match=r"init_from=.*somewhere.*does not exist; init_from takes the --workdir"):
        train.train_and_evaluate(config, str(tmp_path / "run"))


def test_init_from_warm_starts_parameters_only(tiny_run, tmp_path):
    config = tiny_config(steps=1)
    config.init_from = str(tiny_run[0])
    source, _ = final_state(tiny_run[0])
    config.train.learning_rate = 0.0  # one step that cannot move the parameters
    config.train.weight_decay = 0.0
    train.train_and_evaluate(config, str(tmp_path))
    warm, _ = final_state(tmp_path, config)
    assert int(warm.step) == 1
    assert_trees_equal(warm.params, source.params)


def nan_after(step_from):
    """Wraps TrainIterator so every batch from `step_from` on has NaN pixels (float images, same values)."""
    original = pipeline.TrainIterator.__next__

    def poisoned(self):
        batch = original(self)
        images = batch["image"].astype(np.float32) / 127.5 - 1.0
        if self.epoch * self.batches_per_epoch + self.index > step_from:
            images[0, 0, 0, 0] = np.nan
        return {**batch, "image": images}

    return poisoned


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline.TrainIterator, "__next__", nan_after(12))
    config = tiny_config(max_nonfinite_steps=4)
    config.checkpoint.every = 10
    with pytest.raises(FloatingPointError, match=r"step 16: .*non-finite for 4 steps in a row.*checkpoints/10"):
        train.train_and_evaluate(config, str(tmp_path))
    records = [r for r in read_metrics(tmp_path) if "train/nonfinite_total" in r]
    assert [(r["step"], r["train/nonfinite_total"]) for r in records] == [(5, 0), (10, 0), (15, 3)]
    assert records[-1]["train/loss"] is None  # NaN is written as null


def test_a_skipped_step_leaves_the_state_unchanged_but_counts(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline.TrainIterator, "__next__", nan_after(0))
    config = tiny_config()
    dataset = pipeline.PairDataset(np.zeros((64, 32, 32, 3), np.uint8), np.ones((64, 28), np.int32), np.arange(64))
    batch = next(pipeline.TrainIterator(dataset, 64, seed=0))
    run = step.setup(config)
    before = jax.device_get(run.state)
    with parallel.mesh_context(run.mesh):
        after, metrics = run.train_step(run.state, parallel.global_batch_from_local(batch, run.mesh))
    after = jax.device_get(after)
    assert np.isnan(metrics["loss"]) and int(after.step) == 1 and int(after.nonfinite_total) == 1
    assert_trees_equal((after.params, after.opt_state), (before.params, before.opt_state))


def test_a_signal_during_compilation_stops_at_once(tmp_path, monkeypatch):
    sent, finish = {}, threading.Event()

    def signalled_compile(*args, **kwargs):  # SIGTERM arrives while the step compiles, before any step ran
        sent["at"] = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)
        finish.wait(60)  # a long compile: the run must not wait for it
        raise RuntimeError("abandoned")

    monkeypatch.setattr(step, "compile_step", signalled_compile)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(preemption.Interrupted, match="received SIGTERM while compiling the train step"):
            train.train_and_evaluate(tiny_config(), str(tmp_path))
    finally:
        finish.set()  # the abandoned compile thread ends
    assert time.monotonic() - sent["at"] < 5
    assert Checkpointer(tmp_path, tiny_config().checkpoint).latest_step() is None  # no step ran, nothing saved
    assert signal.getsignal(signal.SIGTERM) is previous  # the handler is the caller's again


def tiny_command(workdir, *extra):
    """The CLI form of tests.helpers.tiny_config (same values), for subprocess tests."""
    return [sys.executable, "-m", "vlp_jax.main", "--config=configs/clip.py:tiny", f"--workdir={workdir}",
            "--config.data.train_size=512", "--config.data.eval_size=64", "--config.train.batch_size=64",
            "--config.eval.batch_size=64", "--config.eval.every=1000", "--config.train.warmup_steps=5",
            "--config.train.learning_rate=0.001", *extra]


def run_until(command, env, pattern):
    """Starts `command` and returns the process once a stderr line contains `pattern`."""
    process = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        if pattern in line:
            return process
    raise AssertionError(f"{pattern!r} never appeared; exit code {process.wait()}")


@pytest.mark.multiprocess
def test_kill_9_and_sigterm_at_random_moments_then_restart_finishes_identically(tiny_run, tmp_path):
    rng = random.Random(7)
    env = dict(os.environ)  # conftest's XLA_FLAGS (8 devices, its compile options): bit-equal to the in-process run
    command = tiny_command(tmp_path, "--config.train.steps=30", "--config.train.log_every=1",
                           "--config.checkpoint.every=5", "--config.eval.final=False")  # states are compared
    # First kill at a random step; the second right after a checkpoint step, while its async save is in flight.
    for pattern in (f"step {rng.randint(3, 12)}/30 ", f"step {rng.choice((15, 20))}/30 "):
        process = run_until(command, env, pattern)
        process.kill()  # SIGKILL: no handler, no cleanup
        process.wait()
    # Then SIGTERM (resumed from step 10, 15 or 20): it saves the step in flight and exits with the preemption code.
    process = run_until(command, env, "step 22/30 ")
    process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == preemption.PREEMPTED_EXIT_CODE, stderr[-2000:]
    assert time.monotonic() - sent < 60
    saved_step = Checkpointer(tmp_path, tiny_config().checkpoint).latest_step()
    assert f"received SIGTERM: saved step {saved_step};" in stderr and saved_step >= 22
    logged = [r["step"] for r in read_metrics(tmp_path) if "train/loss" in r]
    assert saved_step <= max(logged) + 1  # at most the step in flight when the signal came
    finished = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "resumed from" in finished.stderr
    resumed, _ = final_state(tmp_path)
    uninterrupted, _ = final_state(tiny_run[0])
    assert_trees_equal(resumed, uninterrupted)


# Two real JAX processes (2 CPU devices each, gloo collectives) sharing one workdir, as on a multi-host cluster.
TWO_PROCESS_STEPS = 10


@pytest.fixture(scope="module")
def two_process_data(tmp_path_factory):
    """A dataset directory from the embedded world whose training split has an empty image in every 5th record
    (skipped when read), so the two processes' slices advance by different amounts, and a tokenizer for it."""
    out = tmp_path_factory.mktemp("two_process_data")
    world = tiny_config().data.world
    train_records = [dataclasses.replace(r, image=b"") if i % 5 == 2 else r
                     for i, r in enumerate(synthetic.split_records(world, "train", 192))]
    records.write_records(train_records, out, "train", world.records_per_shard)
    records.write_records(synthetic.split_records(world, "eval", 32), out, "eval", world.records_per_shard)
    overrides = {"data.train_sources": str(out), "data.eval_sources": str(out),
                 "data.tokenizer.path": str(out / pipeline.TOKENIZER_FILE),
                 "model.image.depth": 1, "model.text.depth": 1,
                 "train.steps": TWO_PROCESS_STEPS, "train.batch_size": 32, "train.warmup_steps": 2,
                 "train.learning_rate": 1e-3, "train.log_every": 1, "eval.batch_size": 32, "eval.every": 1000,
                 "eval.final": False,  # states are compared, not evaluations
                 "checkpoint.every": 1000}
    config = clip.get_config("tiny")
    config.update_from_flattened_dict({**overrides, "data.tokenizer.path": ""})
    pipeline.load_tokenizer(config, out, pipeline.open_sources(config, "train", out)[0])  # writes the tokenizer
    config.update_from_flattened_dict(overrides)
    return config, [f"--config.{key}={value}" for key, value in overrides.items()]


def start_two_processes(workdir, overrides, logs):
    """Starts processes 0 and 1 of one distributed run; their output goes to logs/process<i>.log."""
    port = portpicker.pick_unused_port()
    # No persistent compilation cache: on CPU only process 0 finds its programs there (process 1's cache keys
    # differ and only process 0 writes), so process 0 would reach the first collective while process 1 still
    # compiles, and gloo gives up after 30 s.
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_ENABLE_COMPILATION_CACHE": "0"}
    logs.mkdir(parents=True, exist_ok=True)
    processes = []
    for index in range(2):
        command = [sys.executable, "-m", "vlp_jax.main", "--config=configs/clip.py:tiny", f"--workdir={workdir}",
                   "--distributed", f"--coordinator_address=localhost:{port}", "--num_processes=2",
                   f"--process_id={index}", *overrides]
        with open(logs / f"process{index}.log", "w", encoding="utf-8") as log:
            processes.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    return processes


def finish(processes, logs, timeout=600):
    """Waits for every process (killing all of them on timeout); returns [(exit code, output)]."""
    try:
        for process in processes:
            process.wait(timeout=timeout)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return [(p.returncode, (logs / f"process{i}.log").read_text(encoding="utf-8")) for i, p in enumerate(processes)]


def wait_for_line(path, pattern, processes, timeout=600):
    """Returns once the log at `path` contains `pattern`; fails (stopping every process) if a process ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and pattern in path.read_text(encoding="utf-8"):
            return
        if any(p.poll() is not None for p in processes):
            break
        time.sleep(0.05)
    results = finish(processes, path.parent, timeout=1)
    raise AssertionError(f"{pattern!r} never appeared: {[(code, out[-3000:]) for code, out in results]}")


@pytest.mark.multiprocess
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step_and_resumes_exactly(two_process_data, tmp_path):
    config, overrides = two_process_data
    steps = TWO_PROCESS_STEPS
    reference, run = tmp_path / "reference", tmp_path / "run"
    # The reference run is started by the local launcher (launch/local.py): both processes run to the end.
    logs = tmp_path / "logs-reference"
    launcher = [sys.executable, "-m", "launch.local", "--processes=2", "--devices_per_process=2",
                "--config=configs/clip.py:tiny", f"--workdir={reference}", f"--logs={logs}", "--", *overrides]
    env = {**os.environ, "JAX_ENABLE_COMPILATION_CACHE": "0"}  # see start_two_processes
    launched = subprocess.run(launcher, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    outputs = [(logs / f"process{index}.log").read_text(encoding="utf-8") for index in range(2)]
    assert launched.returncode == 0, (launched.stderr[-2000:], [out[-3000:] for out in outputs])
    assert all(f"process{index}.log: exit 0" in launched.stderr for index in range(2))
    assert all(f"process {index}/2" in out for index, out in enumerate(outputs))
    # Only process 0 writes the metrics: each step once.
    assert [r["step"] for r in read_metrics(reference) if "train/loss" in r] == list(range(1, steps + 1))

    logs = tmp_path / "logs-preempted"
    processes = start_two_processes(run, overrides, logs)
    wait_for_line(logs / "process0.log", f"step 2/{steps} ", processes)  # training is under way
    processes[1].send_signal(signal.SIGTERM)  # process 1 only
    results = finish(processes, logs)
    assert [code for code, _ in results] == [preemption.PREEMPTED_EXIT_CODE] * 2, [out[-3000:] for _, out in results]
    saved = {int(m) for _, out in results for m in re.findall(r"received SIGTERM: saved step (\d+)", out)}
    assert len(saved) == 1, saved  # both processes stopped after the same step
    (stopped,) = saved
    assert 2 <= stopped < steps
    # The checkpoint of that step, and nothing else: complete (orbax lists only renamed, finished directories).
    assert sorted(os.listdir(run / "checkpoints")) == [str(stopped)]
    state, data_state = final_state(run, config)
    assert int(state.step) == stopped and data_state["batches"] == stopped
    # Every process's own position in its slice: what a process-p iterator reaches after `stopped` batches.
    expected = {}
    for index in range(2):
        iterator = pipeline.load(config, run, process_index=index, process_count=2).train
        for _ in range(stopped):
            next(iterator)
        expected |= iterator.get_state()["next_index"]
    assert data_state["next_index"] == expected
    assert expected["0"] != expected["1"]  # the slices skipped different records: a mix-up would show

    logs = tmp_path / "logs-resumed"
    results = finish(start_two_processes(run, overrides, logs), logs)
    assert [code for code, _ in results] == [0, 0], [out[-3000:] for _, out in results]
    assert all(f"resumed from {run / 'checkpoints' / str(stopped)} (step {stopped}" in out for _, out in results)
    resumed, resumed_data = final_state(run, config)
    uninterrupted, uninterrupted_data = final_state(reference, config)
    assert int(resumed.step) == steps and resumed_data == uninterrupted_data
    assert_trees_equal(resumed, uninterrupted)
