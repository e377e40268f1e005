"""Which parameters a stage trains, and how: regex rules -> groups, AdamW with warmup + cosine per group.

A stage lists `trainable` rules `[(regex over '/'-joined parameter paths, group)]`, first match wins; the group
`frozen` means not trained. Every parameter must match some rule (an unmatched one is an error naming it), so a new
module can never be silently frozen or trained. Frozen parameters are split off before differentiation: they get no
gradient computation and no optimizer state, and stay bit-identical.
"""
from __future__ import annotations

import re
from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from uhd_jax.cli_errors import UserError

FROZEN = "frozen"


def path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def group_labels(params, rules: Sequence[Sequence[str]]) -> dict:
    """A tree like `params` whose leaves are group names; raises listing every parameter no rule matches."""
    compiled = [(re.compile(pattern), group) for pattern, group in rules]
    unmatched = []

    def label(path, _):
        name = path_str(path)
        for pattern, group in compiled:
            if pattern.fullmatch(name):
                return group
        unmatched.append(name)
        return FROZEN

    labels = jax.tree_util.tree_map_with_path(label, params)
    if unmatched:
        raise ValueError(f"{len(unmatched)} parameters match no trainable rule (add a rule, e.g. ('.*', 'frozen')): "
                         f"{unmatched[:10]}{' ...' if len(unmatched) > 10 else ''}")
    return labels


def check_rules(params, rules: Sequence[Sequence[str]], lrs: Mapping[str, float], where: str = "stage") -> None:
    """Refuse, before anything compiles, `trainable` rules and learning rates that would train nothing: a rule no
    parameter falls to (its regex matches nothing, or only what earlier rules already took), a learning rate for a
    group no parameter is in, a parameter no rule matches, a trained group without a rate. A misspelt rule otherwise
    runs the whole stage with a gradient norm of 0. `params` may be abstract (`jax.eval_shape`)."""
    names = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    compiled = []
    for i, (pattern, _) in enumerate(rules):
        try:
            compiled.append(re.compile(pattern))
        except re.error as e:
            raise UserError(f"{where}.trainable[{i}] {pattern!r} is not a valid regex: {e}") from None
    claimed, matched, unmatched = [0] * len(rules), [0] * len(rules), []
    for name in names:
        hits = [i for i, c in enumerate(compiled) if c.fullmatch(name)]
        for i in hits:
            matched[i] += 1
        if hits:
            claimed[hits[0]] += 1
        else:
            unmatched.append(name)
    problems = []
    for i, (pattern, group) in enumerate(rules):
        if not claimed[i]:
            why = (f"matches {matched[i]} parameter(s), all taken by earlier rules (first match wins)" if matched[i]
                   else "matches no parameter")
            problems.append(f"{where}.trainable[{i}] ({pattern!r}, {group!r}) {why}")
    groups = {group for (_, group), n in zip(rules, claimed) if n and group != FROZEN}
    for group in sorted(set(lrs) - groups):
        problems.append(f"{where}.lrs.{group} is the rate of a group no parameter is in")
    for group in sorted(groups - set(lrs)):
        problems.append(f"group {group!r} trains but has no rate: set {where}.lrs.{group}")
    if unmatched:
        problems.append(f"{len(unmatched)} parameter(s) match no rule, e.g. {unmatched[:3]}: add a rule (('.*', "
                        f"'frozen') last freezes the rest)")
    if problems:
        tops = sorted({n.split("/")[0] + "/" for n in names})
        raise UserError("; ".join(problems) + f". Rules are regexes over the whole parameter path (fullmatch), "
                        f"paths start with {', '.join(tops)} (e.g. {names[0]!r})")


def trainable_labels(labels):
    return jax.tree_util.tree_map(lambda g: None if g == FROZEN else g, labels)


def split_trainable(params, labels):
    """(trainable, frozen): two trees shaped like `params` with None where the other one holds the leaf."""
    trainable = jax.tree_util.tree_map(lambda p, g: None if g == FROZEN else p, params, labels)
    frozen = jax.tree_util.tree_map(lambda p, g: p if g == FROZEN else None, params, labels)
    return trainable, frozen


def merge(trainable, frozen):
    return jax.tree_util.tree_map(lambda t, f: f if t is None else t, trainable, frozen,
                                  is_leaf=lambda x: x is None)


def schedule(lr: float, total_steps: int, warmup_ratio: float, kind: str = "cosine"):
    warmup = int(round(total_steps * warmup_ratio))
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 0), max(total_steps, warmup + 1), 0.0)
    if kind == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)],
                                    [max(warmup, 1)])
    raise ValueError(f"unknown schedule {kind!r} (cosine, constant)")


