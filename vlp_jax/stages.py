"""Stages a config declares (`config.stages`), run before the config's own training and reused when finished.

A stage is another run whose output the main run needs: COTS's visual tokenizer, and pre-training before
fine-tuning. Each entry of `config.stages` (run in declaration order) is

    name: dict(config="module:function", output="dotted.config.key", description="what it trains")

`function(run_config)` returns the stage's own run config (e.g. `configs.vq:for_cots`); the stage trains into
`<workdir>/<name>` and the run's config key `output` is set to that directory. A stage is skipped when `output`
already names something (the user points at an existing run, or at RANDOM for an untrained stand-in), and is
reused when its directory holds a checkpoint at its last step. Evaluation (`train_fn=None`) only accepts
finished stages.
"""

import dataclasses
import importlib
from collections.abc import Callable

import ml_collections
from absl import logging
from etils import epath

from vlp_jax.checkpoint import Checkpointer

RANDOM = "random"  # a stage output meaning "an untrained stand-in of the stage's model" (benchmarks, tests)


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    config_fn: str  # "module:function", called with the run config
    output: str  # dotted config key that receives the stage's run directory
    description: str

    def make_config(self, run_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        """The stage's own run config, derived from the run's."""
        module_name, _, function = self.config_fn.partition(":")
        try:
            make = getattr(importlib.import_module(module_name), function)
        except (ImportError, AttributeError) as error:
            raise ValueError(
                f"config.stages.{self.name}.config={self.config_fn!r} names no function ({error}); use "
                "'module:function', e.g. 'configs.vq:for_cots'"
            ) from error
        return make(run_config)


def declared(config: ml_collections.ConfigDict) -> list[Stage]:
    """The stages of `config.stages` in order."""
    stages = config.get("stages") or {}
    return [Stage(name, entry.config, entry.output, entry.get("description", name)) for name, entry in stages.items()]


def get_key(config: ml_collections.ConfigDict, dotted: str):
    node = config
    for key in dotted.split("."):
        node = node[key]
    return node


def set_key(config: ml_collections.ConfigDict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    node = config
    for key in parents:
        node = node[key]
    node[last] = value


def producing(config: ml_collections.ConfigDict, output: str) -> Stage:
    """The declared stage whose output is the config key `output`."""
    for stage in declared(config):
        if stage.output == output:
            return stage
    raise ValueError(f"config.{output}={RANDOM!r} needs a stage that produces it, but config.stages declares none")


def finished(run_dir: epath.Path, config: ml_collections.ConfigDict) -> bool:
    """True when `run_dir` holds a complete checkpoint at the run's last step."""
    if not (run_dir / "checkpoints").is_dir():
        return False
    checkpointer = Checkpointer(run_dir, config.checkpoint)
    try:
        latest = checkpointer.latest_step()
    finally:
        checkpointer.close()
    return latest is not None and latest >= config.train.steps


def prepare(config: ml_collections.ConfigDict, workdir: epath.PathLike, train_fn: Callable | None,
            preflight: Callable | None = None):
    """Runs or reuses every declared stage and returns the config with each stage's output key set.

    `train_fn(stage_config, stage_workdir)` trains a stage; None (evaluation) only accepts finished stages. Before
    any stage trains, one line lays out the whole run, and `preflight(config)` checks the final stage with every
    stage output an untrained stand-in (RANDOM): its plan and memory verdict come in seconds, before hours of
    stage training, and an oversized run fails there.
    """
    stages = [stage for stage in declared(config) if not get_key(config, stage.output)]
    if not stages:
        return config
    config = config.copy_and_resolve_references()
    planned = [(stage, epath.Path(workdir) / stage.name, stage.make_config(config)) for stage in stages]
    to_train = [number for number, (_, stage_dir, stage_config) in enumerate(planned, start=1)
                if not finished(stage_dir, stage_config)]
    parts = [f"{number}/{len(stages) + 1} {stage.description} ({stage_config.method.name}, "
             f"{stage_config.train.steps} steps x batch {stage_config.train.batch_size}"
             f"{'' if number in to_train else ', finished: reused'})"
             for number, (stage, _, stage_config) in enumerate(planned, start=1)]
    parts.append(f"{len(stages) + 1}/{len(stages) + 1} {config.method.name} ({config.train.steps} steps x batch "
                 f"{config.train.batch_size})")
    logging.info("run: %d stages: %s", len(stages) + 1, "; ".join(parts))
    if to_train and train_fn is not None and preflight is not None:
        stand_in = config.copy_and_resolve_references()
        for stage in stages:
            set_key(stand_in, stage.output, RANDOM)
        logging.info("stage %d/%d checked first (its stage outputs untrained stand-ins)", len(stages) + 1,
                     len(stages) + 1)
        preflight(stand_in)
    for number, (stage, stage_dir, stage_config) in enumerate(planned, start=1):
        if number in to_train:
            if train_fn is None:
                raise FileNotFoundError(
                    f"{stage_dir} holds no finished {stage.description} (stage {stage.name!r}); train the run first "
                    "(--mode=train)"
                )
            logging.info("stage %d/%d: training the %s (%d steps) into %s", number, len(stages) + 1,
                         stage.description, stage_config.train.steps, stage_dir)
            train_fn(stage_config, str(stage_dir))
        set_key(config, stage.output, str(stage_dir))
    logging.info("stage %d/%d: %s with %s", len(stages) + 1, len(stages) + 1, config.method.name,
                 ", ".join(f"{stage.output}={get_key(config, stage.output)}" for stage in stages))
    return config
