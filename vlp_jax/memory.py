"""Fail fast instead of OOM: compare a compiled step's memory needs with what the devices have."""

import ctypes
import dataclasses
import functools
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
            "--config.model.remat=full (recompute activations), or shard parameters and optimizer state with "
            "--config.mesh.fsdp=<devices> (and --config.mesh.data=-1)."
        )
    return estimate


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


# mallopt's parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
ALLOCATOR_ENV = "VLP_JAX_MALLOC"  # "default": leave glibc's malloc as it is


def keep_host_buffers() -> bool:
    """Makes glibc's malloc keep freed memory for the next allocation instead of handing it back to the OS, so XLA
    CPU's per-step buffers are reused instead of mapped afresh each step; False where it did nothing (no glibc, or
    VLP_JAX_MALLOC=default). Called when vlp_jax is imported, before XLA's threads first allocate.

    XLA CPU allocates a step's temporaries (688 MiB for the tiny CLIP step at batch 128) in one block, from a
    worker thread. glibc serves that thread from a secondary arena, which cannot hold the block, so it is mmapped and
    unmapped again each step: every step then faults in ~180,000 fresh pages, ~2.5 µs each on a virtual machine,
    a quarter of the tiny step's time. With one arena, no mmap and no automatic trimming, the block comes from the
    heap once and stays: the step has no page faults after the first and takes 0.58 s instead of 0.75 s here (torch
    keeps its buffers the same way: glibc's mmap threshold rises to its 32 MiB cap after the first frees). CPU
    dispatch becomes synchronous too, one step's buffers at a time; otherwise the next step takes a second block
    while the last one's is still in use, and both would stay (peak RSS 2.5 instead of 1.2 GiB). Peak RSS is then
    what it was; `release_host_memory` still trims on request.
    """
    libc = _glibc()
    if libc is None or os.environ.get(ALLOCATOR_ENV) == "default":
        return False
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
    if not all(libc.mallopt(parameter, value) == 1 for parameter, value in settings):
        return False
    # One CPU step at a time: with asynchronous dispatch the next step's buffers are taken while the last step's are
    # still in use, and kept buffers would then hold two steps' worth (2.5 instead of 1.2 GiB at the tiny step).
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    return True


def release_host_memory() -> bool:
    """Hands the heap's free pages back to the OS (glibc's malloc_trim); False where there is no glibc.

    Compiling keeps LLVM's freed working memory in the process's heap, and XLA CPU's step buffers then come on top
    of it. Trimmed after the compile (step.compile_step), the peak RSS of the tiny CLIP step on the CPU falls from
    1.55 to 1.22 GiB; the pages come back on demand, so nothing else changes.
    """
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def format_bytes(count: int) -> str:
    """1536 -> '1.5 KiB'; binary units up to TiB."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
