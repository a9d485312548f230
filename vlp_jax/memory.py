"""Fail fast instead of OOM: compare a compiled step's memory needs with what the devices have."""

import dataclasses
import os

import jax


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    per_device_bytes: int  # arguments + outputs - donated aliases + temporaries of one device's program
    available_bytes: int  # per device (host RAM shared among the local devices on CPU)

    @property
    def fits(self) -> bool:
        return self.per_device_bytes <= self.available_bytes


def host_memory_bytes() -> int:
    """Memory the OS could still give this process (MemAvailable), falling back to physical RAM."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_memory_bytes(device: jax.Device) -> int:
    """The allocator's limit on GPU/TPU; on CPU the host's available RAM split over the local devices."""
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return host_memory_bytes() // max(1, jax.local_device_count())


def compiled_bytes(compiled) -> int:
    """Per-device bytes a compiled program needs, from XLA's memory analysis."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return 0
    return int(
        analysis.argument_size_in_bytes + analysis.output_size_in_bytes - analysis.alias_size_in_bytes
        + analysis.temp_size_in_bytes
    )


def check_fits(compiled, available_bytes: int = 0) -> MemoryEstimate:
    """Raises a clear error, before the first step, when the train step cannot fit in device memory.

    `available_bytes` overrides the detected per-device memory (config.train.device_memory_bytes).
    """
    estimate = MemoryEstimate(
        per_device_bytes=compiled_bytes(compiled),
        available_bytes=available_bytes or device_memory_bytes(jax.local_devices()[0]),
    )
    if not estimate.fits:
        raise MemoryError(
            f"The train step needs {format_bytes(estimate.per_device_bytes)} per device but only "
            f"{format_bytes(estimate.available_bytes)} are available. Lower --config.train.batch_size, set "
            "--config.model.remat=full with --config.model.scan_layers=True (recompute activations), or shard "
            "parameters and optimizer state with --config.mesh.fsdp=<devices> (and --config.mesh.data=-1)."
        )
    return estimate


def format_bytes(count: int) -> str:
    """1536 -> '1.5 KiB'; binary units up to TiB."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
