"""Benchmarks: `python -m vlp_jax.bench --config=configs/clip.py:tiny` (the train step),
`python -m vlp_jax.bench data` (the input pipeline), `python -m vlp_jax.bench retrieval` (evaluation memory) and
`python -m vlp_jax.bench capacity` (the largest exact batch that fits a memory budget).

The step benchmark runs the real jitted train step on random inputs of the config's shapes (no dataset needed),
so its figures are the model's and the sharding's alone: compile time, step time, pairs/s, MFU, peak memory.

The data benchmark (vlp_jax/data/benchmark.py) writes JPEG shards (--data_images images of --data_source_size,
textured like photographs, with world captions), then measures images/s per core of the training pipeline (read,
decode, random resized crop to the config's image size, tokenise, batch) with each worker count of
--data_workers, and in the same run the decode rates of the same JPEGs on one core (PIL at full size, the
reference; libjpeg-turbo at full size and at the pipeline's reduced DCT scale), and prints a table of the ratios.
Its config defaults to configs/clip.py:base (224 px).

The retrieval benchmark (vlp_jax/evaluate/benchmark.py) scores exact image↔text retrieval (both directions) of
--retrieval_images random unit embeddings against --retrieval_texts captions, with the config's tiles
(config.eval.query_chunk × gallery_chunk) and mesh, and prints its time and the process's peak RSS beside the
size of the score matrix it never builds. Its config defaults to configs/clip.py:tiny.

The variants benchmark (`python -m vlp_jax.bench variants --variant=... --variant=...`) compiles the train step
once per variant of the config (each --variant a comma-separated list of `dotted.config.key=value` overrides, or
`env:NAME=value` for an environment variable read while the step is traced and compiled, e.g.
`env:VLP_JAX_CPU_DOTS=xla`; an empty --variant is the config as given), then times them in one process, one step
of each in a shuffled order per round, so a slow spell of a shared machine hits them all alike. It prints each
variant's compile time, median step, pairs/s, MFU and XLA memory estimate, and its step time against the first
variant's: the median over rounds of the per-round ratio, with the quartiles.

The capacity benchmark (vlp_jax/capacity.py) compiles the train step, without running it, for growing global
batches on the config's mesh and prints the largest that fits --capacity_budget_gib per device, whole, with the
chunked loss, with micro-batches and with both. Its config defaults to configs/clip.py:base; for the devices of a
pod on a CPU, fake them: XLA_FLAGS=--xla_force_host_platform_device_count=8.
"""

import resource
import statistics
import sys
import time

import jax
from absl import app, flags

from vlp_jax import capacity, cli, host_memory, parallel, variants
from vlp_jax.data import benchmark as benchmark_data
from vlp_jax.evaluate import benchmark as benchmark_retrieval
from vlp_jax.models import kernels
from vlp_jax.state import count_params

cli.define_config_flag()
flags.DEFINE_integer("steps", 20, "Timed steps after warm-up.")
flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
flags.DEFINE_integer("data_images", 1024, "data: JPEG images written to the benchmark shards.")
flags.DEFINE_string("data_source_size", "500x375", "data: WIDTHxHEIGHT of the JPEGs (ImageNet's typical size).")
flags.DEFINE_integer("data_quality", 90, "data: JPEG quality.")
flags.DEFINE_list("data_workers", ["0", "1", "2"], "data: worker counts to measure.")
flags.DEFINE_integer("data_batch", 64, "data: batch size of the measured iterator.")
flags.DEFINE_float("data_seconds", 10.0, "data: seconds each measurement runs (the best of 5 windows counts).")
flags.DEFINE_string("data_dir", "", "data: where to write the shards; empty = a temporary directory.")
flags.DEFINE_integer("retrieval_images", 200_000, "retrieval: images (image→text queries, text→image gallery).")
flags.DEFINE_integer("retrieval_texts", 1_000_000, "retrieval: captions, spread evenly over the images.")
flags.DEFINE_integer("retrieval_dim", 0, "retrieval: embedding dimension; 0 = the config's model.embed_dim.")
flags.DEFINE_float("retrieval_noise", 1.0, "retrieval: std of the noise added to an image's embedding per caption.")
flags.DEFINE_multi_string("variant", [], "variants: overrides 'a.b=value,c.d=value' (or 'env:NAME=value') of one "
                          "variant; repeat the flag per variant, the first is the baseline ('' = the config as given).")
