"""Tests run on 8 fake CPU devices so every sharding path is exercised without accelerators."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
# The tests' programs are tiny and compiled once or twice each: XLA's cheapest CPU compile (no LLVM backend
# optimisation) makes the suite ~1.5x faster (measured on the two slowest sharding tests: 97 s vs 143 s); the
# programs compute the same functions. VLP_TEST_FULL_XLA=1 keeps XLA's defaults.
if os.environ.get("VLP_TEST_FULL_XLA") != "1":
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session, shared with the subprocesses the tests start: the many short
# runs (resume, preemption, evaluation) compile the same programs again and again.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="vlp_jax_test_xla_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

from absl import flags  # noqa: E402

# grain worker processes and absl logging expect parsed flags.
flags.FLAGS.mark_as_parsed()


import pytest  # noqa: E402

from tests.helpers import METHODS  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Everything under tests/integration trains end to end: marked `slow` (`make test-fast` runs tests/unit)."""
    del config
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory):
    """name -> (config, workdir, final metrics, metrics.jsonl records) of each method's shared run (helpers.METHODS,
    helpers.method_config), trained on first use and reused by every run-level test of the session."""
    from tests.helpers import method_config, read_metrics
    from vlp_jax import train

    runs = {}

    def run_of(name: str):
        if name not in runs:
            config = method_config(name)
            workdir = tmp_path_factory.mktemp(f"{name}_run")
            final = train.train_and_evaluate(config, str(workdir))
            runs[name] = (config, workdir, final, read_metrics(workdir))
        return runs[name]

    return run_of


@pytest.fixture(scope="session", params=METHODS)
def method_run(request, trained_runs):
    """Each method's shared trained run in turn: (name, config, workdir, final metrics, records)."""
    return (request.param, *trained_runs(request.param))


@pytest.fixture(scope="session")
def tiny_run(trained_runs):
    """The shared 30-step tiny CLIP run: (workdir, final metrics, metrics.jsonl records). It scores a 16-image eval
    subset at steps 10 and 20 and ends with the full evaluation suite (eval/step_30.*)."""
    _, workdir, final, records = trained_runs("clip")
    return workdir, final, records
