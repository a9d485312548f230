"""Orbax checkpoints of the whole run: train state, data-iterator position and config, saved asynchronously.

A checkpoint directory is `<workdir>/checkpoints/<step>/` with three items: `state` (the TrainState pytree, restored
directly into the current mesh's shardings, so a run saved on 8 devices resumes on 4 or on (2, 2, 2)), `data`
(the iterator's JSON state) and `config` (JSON). Orbax writes into a temporary directory and renames it when
complete, so a partially written checkpoint is never listed, never restored.
"""

import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

# Config keys a resumed run may change: they alter neither shapes, the method, nor the optimisation.
# Config keys that may change between a checkpoint and its resumption: they never change the trained numbers
# (the data loader's worker/prefetch settings included: the data order does not depend on them; nor the eval set,
# so --mode=eval may score a checkpoint on other data).
RESUMABLE_CHANGES = ("eval.", "checkpoint.", "train.log_every", "train.steps", "train.device_memory_bytes",
                     "mesh.", "init_from", "data.loader.", "data.eval_sources", "data.group_label")
ITEMS = ("state", "data", "config")
# Replicated arrays smaller than this per replica slice are written from one replica. Orbax's replica-parallel
# save slices every replicated array on its device first, an op compiled per shape: a model's first save blocked
# training for 10.7 s for 1.4 MiB of small tiny-model arrays (4 s for 62 arrays; 0.06 s with this threshold).
REPLICA_PARALLEL_MIN_BYTES = 1 << 20


def _register_array_handler() -> None:
    """jax.Array saves go through an ArrayHandler with REPLICA_PARALLEL_MIN_BYTES (orbax's type handlers are
    process-wide; its platform default for replica-parallel saving is kept)."""
    handler = ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES)
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


class CheckpointError(RuntimeError):
    pass


def flatten(config: dict, prefix: str = "") -> dict[str, object]:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(saved: dict, current: dict) -> list[str]:
    """Lines 'key: saved -> current' for every differing key that a resumed run may not change."""
    old, new = flatten(saved), flatten(current)
    lines = []
    for key in sorted(old.keys() | new.keys()):
        if old.get(key, "<missing>") != new.get(key, "<missing>") and not key.startswith(RESUMABLE_CHANGES):
            lines.append(f"{key}: {old.get(key, '<missing>')!r} -> {new.get(key, '<missing>')!r}")
    return lines


def config_as_json(config: ml_collections.ConfigDict) -> dict:
    """The config as plain JSON types (tuples become lists, as they come back from JSON)."""
    return json.loads(config.to_json())


class Checkpointer:
    """Saves every `config.checkpoint.every` steps, keeps the last `keep` plus every `keep_every`-th step."""

    def __init__(self, workdir: str | epath.Path, checkpoint_config: ml_collections.ConfigDict):
        self.directory = absolute(workdir) / "checkpoints"  # orbax refuses relative paths
        options = ocp.CheckpointManagerOptions(
            max_to_keep=checkpoint_config.keep,
            keep_period=checkpoint_config.keep_every or None,
            create=True,
            cleanup_tmp_directories=True,  # leftovers of a save that was killed midway
            enable_async_checkpointing=checkpoint_config.use_async,
        )
        _register_array_handler()
        self.manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, config: ml_collections.ConfigDict) -> None:
        """Starts an asynchronous save; the next save or `wait()` blocks until it is committed."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config_as_json(config)),
            ),
            force=True,
        )

    def restore(self, step: int, abstract_state, config: ml_collections.ConfigDict | None = None):
        """Returns (state, data_state). `abstract_state` holds ShapeDtypeStructs with the target shardings.

        With `config`, refuses a checkpoint whose config differs in anything but RESUMABLE_CHANGES.
        """
        saved_config = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        if config is not None:
            differences = config_differences(saved_config, config_as_json(config))
            if differences:
                raise CheckpointError(
                    f"The checkpoint at {self.directory / str(step)} was made with a different config; these "
                    "changes alter shapes, the method or the optimisation:\n  " + "\n  ".join(differences)
                    + "\nUse the original values, or a new --workdir (with --config.init_from to warm-start)."
                )
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
        )
        return restored["state"], restored["data"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def absolute(path: str | epath.Path) -> epath.Path:
    """Local paths made absolute; URIs such as gs://bucket/run are already."""
    return epath.Path(path) if "://" in str(path) else epath.Path(os.path.abspath(path))


def abstract_like(state, shardings):
    """ShapeDtypeStructs of `state` carrying the given shardings: the restore target for any mesh."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def open_existing(path: str | epath.Path) -> "Checkpointer":
    """Opens another run's checkpoints for warm-starting, refusing directories that are not vlp_jax runs."""
    workdir = epath.Path(path)
    directory = workdir / "checkpoints"
    if not directory.is_dir():
        raise CheckpointError(
            f"--config.init_from={path}: {directory} does not exist; init_from takes the --workdir of a vlp_jax run"
        )
    options = ml_collections.ConfigDict(dict(keep=None, keep_every=0, use_async=False))
    checkpointer = Checkpointer(workdir, options)
    if checkpointer.latest_step() is None:
        raise CheckpointError(f"--config.init_from={path}: {directory} holds no complete vlp_jax checkpoint")
    return checkpointer
