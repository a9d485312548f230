"""Tests run on 8 fake CPU devices so every sharding path is exercised without accelerators."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One uninterrupted 30-step tiny run shared by the tests: (workdir, final metrics, metrics.jsonl records).

    It scores a 16-image eval subset at steps 10 and 20 and ends with the full evaluation suite (eval/step_30.*).
    """
    from tests.helpers import read_metrics, tiny_config
    from vlp_jax import train

    workdir = tmp_path_factory.mktemp("tiny_run")
    config = tiny_config()
    config.eval.update(dict(every=10, subset_size=16))  # eval settings never change the trained parameters
    final = train.train_and_evaluate(config, str(workdir))
    return workdir, final, read_metrics(workdir)
