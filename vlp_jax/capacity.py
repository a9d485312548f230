"""The largest global batch whose train step fits a device-memory budget, from XLA's memory analysis.

`python -m vlp_jax.bench capacity --config=configs/clip.py:base --capacity_budget_gib=80` compiles the real train
step (nothing runs, nothing is allocated: the state and batch are shapes) for growing global batches over the
config's mesh and reports, for each way of training the same exact batch, the largest one whose per-device
program (arguments + outputs − donated + temporaries, memory.compiled_bytes) stays within the budget:

- `whole`: one pass over the batch, the contrastive loss over all gathered columns at once;
- `chunked`: the loss over column blocks of `config.train.contrastive_chunk` (or --capacity_chunk);
- `micro`: exact accumulation with micro-batches of --capacity_micro_rows rows per replica (K = b_local / rows);
- `micro+chunked`: both.

The search doubles the batch from one micro-batch per replica until the step no longer fits, then bisects the
last interval to within an eighth. On CPU (the fake devices of a test machine) the figures are XLA CPU's plan for
the same program, an estimate of an accelerator's.
"""

import dataclasses

import jax
import ml_collections

from vlp_jax import memory, parallel, step

VARIANTS = ("whole", "chunked", "micro", "micro+chunked")


@dataclasses.dataclass(frozen=True)
class Probe:
    """One compiled global batch: its per-device bytes and whether they fit."""

    batch: int
    microbatches: int
    bytes: int
    fits: bool


@dataclasses.dataclass(frozen=True)
class Capacity:
    """The search of one variant: the largest fitting batch (0: not even the smallest) and every probe."""

    variant: str
    largest: int
    probes: tuple[Probe, ...]

    @property
    def largest_bytes(self) -> int:
        return max((p.bytes for p in self.probes if p.batch == self.largest), default=0)


def variant_config(config: ml_collections.ConfigDict, variant: str, chunk: int) -> ml_collections.ConfigDict:
    """`config` with the variant's loss blocking; micro-batches are set per probe (they depend on the batch)."""
    if variant not in VARIANTS:
        raise ValueError(f"--capacity_variants: unknown variant {variant!r}; the variants are {', '.join(VARIANTS)}")
    config = ml_collections.ConfigDict(config.to_dict())
    config.train.contrastive_chunk = chunk if "chunked" in variant else 0
    config.train.microbatches = 1
    return config


def step_bytes(config: ml_collections.ConfigDict, batch_size: int, microbatches: int = 1) -> int:
    """Per-device bytes of the compiled train step of `config` at global batch `batch_size`."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.train.batch_size = config.eval.batch_size = batch_size
    config.train.microbatches = microbatches
    run = step.setup(config, abstract=True)
    batch = step.abstract_batch(run.method.example_batch(config), batch_size, run.mesh)
    with parallel.mesh_context(run.mesh):
        compiled = run.train_step.lower(run.state, batch).compile()
    return memory.compiled_bytes(compiled)


def largest_batch(config: ml_collections.ConfigDict, variant: str, budget_bytes: int, *, chunk: int = 256,
                  micro_rows: int = 64, max_batch: int = 1 << 20, measure=step_bytes) -> Capacity:
    """Searches the largest global batch of `variant` whose step fits `budget_bytes` per device.

    Batches are multiples of the mesh's batch parallelism × `micro_rows` (micro variants: K = b_local /
    micro_rows). `measure(config, batch, microbatches)` gives the bytes (the compiled step by default)."""
    config = variant_config(config, variant, chunk)
    replicas = parallel.batch_parallelism(parallel.make_mesh(config.mesh))
    unit = replicas * micro_rows
    micro = variant.startswith("micro")
    probes: list[Probe] = []

    def probe(batch: int) -> bool:
        microbatches = batch // unit if micro else 1
        used = measure(config, batch, microbatches)
        probes.append(Probe(batch, microbatches, used, used <= budget_bytes))
        return used <= budget_bytes

    low, high = 0, unit
    while high <= max_batch and probe(high):
        low, high = high, 2 * high
    if high > max_batch:
        return Capacity(variant, low, tuple(probes))
    while low and high - low > max(unit, low // 8):  # bisect in units to within an eighth
        middle = (low + high) // 2 // unit * unit
        if probe(middle):
            low = middle
        else:
            high = middle
    return Capacity(variant, low, tuple(probes))


def format_table(results: list[Capacity], budget_bytes: int) -> str:
    """The report `python -m vlp_jax.bench capacity` prints."""
    lines = [f"largest exact global batch within {memory.format_bytes(budget_bytes)} per device "
             f"({jax.device_count()} x {jax.devices()[0].device_kind}; XLA's memory analysis)",
             f"{'variant':<15}{'largest batch':>14}{'per device':>14}  probes (batch: bytes, K; x: over)"]
    for result in results:
        probes = ", ".join(_describe(p) for p in result.probes)
        lines.append(f"{result.variant:<15}{result.largest:>14,}{memory.format_bytes(result.largest_bytes):>14}  "
                     f"{probes}")
    return "\n".join(lines)


def _describe(probe: Probe) -> str:
    """'4096: 12.3 GiB K=8 x' (x: over the budget)."""
    micro = "" if probe.microbatches == 1 else f" K={probe.microbatches}"
    return f"{probe.batch}: {memory.format_bytes(probe.bytes)}{micro}{'' if probe.fits else ' x'}"
