"""Tests run on 8 fake CPU devices so every sharding path is exercised without accelerators."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

# grain worker processes and absl logging expect parsed flags.
flags.FLAGS.mark_as_parsed()