def _decay_mask(params):
    """Weight decay on matrices only, not on biases or norm scales (the originals' rule)."""
    return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


def keep_rows(row_masks: Mapping[str, jax.Array]) -> optax.GradientTransformation:
    """Zero the gradient (or update) rows of the named parameters outside their mask: {path: (rows,) bool}. Rows of
    a table the stage does not train stay bit-identical while others learn (LLaVAR's stage 1: only the new image
    tokens' embedding rows)."""

    def update(updates, state, params=None):
        del params

        def mask(path, u):
            m = row_masks.get(path_str(path))
            return u if m is None else u * jnp.asarray(m, u.dtype).reshape((-1,) + (1,) * (u.ndim - 1))

        return jax.tree_util.tree_map_with_path(mask, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(trainable_labels, lrs: Mapping[str, float], total_steps: int, *, warmup_ratio: float = 0.03,
                   weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   grad_clip_norm: float | None = None, schedule_kind: str = "cosine",
                   row_masks: Mapping[str, jax.Array] | None = None):
    """An optax transform over the trainable tree (frozen leaves are None and carry no state). `row_masks`: see
    `keep_rows` (masked before clipping, so the norm counts only trained rows, and after the update, so weight
    decay cannot move the others)."""
    groups = sorted({g for g in jax.tree_util.tree_leaves(trainable_labels) if g != FROZEN})
    missing = [g for g in groups if g not in lrs]
    if missing:
        raise ValueError(f"no learning rate for group(s) {missing}; set stage.lrs.<group>")
    transforms = {
        g: optax.adamw(schedule(lrs[g], total_steps, warmup_ratio, schedule_kind), b1=b1, b2=b2, eps=eps,
                       weight_decay=weight_decay, mask=_decay_mask)
        for g in groups}
    tx = optax.multi_transform(transforms, trainable_labels)
    if grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(grad_clip_norm), tx)
    if row_masks:
        tx = optax.chain(keep_rows(row_masks), tx, keep_rows(row_masks))
    return tx, {g: schedule(lrs[g], total_steps, warmup_ratio, schedule_kind) for g in groups}


class NAdamState(NamedTuple):
    count: jax.Array
    mu_product: jax.Array
    m: optax.Updates
    v: optax.Updates


def torch_nadam(lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                momentum_decay: float = 4e-3) -> optax.GradientTransformation:
    """`torch.optim.NAdam` (no weight decay): Dozat's Nesterov Adam with torch's momentum schedule
    mu_t = b1 (1 - 0.5 * 0.96^(t * psi)) and its running product. `optax.nadam` has no schedule, so FeatUp's
    recipe (NAdam 1e-3) would not be the same optimiser."""

    def init(params):
        zeros = lambda: jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params)  # noqa: E731
        return NAdamState(jnp.zeros((), jnp.int32), jnp.ones((), jnp.float32), zeros(), zeros())

    def update(grads, state, params=None):
        del params
        t = (state.count + 1).astype(jnp.float32)
        mu = b1 * (1.0 - 0.5 * 0.96 ** (t * momentum_decay))
        mu_next = b1 * (1.0 - 0.5 * 0.96 ** ((t + 1.0) * momentum_decay))
        mu_product = state.mu_product * mu
        m = jax.tree_util.tree_map(lambda m, g: b1 * m + (1.0 - b1) * g, state.m, grads)
        v = jax.tree_util.tree_map(lambda v, g: b2 * v + (1.0 - b2) * g * g, state.v, grads)
        bias2 = 1.0 - b2 ** t

        def step(g, m, v):
            denom = jnp.sqrt(v / bias2) + eps
            return -lr * ((1.0 - mu) / (1.0 - mu_product) * g / denom
                          + mu_next / (1.0 - mu_product * mu_next) * m / denom)

        updates = jax.tree_util.tree_map(step, grads, m, v)
        return updates, NAdamState(state.count + 1, mu_product, m, v)

    return optax.GradientTransformation(init, update)


def clip_first_steps(max_norm: float, steps: int) -> optax.GradientTransformation:
    """Clip the global gradient norm to `max_norm` during the first `steps` updates only (torch's
    `clip_grad_norm_` factor max_norm / (norm + 1e-6), at most 1), as FeatUp's warm start does."""

    def init(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        del params
        norm = optax.global_norm(updates)
        factor = jnp.where(state.count < steps, jnp.minimum(1.0, max_norm / (norm + 1e-6)), 1.0)
        return (jax.tree_util.tree_map(lambda g: g * factor, updates),
                optax.ScaleByScheduleState(count=state.count + 1))

    return optax.GradientTransformation(init, update)