flags.DEFINE_float("capacity_budget_gib", 80.0, "capacity: device memory per device, GiB.")
flags.DEFINE_integer("capacity_chunk", 256, "capacity: column block of the chunked variants.")
flags.DEFINE_integer("capacity_micro_rows", 64, "capacity: rows per replica of one micro-batch.")
flags.DEFINE_integer("capacity_max_batch", 1 << 20, "capacity: the largest global batch tried.")
flags.DEFINE_list("capacity_variants", list(capacity.VARIANTS), "capacity: the variants to search.")
FLAGS = flags.FLAGS
DATA_COMMAND = "data"
DATA_DEFAULT_CONFIG = "configs/clip.py:base"
RETRIEVAL_COMMAND = "retrieval"
RETRIEVAL_DEFAULT_CONFIG = "configs/clip.py:tiny"
CAPACITY_COMMAND = "capacity"
CAPACITY_DEFAULT_CONFIG = "configs/clip.py:base"
VARIANTS_COMMAND = "variants"
VARIANTS_DEFAULT_CONFIG = "configs/clip.py:tiny"


def benchmark(config, steps: int, warmup: int) -> dict[str, float | None]:
    """Times `steps` train steps after `warmup`; returns the figures `main` prints."""
    built = variants.CompiledStep.build(config, warmup)
    step_seconds = statistics.median([built.timed_step() for _ in range(steps)])
    run = built.run
    loss_seconds = loss_benchmark(run, built.state, built.batch, steps) if run.method.accumulates() else None
    stats = jax.devices()[0].memory_stats() or {}
    return {
        **built.figures(step_seconds),
        "parameters": count_params(built.state.params),
        "loss_s_median": loss_seconds,
        "peak_device_bytes": stats.get("peak_bytes_in_use"),
        "peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def print_variants_benchmark(config) -> None:
    if len(FLAGS.variant) < 2:
        raise app.UsageError("variants: give at least two --variant flags, the first the baseline (--variant= is "
                             "the config as given), e.g. --variant= --variant=model.scan_layers=true")
    try:
        chosen = [variants.parse_variant(config, text) for text in FLAGS.variant]
    except ValueError as error:  # a key or value the config cannot take: one line, like a bad --config override
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print_header(config)
    print(f"variants: {len(chosen)}; {FLAGS.steps} rounds of one step each, after {FLAGS.warmup} warm-up steps")
    print(variants.format_table(variants.benchmark(config, chosen, FLAGS.steps, FLAGS.warmup)))


def loss_benchmark(run, state, batch, steps: int) -> float:
    """Median seconds of the method's loss over the whole global batch and its gradient w.r.t. the embeddings and
    parameters (`embedding_loss`: the all-gathered or blocked contrastive term), from the batch's real embeddings:
    the loss's share of the step."""
    method = run.method
    host_memory.release_host_memory()  # the step's freed buffers, before these programs compile and run beside them
    with parallel.mesh_context(run.mesh):
        embeddings = jax.jit(method.embed)(state.params, batch)
        constants = jax.jit(method.embed_constants)(state.params, state.extra, batch, state.step)
        loss = jax.jit(jax.value_and_grad(
            lambda p, e: method.embedding_loss(p, e, constants, state.extra, state.rng, state.step)[0], argnums=(0, 1)))
        jax.block_until_ready(loss(state.params, embeddings))
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            jax.block_until_ready(loss(state.params, embeddings))
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def data_benchmark(config) -> None:
    width, height = (int(side) for side in FLAGS.data_source_size.lower().split("x"))
    spec = benchmark_data.DataBenchmark(
        count=FLAGS.data_images, size=(width, height), quality=FLAGS.data_quality,
        workers=tuple(int(w) for w in FLAGS.data_workers), batch=FLAGS.data_batch, seconds=FLAGS.data_seconds,
        data_dir=FLAGS.data_dir,
    )
    for line in benchmark_data.run(config, spec):
        print(line)


def print_capacity_benchmark(config) -> None:
    budget = int(FLAGS.capacity_budget_gib * 2**30)
    results = []
    for variant in FLAGS.capacity_variants:
        results.append(capacity.largest_batch(config, variant, budget, chunk=FLAGS.capacity_chunk,
                                              micro_rows=FLAGS.capacity_micro_rows, max_batch=FLAGS.capacity_max_batch))
        print(f"{variant}: largest {results[-1].largest:,}", flush=True)
    print(capacity.format_table(results, budget))


def print_retrieval_benchmark(config) -> None:
    dim = FLAGS.retrieval_dim or config.model.embed_dim
    images, texts = FLAGS.retrieval_images, FLAGS.retrieval_texts
    device = jax.devices()[0]
    print(f"retrieval: {images:,} images x {texts:,} texts, dim {dim}, both directions; tiles "
          f"{config.eval.query_chunk} x {config.eval.gallery_chunk}; {jax.device_count()} x {device.device_kind}")
    results = benchmark_retrieval.run(config, images, texts, dim, FLAGS.retrieval_noise)
    gib = 2**30
    print(f"time                  {results['seconds']:.1f} s  ({results['scores_per_s'] / 1e9:.2f} G scores/s)")
    print(f"recall                i2t R@1 {results['i2t_r1']:.2f}%  t2i R@1 {results['t2i_r1']:.2f}%  "
          f"median ranks {results['i2t_median_rank']:g} / {results['t2i_median_rank']:g}")
    print(f"embeddings            {results['embedding_bytes'] / gib:.2f} GiB")
    print(f"score matrix (never built) {results['score_matrix_bytes'] / gib:,.1f} GiB")
    print(f"peak host RSS         {results['peak_rss_bytes'] / gib:.2f} GiB "
          f"(before scoring: {results['peak_rss_before_bytes'] / gib:.2f} GiB)")


def main(argv):
    if argv[1:] == [DATA_COMMAND]:
        data_benchmark(FLAGS.config)
        return
    if argv[1:] == [RETRIEVAL_COMMAND]:
        print_retrieval_benchmark(FLAGS.config)
        return
    if argv[1:] == [CAPACITY_COMMAND]:
        print_capacity_benchmark(FLAGS.config)
        return
    if argv[1:] == [VARIANTS_COMMAND]:
        print_variants_benchmark(FLAGS.config)
        return
    if len(argv) > 1:
        raise app.UsageError(
            f"Unexpected arguments: {' '.join(argv[1:])}; the commands are '{DATA_COMMAND}', '{RETRIEVAL_COMMAND}', "
            f"'{CAPACITY_COMMAND}' and '{VARIANTS_COMMAND}'"
        )
    if FLAGS.variant:
        raise app.UsageError(f"--variant belongs to the '{VARIANTS_COMMAND}' command: python -m vlp_jax.bench "
                             f"{VARIANTS_COMMAND} --config=... --variant=... --variant=...")
    config = variants.with_random_stages(FLAGS.config)
    print_header(config)
    results = benchmark(config, FLAGS.steps, FLAGS.warmup)
    gib = 2**30
    mfu = results["mfu"]
    peak = results["peak_device_bytes"]
    print(f"parameters            {results['parameters']:,}")
    print(f"compile time          {results['compile_s']:.2f} s")
    print(f"median step time      {results['step_s_median'] * 1e3:.1f} ms  (over {FLAGS.steps} steps)")
    print(f"pairs/s               {results['pairs_per_s']:,.0f}")
    if results["loss_s_median"] is not None:
        share = results["loss_s_median"] / results["step_s_median"]
        print(f"loss + gradient       {results['loss_s_median'] * 1e3:.1f} ms  ({share:.1%} of the step; the "
              "contrastive loss over the global batch from its embeddings)")
    print(f"model TFLOP/s         {results['tflops_per_s']:.3f}")
    print(f"MFU                   {'n/a (peak unknown for this device)' if mfu is None else f'{mfu:.1%}'}")
    print(f"memory (XLA estimate) {results['estimated_bytes_per_device'] / gib:.2f} GiB per device")
    print(f"peak device memory    {'n/a' if peak is None else f'{peak / gib:.2f} GiB'}")
    print(f"peak host RSS         {results['peak_host_rss_bytes'] / gib:.2f} GiB")


def print_header(config) -> None:
    device = jax.devices()[0]
    print(f"device: {jax.device_count()} x {device.device_kind} ({device.platform}); dtype {config.model.dtype}; "
          f"global batch {config.train.batch_size}; mesh {dict(config.mesh)}")
    if device.platform == "cpu":
        cores = kernels.schedulable_cores()
        print(f"CPU dots: {kernels.cpu_dots()} ({cores} schedulable cores; {kernels.CPU_DOTS_ENV})")
        parts = kernels.attention_parts(config.train.batch_size)
        print(f"CPU attention: {parts} batch slice(s) ({kernels.CPU_ATTENTION_PARTS_ENV})")


def parse_flags(argv: list[str]) -> list[str]:
    """Without --config, `data` and `capacity` benchmark the base preset, `retrieval` and `variants` the tiny one."""
    defaults = {DATA_COMMAND: DATA_DEFAULT_CONFIG, RETRIEVAL_COMMAND: RETRIEVAL_DEFAULT_CONFIG,
                CAPACITY_COMMAND: CAPACITY_DEFAULT_CONFIG, VARIANTS_COMMAND: VARIANTS_DEFAULT_CONFIG}
    command = next((arg for arg in argv[1:] if arg in defaults), None)
    if command and not any(arg.startswith("--config") for arg in argv):
        argv = [*argv, f"--config={defaults[command]}"]
    return cli.parse_flags(argv)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
