"""The train step of a config and of its variants, compiled for random inputs and timed side by side
(`python -m vlp_jax.bench` and its `variants` command).

A variant is the config with some keys overridden ('model.scan_layers=true,model.remat=full') and, optionally,
environment variables set while its step is traced and compiled ('env:VLP_JAX_CPU_DOTS=xla'). All variants are
compiled first and then timed in one process, one step of each per round in a shuffled order, so that a slow spell
of a shared machine hits them all alike; each variant's step time is reported against the first variant's as the
median of the per-round ratios, with their quartiles.
"""

import ast
import contextlib
import copy
import dataclasses
import os
import random
import re
import statistics
import time

import jax
import numpy as np

from vlp_jax import methods, parallel, stages, step
from vlp_jax.flops import mfu

ENV_PREFIX = "env:"  # a variant's override of an environment variable instead of a config key


def with_random_stages(config):
    """`config` with every pretrained weight its method loads from a stage set to an untrained stand-in: step time
    does not depend on what the weights mean."""
    for spec in methods.get(config.method.name).pretrained(config).values():
        if not stages.get_key(config, spec.config_key):
            stages.set_key(config, spec.config_key, stages.RANDOM)
    return config


@dataclasses.dataclass
class CompiledStep:
    """A config's train step compiled for random inputs of its shapes, with its state (carried on by each step)."""

    config: object
    run: step.Setup
    compiled: object
    state: object
    batch: object
    compile_seconds: float
    flops: float
    estimated_bytes: int

    @classmethod
    def build(cls, config, warmup: int) -> "CompiledStep":
        """Compiles `config`'s step and runs `warmup` steps."""
        run = step.setup(config)
        example = run.method.example_batch(config)  # random inputs of the method's declared shapes
        host_batch = step.random_batch(example, config.train.batch_size, np.random.default_rng(config.seed))
        batch = parallel.global_batch_from_local(host_batch, run.mesh)
        started = time.perf_counter()
        compiled, estimate, flops = step.compile_step(run, batch, config)
        built = cls(config, run, compiled, run.state, batch, time.perf_counter() - started, flops,
                    estimate.per_device_bytes)
        for _ in range(warmup):
            built.timed_step()
        return built

    def timed_step(self) -> float:
        """Runs one step; returns its seconds, to its metrics being ready."""
        started = time.perf_counter()
        self.state, step_metrics = self.compiled(self.state, self.batch)
        jax.block_until_ready(step_metrics)
        return time.perf_counter() - started

    def figures(self, step_seconds: float) -> dict[str, float | None]:
        device = jax.devices()[0]
        return {
            "compile_s": self.compile_seconds,
            "step_s_median": step_seconds,
            "pairs_per_s": self.config.train.batch_size / step_seconds,
            "tflops_per_s": self.flops / step_seconds / 1e12,
            "mfu": mfu(self.flops, step_seconds, device.device_kind, self.config.model.dtype, self.run.mesh.size),
            "estimated_bytes_per_device": self.estimated_bytes,
        }


@dataclasses.dataclass(frozen=True)
class Variant:
    """One variant of the config: its name (the --variant text), its config overrides and environment."""

    name: str
    config: dict[str, object]
    env: dict[str, str]


def _override_value(config, key: str, text: str, variant: str):
    """`text` as the type of config's `key`, which must exist; a bad key or value raises naming both."""
    where = f"--variant={variant!r}: {key}"
    node, walked = config, "config"
    for part in key.split("."):
        if not hasattr(node, "keys") or part not in node:
            keys = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "none"
            raise ValueError(f"{where}: {walked} has no key {part!r}. Its keys: {keys}")
        node, walked = node[part], f"{walked}.{part}"
    if hasattr(node, "keys"):
        raise ValueError(f"{where} is a group of keys, not a value; override one of: {', '.join(sorted(node))}")
    if isinstance(node, bool):
        truth = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
        if text.lower() not in truth:
            raise ValueError(f"{where}={text!r} is not a boolean; use true or false")
        return truth[text.lower()]
    if isinstance(node, (int, float)):
        try:
            return type(node)(text)
        except ValueError:
            kind = "an integer" if isinstance(node, int) else "a number"
            raise ValueError(f"{where}={text!r} is not {kind}") from None
    if isinstance(node, (tuple, list)) or node is None:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            if node is not None:
                raise ValueError(f"{where}={text!r} is not a Python {type(node).__name__}, e.g. (2, 4)") from None
    return text


def parse_variant(config, text: str) -> Variant:
    """'a.b=1,c.d=x,env:NAME=v' -> a Variant, each value converted to its config key's type. A comma splits
    overrides only where `key=` follows it, so values may hold commas ('model.sizes=(2,4)')."""
    overrides, env = {}, {}
    for item in re.split(r",(?=\s*(?:env:)?[\w.]+=)", text.strip()) if text.strip() else []:
        key, sep, value = item.strip().partition("=")
        if not sep or not key:
            raise ValueError(f"--variant={text!r}: {item!r} is not key=value (e.g. model.scan_layers=true)")
        if key.startswith(ENV_PREFIX):
            env[key[len(ENV_PREFIX):]] = value
        else:
            overrides[key] = _override_value(config, key, value, text)
    return Variant(text.strip() or "(config as given)", overrides, env)


@contextlib.contextmanager
def _environment(env: dict[str, str]):
    """Sets `env` inside the block (where a variant's step is traced and compiled) and restores it after."""
    old = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def benchmark(config, variants: list[Variant], steps: int, warmup: int, seed: int = 0) -> list[dict]:
    """Compiles every variant's step, then times `steps` rounds, each running one step of every variant in a
    shuffled order. Returns each variant's figures and its step time against the first variant's: the median of
    the per-round ratios and their quartiles."""
    built = []
    for variant in variants:
        variant_config = copy.deepcopy(config)
        for key, value in variant.config.items():
            stages.set_key(variant_config, key, value)
        with _environment(variant.env):
            built.append(CompiledStep.build(with_random_stages(variant_config), warmup))
        print(f"compiled {variant.name} in {built[-1].compile_seconds:.1f} s", flush=True)
    times = [[] for _ in built]
    order = list(range(len(built)))
    shuffle = random.Random(seed).shuffle
    for _ in range(steps):
        shuffle(order)
        for index in order:
            times[index].append(built[index].timed_step())
    results = []
    for variant, one, seconds in zip(variants, built, times, strict=True):
        ratios = sorted(mine / first for mine, first in zip(seconds, times[0], strict=True))
        results.append({"variant": variant.name, **one.figures(statistics.median(seconds)),
                        "ratio": statistics.median(ratios), "ratio_q25": ratios[len(ratios) // 4],
                        "ratio_q75": ratios[(3 * len(ratios)) // 4]})
    return results


def format_table(results: list[dict]) -> str:
    width = max(len("variant"), *(len(row["variant"]) for row in results))
    lines = [f"{'variant':{width}}  compile s  step ms   pairs/s     MFU  memory GiB  time vs first [q25, q75]"]
    for row in results:
        mfu_text = "n/a" if row["mfu"] is None else f"{row['mfu']:.1%}"
        lines.append(f"{row['variant']:{width}}  {row['compile_s']:9.1f}  {row['step_s_median'] * 1e3:7.1f}  "
                     f"{row['pairs_per_s']:8,.0f}  {mfu_text:>6}  {row['estimated_bytes_per_device'] / 2**30:10.2f}  "
                     f"{row['ratio']:.3f}x [{row['ratio_q25']:.3f}, {row['ratio_q75']:.3f}]")
    return "\n".join(lines)


