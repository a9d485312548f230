"""`python -m vlp_jax.bench --config=configs/clip.py:tiny`: compile time, step time, pairs/s, MFU, peak memory.

Runs the real jitted train step on random inputs of the config's shapes (no dataset needed), so the figures
are the model's and the sharding's alone.
"""

import resource
import statistics
import time

import jax
import numpy as np
from absl import app, flags

from vlp_jax import cli, metrics, parallel, train
from vlp_jax.state import count_params

cli.define_config_flag()
flags.DEFINE_integer("steps", 20, "Timed steps after warm-up.")
flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
FLAGS = flags.FLAGS


def random_batch(config, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A global batch of the config's shapes: uint8 images and token ids with an EOS-terminated prefix."""
    batch, size = config.train.batch_size, config.model.image.image_size
    tokens = rng.integers(4, config.model.text.vocab_size, (batch, config.model.text.max_len), dtype=np.int32)
    tokens[:, -1] = 3
    return {"image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8), "text": tokens}


def benchmark(config, steps: int, warmup: int) -> dict[str, float | None]:
    """Times `steps` train steps after `warmup`; returns the figures `main` prints."""
    host_batch = random_batch(config, np.random.default_rng(config.seed))
    run = train.setup(config, {key: value[:1] for key, value in host_batch.items()})
    batch = parallel.global_batch_from_local(host_batch, run.mesh)
    started = time.perf_counter()
    compiled, estimate = train.compile_step(run, batch, config)
    compile_seconds = time.perf_counter() - started
    state = run.state
    for _ in range(warmup):
        state, step_metrics = compiled(state, batch)
    jax.block_until_ready(step_metrics)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        state, step_metrics = compiled(state, batch)
        jax.block_until_ready(step_metrics)
        times.append(time.perf_counter() - started)
    step_seconds = statistics.median(times)
    device = jax.devices()[0]
    flops = metrics.train_flops_per_step(config.model, config.train.batch_size)
    stats = device.memory_stats() or {}
    return {
        "parameters": count_params(state.params),
        "compile_s": compile_seconds,
        "step_s_median": step_seconds,
        "pairs_per_s": config.train.batch_size / step_seconds,
        "tflops_per_s": flops / step_seconds / 1e12,
        "mfu": metrics.mfu(flops, step_seconds, device.device_kind, config.model.dtype, run.mesh.size),
        "estimated_bytes_per_device": estimate.per_device_bytes,
        "peak_device_bytes": stats.get("peak_bytes_in_use"),
        "peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def main(argv):
    del argv
    config = FLAGS.config
    device = jax.devices()[0]
    print(f"device: {jax.device_count()} x {device.device_kind} ({device.platform}); dtype {config.model.dtype}; "
          f"global batch {config.train.batch_size}; mesh {dict(config.mesh)}")
    results = benchmark(config, FLAGS.steps, FLAGS.warmup)
    gib = 2**30
    mfu = results["mfu"]
    peak = results["peak_device_bytes"]
    print(f"parameters            {results['parameters']:,}")
    print(f"compile time          {results['compile_s']:.2f} s")
    print(f"median step time      {results['step_s_median'] * 1e3:.1f} ms  (over {FLAGS.steps} steps)")
    print(f"pairs/s               {results['pairs_per_s']:,.0f}")
    print(f"model TFLOP/s         {results['tflops_per_s']:.3f}")
    print(f"MFU                   {'n/a (peak unknown for this device)' if mfu is None else f'{mfu:.1%}'}")
    print(f"memory (XLA estimate) {results['estimated_bytes_per_device'] / gib:.2f} GiB per device")
    print(f"peak device memory    {'n/a' if peak is None else f'{peak / gib:.2f} GiB'}")
    print(f"peak host RSS         {results['peak_host_rss_bytes'] / gib:.2f} GiB")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
