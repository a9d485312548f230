"""Orbax checkpoints of the whole run: train state, data-iterator position and config, saved asynchronously.

A checkpoint directory is `<workdir>/checkpoints/<step>/` with three items: `state` (the TrainState pytree, restored
directly into the current mesh's shardings, so a run saved on 8 devices resumes on 4 or on (2, 2, 2)), `data`
(the iterator's JSON state) and `config` (JSON). Orbax writes into a temporary directory and renames it when
complete, so a partially written checkpoint is never listed, never restored. `restore_latest` moves a listed but
damaged one (truncated or deleted files) aside to `<workdir>/checkpoints_damaged/` and resumes from the newest that
restores. A save that runs out of disk space raises one DiskFullError.

`load_params` is the one partial reader of other runs (warm starts, tokenizers, teachers): it reads the selected
leaves of the state's `params` or `extra` as host arrays, never the optimizer state.
"""

import dataclasses
import errno
import json
import os
import re
import shutil
from collections.abc import Iterable
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from vlp_jax.memory import format_bytes

# Config keys that may change between a checkpoint and its resumption: they never change the trained numbers
# (the data loader's worker/prefetch settings included: the data order does not depend on them; nor the eval set,
# so --mode=eval may score a checkpoint on other data; init_from and init.* act before the first step only).
RESUMABLE_CHANGES = ("eval.", "checkpoint.", "train.log_every", "train.steps", "train.device_memory_bytes",
                     "mesh.", "init_from", "init.", "data.loader.", "data.eval_sources", "data.group_label",
                     "model.remat")  # remat trades memory for time: the same results
ITEMS = ("state", "data", "config")
# Replicated arrays smaller than this per replica slice are written from one replica. Orbax's replica-parallel
# save slices every replicated array on its device first, an op compiled per shape: a model's first save blocked
# training for 10.7 s for 1.4 MiB of small tiny-model arrays (4 s for 62 arrays; 0.06 s with this threshold).
REPLICA_PARALLEL_MIN_BYTES = 1 << 20
DAMAGED_DIR = "checkpoints_damaged"  # beside <workdir>/checkpoints: outside orbax's step listing


def _register_array_handler() -> None:
    """jax.Array saves go through an ArrayHandler with REPLICA_PARALLEL_MIN_BYTES (orbax's type handlers are
    process-wide; its platform default for replica-parallel saving is kept)."""
    handler = ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES)
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


class CheckpointError(RuntimeError):
    pass


class DiskFullError(CheckpointError):
    """A checkpoint save ran out of disk space; the message names the directory, the space needed and free."""


def is_disk_full(error: BaseException) -> bool:
    """Whether `error`, or any exception it wraps (cause, context, group), is ENOSPC: orbax's async saves raise
    the writer thread's OSError, or tensorstore's error quoting it, wrapped in their own."""
    pending, seen = [error], set()
    while pending:
        error = pending.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "No space left on device" in str(error):
            return True
        pending += [error.__cause__, error.__context__, *getattr(error, "exceptions", ())]
    return False


