"""AdamW with linear warmup + cosine decay, global-norm clipping, and no decay on norms, biases or temperature.

Parameter groups (`config.train.param_groups`) freeze parameters or give them their own learning-rate multiplier
and weight decay, chosen by a regex on the parameter's '/'-joined path (e.g. "towers/image_tower/.*"). Without
groups the optimizer is exactly the plain chain below, so its numbers and its state layout do not change.
"""

import dataclasses
import json
import re

import jax
import ml_collections
import optax
from absl import logging

from vlp_jax.checkpoint import path_name

UNGROUPED = "ungrouped"  # the group of the parameters no configured pattern matches: the global settings
GROUP_KEYS = ("pattern", "frozen", "lr_multiplier", "weight_decay")


def learning_rate_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then cosine decay to `end_learning_rate_ratio` × peak at the last step."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=train.learning_rate,
        warmup_steps=train.warmup_steps,
        decay_steps=max(train.steps, train.warmup_steps + 1),
        end_value=train.learning_rate * train.end_learning_rate_ratio,
    )


def decay_mask(params):
    """Weight decay only on matrices and embeddings (ndim >= 2); not on norms, biases or the temperature."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


@dataclasses.dataclass(frozen=True)
class ParamGroup:
    """One entry of config.train.param_groups, its weight decay resolved (-1 = the global one)."""

    name: str
    pattern: re.Pattern
    frozen: bool
    lr_multiplier: float
    weight_decay: float

    def describe(self) -> str:
        if self.frozen:
            return "frozen"
        return f"lr×{self.lr_multiplier:g}, weight decay {self.weight_decay:g}"


def param_groups(train: ml_collections.ConfigDict) -> list[ParamGroup]:
    """The groups of config.train.param_groups in insertion order, checked; a bad entry is a ValueError."""
    specs = train.get("param_groups") or {}
    if isinstance(specs, ml_collections.ConfigDict):
        specs = json.loads(specs.to_json())  # ConfigDict.items() sorts the names; its JSON keeps the written order
    groups = []
    for name, spec in specs.items():
        where = f"config.train.param_groups.{name}"
        if name == UNGROUPED:
            raise ValueError(f"{where}: the name {UNGROUPED!r} is reserved for the parameters no group matches")
        if not isinstance(spec, dict) or set(spec) - set(GROUP_KEYS) or "pattern" not in spec:
            raise ValueError(f"{where}: takes a dict of {', '.join(GROUP_KEYS)} (pattern required); got {spec!r}")
        try:
            pattern = re.compile(spec["pattern"])
        except re.error as error:
            raise ValueError(f"{where}.pattern={spec['pattern']!r} is not a valid regex: {error}") from None
        weight_decay = spec.get("weight_decay", -1.0)
        groups.append(ParamGroup(
            name=name,
            pattern=pattern,
            frozen=bool(spec.get("frozen", False)),
            lr_multiplier=float(spec.get("lr_multiplier", 1.0)),
            weight_decay=float(train.weight_decay if weight_decay == -1 else weight_decay),
        ))
    return groups


def group_labels(groups: list[ParamGroup], params):
    """A tree like `params` holding, per leaf, the name of the first group whose pattern fullmatches its path
    (the last group, UNGROUPED, matches every path)."""

    def label(key_path, _):
        path = path_name(key_path)
        return next(group.name for group in groups if group.pattern.fullmatch(path))

    return jax.tree_util.tree_map_with_path(label, params)


def check_groups(groups: list[ParamGroup], params) -> list[str]:
    """Refuses a group that owns no parameter (a typo in its pattern); returns one line per group to log."""
    labels = jax.tree.leaves(group_labels(groups, params))
    paths = [path_name(key_path) for key_path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    lines = []
    for group in groups:
        count = labels.count(group.name)
        if count == 0 and group.name != UNGROUPED:
            shadowed = any(map(group.pattern.fullmatch, paths))
            raise ValueError(
                f"config.train.param_groups.{group.name}.pattern={group.pattern.pattern!r} matches no parameter"
                + (" that an earlier group does not already own" if shadowed else "")
                + f"; patterns fullmatch '/'-joined paths such as {', '.join(paths[:3])}"
            )
        if count:
            lines.append(f"parameter group {group.name}: {count} parameter arrays, {group.describe()}")
    return lines


def adamw(train: ml_collections.ConfigDict, learning_rate: optax.ScalarOrSchedule,
          weight_decay: float) -> optax.GradientTransformation:
    return optax.adamw(
        learning_rate, b1=train.b1, b2=train.b2, eps=train.eps, weight_decay=weight_decay, mask=decay_mask
    )


def scaled(schedule: optax.Schedule, multiplier: float) -> optax.Schedule:
    return schedule if multiplier == 1.0 else lambda count: schedule(count) * multiplier


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW; per parameter group: frozen, or its own lr multiplier and weight decay.

    Frozen parameters get a zero update and no optimizer state (no Adam moments), and their gradients are left
    out of the global norm, as if they were not parameters.
    """
    schedule = learning_rate_schedule(train)
    groups = param_groups(train)
    if not groups:
        return optax.chain(optax.clip_by_global_norm(train.grad_clip_norm), adamw(train, schedule, train.weight_decay))
    groups.append(ParamGroup(UNGROUPED, re.compile(".*"), False, 1.0, train.weight_decay))

    def labels(params):
        return group_labels(groups, params)

    def frozen_mask(params):
        frozen = {group.name for group in groups if group.frozen}
        return jax.tree.map(lambda label: label in frozen, labels(params))

    transforms = {
        group.name: optax.set_to_zero() if group.frozen else adamw(
            train, scaled(schedule, group.lr_multiplier), group.weight_decay)
        for group in groups
    }
    freeze = [optax.masked(optax.set_to_zero(), frozen_mask)] if any(group.frozen for group in groups) else []
    tx = optax.chain(*freeze, optax.clip_by_global_norm(train.grad_clip_norm), optax.partition(transforms, labels))

    logged = []  # the group lines are logged at the first initialisation only

    def init(params):
        if jax.tree.leaves(params):  # optax.tree_map_params initialises with a leafless placeholder
            lines = check_groups(groups, params)
            if not logged:
                logged.extend(lines)
                for line in lines:
                    logging.info(line)
        return tx.init(params)

    return optax.GradientTransformationExtraArgs(init, tx.update)