def summary(error: BaseException, limit: int = 200) -> str:
    """'Type: first line of the message', at most `limit` characters: an error quoted in one log line."""
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"[:limit]


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
        self.state_bytes = 0  # the size of the last state saved: what a checkpoint needs on disk
        self.disk_full: DiskFullError | None = None  # raised once; later waits and the close do not repeat it

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, config: ml_collections.ConfigDict) -> None:
        """Starts an asynchronous save; the next save or `wait()` blocks until it is committed."""
        self.state_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config_as_json(config)),
        )
        self.writing(lambda: self.manager.save(step, args=args, force=True))

    def saved_config(self, step: int) -> dict:
        """The run config saved with `step`, as JSON."""
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def restore(self, step: int, abstract_state, config: ml_collections.ConfigDict | None = None):
        """Returns (state, data_state). `abstract_state` holds ShapeDtypeStructs with the target shardings.

        With `config`, refuses a checkpoint whose config differs in anything but RESUMABLE_CHANGES.
        """
        saved_config = self.saved_config(step)
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

    def restore_latest(self, abstract_state, config: ml_collections.ConfigDict) -> tuple[int, Any, dict] | None:
        """(step, state, data_state) of the newest checkpoint that restores, None when there is none. Newer ones that
        fail (truncated or missing files) are moved aside, not deleted; config differences raise as in `restore`.
        When none restores, nothing is moved: the same failure on every step is more likely other code than damage."""
        damaged: list[tuple[int, Exception]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state, data_state = self.restore(step, abstract_state, config)
            except CheckpointError:
                raise
            except Exception as error:  # any other failure to read a listed step is damage
                damaged.append((step, error))
                continue
            if damaged:
                self.set_aside(damaged, step)
            return step, state, data_state
        if not damaged:
            return None
        raise CheckpointError(
            f"none of the {len(damaged)} checkpoints in {self.directory} can be restored (step {damaged[0][0]}: "
            f"{summary(damaged[0][1])}); move {self.directory} aside (e.g. to {self.directory.parent / DAMAGED_DIR}) "
            "to start afresh, or pass a new --workdir")

    def set_aside(self, damaged: list[tuple[int, Exception]], fallback: int) -> None:
        """Moves the damaged step directories to <workdir>/checkpoints_damaged/, re-lists the steps and says so in
        one warning, with how many steps will be redone."""
        aside_root, moves = self.directory.parent / DAMAGED_DIR, []
        for step, error in damaged:
            source, target, copy = self.directory / str(step), aside_root / str(step), 0
            while target.exists():  # the same step was damaged in an earlier rerun
                copy += 1
                target = aside_root / f"{step}.{copy}"
            if jax.process_index() == 0:
                aside_root.mkdir(parents=True, exist_ok=True)
                source.rename(target)
            moves.append(f"{source} ({summary(error)}) moved aside to {target}")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("vlp_jax_checkpoints_set_aside")
        self.manager.reload()  # orbax caches its step list
        logging.warning("damaged checkpoint: %s; resuming from step %d (%s): %d step(s) will be redone",
                        "; ".join(moves), fallback, self.directory / str(fallback), damaged[0][0] - fallback)

    def writing(self, action) -> None:
        """Runs a save or wait; a full disk becomes one DiskFullError, raised once."""
        if self.disk_full is not None:
            return
        try:
            action()
        except Exception as error:
            if not is_disk_full(error):
                raise
            self.disk_full = self.disk_full_error()
            raise self.disk_full from None

    def disk_full_error(self) -> DiskFullError:
        self.manager.reload()  # the failed step is not listed: the last complete one is
        last = self.manager.latest_step()
        try:
            free = format_bytes(shutil.disk_usage(self.directory).free)
        except OSError:
            free = "an unknown amount"  # a remote URI (gs://...)
        kept = "no complete checkpoint yet" if last is None else f"{self.directory / str(last)} (step {last})"
        return DiskFullError(
            f"no space left on device saving a checkpoint in {self.directory}: it needs about "
            f"{format_bytes(self.state_bytes)} ({self.state_bytes:,} bytes) and {free} is free. The last complete "
            f"checkpoint is {kept}; a rerun resumes there. Free space (or lower --config.checkpoint.keep), or pass "
            "a --workdir on a larger disk"
        )

    def wait(self) -> None:
        self.writing(self.manager.wait_until_finished)

    def close(self) -> None:
        try:
            self.manager.close()
        except Exception:
            if self.disk_full is None:  # after a full disk, orbax raises the failed save again on closing
                raise


def absolute(path: str | epath.Path) -> epath.Path:
    """Local paths made absolute; URIs such as gs://bucket/run are already."""
    return epath.Path(path) if "://" in str(path) else epath.Path(os.path.abspath(path))


def abstract_like(state, shardings):
    """ShapeDtypeStructs of `state` carrying the given shardings: the restore target for any mesh."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


PyTree = Any
ITEM_SHOWN_PATHS = 8  # how many of a checkpoint's leaf paths an error message lists as examples


def path_name(key_path) -> str:
    """A leaf's pytree path as its '/'-joined keys, e.g. "towers/image_tower/cls": the names that load_params
    and the parameter groups (optimizer.py) select with regexes."""
    return jax.tree_util.keystr(key_path, simple=True, separator="/")


def leaves_by_path(tree: PyTree) -> dict[str, Any]:
    return {path_name(key_path): leaf for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def nest(flat: dict[str, Any]) -> dict:
    """{'a/b': x, 'a/c': y} -> {'a': {'b': x, 'c': y}}."""
    tree: dict = {}
    for path, value in flat.items():
        *parents, name = path.split("/")
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[name] = value
    return tree


def compile_pattern(kind: str, pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as error:
        raise ValueError(f"load_params {kind}: {pattern!r} is not a valid regex ({error})") from None


def rename_rules(rename: Iterable) -> list[tuple[re.Pattern, str]]:
    """Compiled (pattern, replacement) rules from pairs or "pattern=replacement" strings (split at the last '=',
    so a pattern may hold a lookahead such as '(?=...)')."""
    rules = []
    for rule in rename:
        if isinstance(rule, str):
            if "=" not in rule:
                raise ValueError(f"load_params rename: {rule!r} is not 'pattern=replacement'")
            rule = rule.rsplit("=", 1)
        pattern, replacement = rule
        rules.append((compile_pattern("rename", pattern), replacement))
    return rules


@dataclasses.dataclass
class Loaded:
    """What load_params read from a run: `tree` (nested dicts of host arrays under the renamed paths, or the
    target with those leaves replaced), the run's saved `config`, the `step` and its checkpoint `directory`
    (<run_dir>/checkpoints/<step>); `paths`: the (renamed) paths of the leaves read."""

    tree: PyTree
    config: ml_collections.ConfigDict
    step: int
    directory: epath.Path
    paths: tuple[str, ...]


def saved_run(run_dir: str | epath.Path, flag: str, step: int | None = None
              ) -> tuple[ml_collections.ConfigDict, int, epath.Path]:
    """(the run config saved with `step`, that step, its checkpoint directory) of the run in `run_dir`; step None:
    the latest complete checkpoint. `flag` names where `run_dir` came from, for the errors."""
    run_dir = absolute(run_dir)
    where = f"{flag}={run_dir}"
    if not (run_dir / "checkpoints").is_dir():
        setting = flag.lstrip("-").removeprefix("config.")
        raise CheckpointError(f"{where}: {run_dir / 'checkpoints'} does not exist; {setting} takes the --workdir "
                              "of a vlp_jax run")
    checkpointer = Checkpointer(run_dir, ml_collections.ConfigDict(dict(keep=None, keep_every=0, use_async=False)))
    try:
        steps = checkpointer.manager.all_steps()
        if not steps:
            raise CheckpointError(f"{where}: {checkpointer.directory} holds no complete vlp_jax checkpoint")
        step = max(steps) if step is None else step
        if step not in steps:
            raise CheckpointError(f"{where} has no checkpoint of step {step}; it has steps {sorted(steps)}")
        return ml_collections.ConfigDict(checkpointer.saved_config(step)), step, checkpointer.directory / str(step)
    finally:
        checkpointer.close()


def load_params(
    run_dir: str | epath.Path,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    rename: Iterable = (),
    *,
    item: str = "params",
    step: int | None = None,
    target: PyTree = None,
    flag: str = "--config.init_from",
) -> Loaded:
    """Reads the leaves of the TrainState subtree `item` ("params" or "extra") saved by the run in `run_dir`.

    Leaf paths are '/'-joined keys relative to `item`. `include` regexes (fullmatch; none = all) select leaves,
    `exclude` regexes drop some of those, `rename` (pattern, replacement) rules map saved paths to target paths
    with re.sub, in order. Only the selected leaves are read (orbax partial restore), as host NumPy arrays.
    With `target` (arrays or ShapeDtypeStructs), every selected leaf must have a target leaf of its shape:
    it replaces it, cast to its dtype and placed in its sharding; other target leaves are kept.
    Step None: the latest complete checkpoint. `flag` names where `run_dir` came from, for the errors.
    """
    run_dir = absolute(run_dir)
    where = f"{flag}={run_dir}"
    includes = [compile_pattern("include", pattern) for pattern in include]
    excludes = [compile_pattern("exclude", pattern) for pattern in exclude]
    rules = rename_rules(rename)
    config, step, directory = saved_run(run_dir, flag, step)

    with ocp.PyTreeCheckpointer() as reader:
        state_dir = directory / "state"  # the Checkpointer's layout
        saved = reader.metadata(state_dir).item_metadata
        if item not in saved:
            raise CheckpointError(f"{where}: the state at {state_dir} has no {item!r}; it has {', '.join(saved)}")
        available = leaves_by_path(saved[item])
        selected = {path: rename_path(path, rules) for path in available if is_selected(path, includes, excludes)}
        check_selection(where, item, available, selected, target)
        # Unselected leaves are None: orbax's partial restore reads only the others (never the optimizer state).
        wanted = {item: jax.tree_util.tree_map_with_path(
            lambda key_path, meta: meta if path_name(key_path) in selected else None, saved[item])}
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
        restored = reader.restore(
            state_dir, args=ocp.args.PyTreeRestore(item=wanted, restore_args=restore_args, partial_restore=True)
        )[item]
    arrays = {selected[path]: np.asarray(value) for path, value in leaves_by_path(restored).items()}
    tree = nest(arrays) if target is None else replace_leaves(target, arrays)
    return Loaded(tree=tree, config=config, step=step, directory=directory, paths=tuple(arrays))


def is_selected(path: str, includes: list[re.Pattern], excludes: list[re.Pattern]) -> bool:
    included = not includes or any(pattern.fullmatch(path) for pattern in includes)
    return included and not any(pattern.fullmatch(path) for pattern in excludes)


def rename_path(path: str, rules: list[tuple[re.Pattern, str]]) -> str:
    for pattern, replacement in rules:
        path = pattern.sub(replacement, path)
    return path


def check_selection(where: str, item: str, available: dict[str, Any], selected: dict[str, str], target) -> None:
    """Raises one CheckpointError listing every problem of the selection: nothing selected, two saved leaves
    renamed to one path, selected leaves the target lacks, or has in another shape."""
    if not selected:
        examples = ", ".join(list(available)[:ITEM_SHOWN_PATHS])
        raise CheckpointError(
            f"{where}: include/exclude select none of the {len(available)} {item} arrays; their paths look like "
            f"{examples}{', ...' if len(available) > ITEM_SHOWN_PATHS else ''}"
        )
    problems = []
    by_target: dict[str, list[str]] = {}
    for path, renamed in selected.items():
        by_target.setdefault(renamed, []).append(path)
    problems += [f"{', '.join(paths)}: all renamed to {renamed}" for renamed, paths in by_target.items()
                 if len(paths) > 1]
    if target is not None:
        targets = leaves_by_path(target)
        unmatched = [f"{path}" + (f" (renamed {renamed})" if renamed != path else "")
                     for path, renamed in selected.items() if renamed not in targets]
        if unmatched:
            problems.append(f"selected arrays with no counterpart in the target (unmatched, {len(unmatched)}):\n    "
                            + "\n    ".join(unmatched))
        problems += [
            f"{renamed}: saved shape {tuple(available[path].shape)}, target shape {tuple(targets[renamed].shape)}"
            for path, renamed in selected.items()
            if renamed in targets and tuple(available[path].shape) != tuple(targets[renamed].shape)
        ]
    if problems:
        raise CheckpointError(f"{where}: cannot load its {item}:\n  " + "\n  ".join(problems))


def replace_leaves(target: PyTree, arrays: dict[str, np.ndarray]) -> PyTree:
    """`target` with the leaves named in `arrays` replaced: cast to the target dtype, placed in its sharding."""

    def replace(key_path, like):
        value = arrays.get(path_name(key_path))
        if value is None:
            return like
        value = value.astype(like.dtype)
        sharding = getattr(like, "sharding", None)
        return value if sharding is None else jax.device_put(value, sharding)

    return jax.tree_util.tree_map_with_path(replace, target)


def warm_start(params: PyTree, config: ml_collections.ConfigDict) -> PyTree:
    """`params` with the arrays config.init (include/exclude/rename) selects from the run config.init_from
    replaced; unchanged when init_from is empty."""
    if not config.init_from:
        return params
    init = config.get("init") or ml_collections.ConfigDict(dict(include=(), exclude=(), rename=()))
    loaded = load_params(config.init_from, init.include, init.exclude, init.rename, target=params)
    logging.info("warm-started %d of %d parameter arrays from %s step %d", len(loaded.paths),
                 len(jax.tree.leaves(params)), absolute(config.init_from), loaded.step)
    return loaded.tree


def find_checkpoint(path: str, flag: str) -> tuple[epath.Path, int]:
    """(run directory, step) of `path`: a run's workdir (its latest checkpoint) or one <workdir>/checkpoints/<step>.

    `flag` names the command-line flag `path` came from, for the error messages.
    """
    path = absolute(path)
    if (path / "checkpoints").is_dir():
        checkpointer = Checkpointer(path, ml_collections.ConfigDict(dict(keep=None, keep_every=0, use_async=False)))
        latest = checkpointer.latest_step()
        checkpointer.close()
        if latest is None:
            raise FileNotFoundError(f"{flag}={path} holds no complete checkpoint to evaluate; train first")
        return path, latest
    if path.name.isdigit() and path.parent.name == "checkpoints" and path.is_dir():
        return path.parent.parent, int(path.name)
    raise FileNotFoundError(
        f"{flag}={path} is neither a run directory (holding checkpoints/) nor one of its checkpoints "
        "(<workdir>/checkpoints/<step>); pass one of those, or train first (--mode=train)"
    )
