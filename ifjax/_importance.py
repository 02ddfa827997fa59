"""Neuron importance for a group: one non-negative score per neuron, shape (n,).

An importance is a callable ``fn(variables, group) -> (n,)`` evaluated on the
BatchNorm-folded variables (as in the authors' code). The built-ins reduce a
per-member score over the group's weight members (producer rows and consumer
columns, not biases) with a mean and divide by the mean, as Torch-Pruning's
``group_reduction="mean", normalizer="mean"`` does.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ifjax._spec import (
  AnyArray,
  FlatMember,
  Group,
  Member,
  Variables,
  array_module,
  flatten,
  member_rows,
  weight_members,
)

Importance = Callable[[Variables, Group], AnyArray]


def group_size(flat: Mapping[str, Any], group: Group) -> int:
  """The group's neuron count: ``group.size`` if set (``plan`` always sets it), else its first producer's axis."""
  if group.size is not None:
    return group.size
  m = group.producers[0]
  return np.shape(flat[m.path])[m.axis] // (m.outer * m.inner) - m.offset


def _reduce(flat, group, per_member: Callable[[AnyArray, Member | FlatMember], AnyArray]) -> AnyArray:
  n = group_size(flat, group)
  rows = [member_rows(flat, m, n) for m in weight_members(flat, group)]
  xp = array_module(*rows)
  scores = xp.stack([per_member(r, m) for r, m in zip(rows, weight_members(flat, group))])
  s = xp.mean(scores, axis=0)
  mean = xp.mean(s)
  return s / xp.where(mean > 0, mean, xp.float32(1.0))


def magnitude(p: float) -> Importance:
  """``sum |w|^p`` per neuron (p = inf: ``max |w|``), as Torch-Pruning's ``MagnitudeImportance(p)``."""

  def fn(variables: Variables, group: Group) -> AnyArray:
    if np.isinf(p):
      return _reduce(flatten(variables), group, lambda r, _: array_module(r).max(abs(r), axis=1))
    if p == 1:
      return _reduce(flatten(variables), group, lambda r, _: array_module(r).sum(abs(r), axis=1))
    return _reduce(flatten(variables), group, lambda r, _: array_module(r).sum(abs(r) ** p, axis=1))

  return fn


def lamp(variables: Variables, group: Group) -> AnyArray:
  """LAMP (Lee et al. 2021) on squared L2 channel norms: ``s_i / sum_{j: s_j >= s_i} s_j``."""
  s = magnitude(2)(variables, group)
  xp = array_module(s)
  order = xp.argsort(-s, stable=True)
  ranked = s[order]
  lamp_sorted = ranked / xp.maximum(xp.cumsum(ranked), xp.finfo(xp.float32).tiny)
  if xp is np:
    out = np.zeros_like(s)
    out[order] = lamp_sorted
    return out
  return jnp.zeros_like(s).at[order].set(lamp_sorted)


def random(seed: int | jax.Array = 0) -> Importance:
  """Uniform random scores in (0, 1], drawn per group from ``seed`` and the group name."""
  key = jax.random.key(seed) if isinstance(seed, (int, np.integer)) else seed

  def fn(variables: Variables, group: Group) -> AnyArray:
    n = group_size(flatten(variables), group)
    k = jax.random.fold_in(key, zlib.crc32(group.name.encode()))
    return 1.0 - jax.random.uniform(k, (n,))

  return fn


def taylor(grads: Variables | None = None, *, loss_fn: Callable[..., jax.Array] | None = None,
           batches: tuple = ()) -> Importance:
  """First-order Taylor ``sum |w * dL/dw|`` per neuron.

  Either pass ``grads`` (a pytree shaped like the variables, or like
  ``variables["params"]``, taken at the BN-folded weights), or ``loss_fn`` and
  ``batches``: gradients of ``loss_fn(variables, batch)`` w.r.t. ``params`` are then
  summed over the batches at the variables the importance is evaluated on.
  """
  if (grads is None) == (loss_fn is None):
    raise ValueError("taylor importance needs exactly one of grads= or loss_fn= (with batches=)")
  if loss_fn is not None and not batches:
    raise ValueError("taylor(loss_fn=...) needs at least one batch in batches=")
  cache: list = []  # [(variables object, flat grads)]: gradients of the variables last seen

  def flat_grads(variables):
    if grads is not None:
      g = grads if "params" in grads else {"params": grads}
      return flatten(g)
    if not cache or cache[0][0] is not variables:
      params = variables["params"]
      rest = {k: v for k, v in variables.items() if k != "params"}
      loss = loss_fn
      assert loss is not None  # (grads is None)
      grad_fn = jax.jit(jax.grad(lambda p, b: loss({"params": p, **rest}, b)))
      total = None
      for b in batches:
        g = grad_fn(params, b)
        total = g if total is None else jax.tree.map(jnp.add, total, g)
      cache[:] = [(variables, flatten({"params": total}))]
    return cache[0][1]

  def fn(variables: Variables, group: Group) -> AnyArray:
    flat = flatten(variables)
    g = flat_grads(variables)
    missing = [m.path for m in weight_members(flat, group) if m.path not in g]
    if missing:
      raise ValueError(f"taylor importance: no gradient for {missing}")
    prod = {m.path: jnp.asarray(flat[m.path], jnp.float32) * jnp.asarray(g[m.path], jnp.float32)
            for m in weight_members(flat, group)}
    return _reduce({**flat, **prod}, group, lambda r, _: jnp.sum(jnp.abs(r), axis=1))

  return fn


def chip(feature_maps: Mapping[str, jax.Array | list[jax.Array]]) -> Importance:
  """CHIP channel independence (Sui et al. 2021) from feature maps of a batch.

  ``feature_maps[group_name]`` is one array (batch, ..., n) of the group's producer
  output, or a list of them (one per producer; scores are averaged). A channel's
  score is the drop of the nuclear norm of the (n, spatial) matrix when that
  channel's row is zeroed, averaged over the batch.
  """

  def score(fm):
    fm = jnp.asarray(fm, jnp.float32)
    b, n = fm.shape[0], fm.shape[-1]
    a = jnp.moveaxis(fm.reshape(b, -1, n), -1, 1)  # (batch, n, spatial)
    nuc = lambda x: jnp.sum(jnp.linalg.svd(x, compute_uv=False), -1)
    masks = 1.0 - jnp.eye(n)[:, :, None]  # (n channels, n, 1)
    full = nuc(a)  # (batch,)
    zeroed = jax.lax.map(lambda mk: nuc(a * mk[None]), masks)  # (n, batch)
    return jnp.mean(full[None] - zeroed, axis=1)

  def fn(variables: Variables, group: Group) -> AnyArray:
    if group.name not in feature_maps:
      raise ValueError(f"chip importance: no feature maps for group {group.name!r}")
    fms = feature_maps[group.name]
    fms = fms if isinstance(fms, (list, tuple)) else [fms]
    return jnp.mean(jnp.stack([score(f) for f in fms]), axis=0)

  return fn


def feature_maps(module, variables: Variables, x: jax.Array, spec, **apply_kwargs) -> dict[str, list[jax.Array]]:
  """Outputs of every group's producer layers on batch ``x``: ``{group: [(batch, ..., n), ...]}``.

  Uses Flax's ``capture_intermediates``; a producer ``params/<layer>/kernel`` is
  read from the intermediates of module path ``<layer>``.
  """
  _, state = module.apply(variables, x, capture_intermediates=True, mutable=["intermediates"], **apply_kwargs)
  inter = flatten(state["intermediates"])
  out = {}
  for g in spec.groups:
    maps = []
    for m in g.producers:
      if m.path.startswith("params/") and m.path.endswith("/kernel"):
        key = m.path[len("params/"):-len("/kernel")] + "/__call__"
        if key not in inter:
          raise ValueError(f"feature_maps: no intermediate output captured for {key!r}")
        maps.append(inter[key][0])
    out[g.name] = maps
  return out


BUILTIN: dict[str, Callable[[], Importance]] = {
    "l1": lambda: magnitude(1),
    "l2": lambda: magnitude(2),
    "linf": lambda: magnitude(np.inf),
    "lamp": lambda: lamp,
    "random": lambda: random(0),
}


def resolve(importance: str | Importance | Mapping[str, Any]) -> Importance:
  """A name, a callable, or precomputed ``{group_name: (n,) scores}`` -> callable."""
  if isinstance(importance, str):
    if importance not in BUILTIN:
      extra = " (taylor and chip need data: use ifjax.importance.taylor(...) / chip(...))" if importance in (
          "taylor", "chip") else ""
      raise ValueError(f"unknown importance {importance!r}; built-ins are {sorted(BUILTIN)}{extra}")
    return BUILTIN[importance]()
  if isinstance(importance, Mapping):
    scores = dict(importance)

    def precomputed(variables: Variables, group: Group) -> AnyArray:
      if group.name not in scores:
        raise ValueError(f"precomputed importance has no scores for group {group.name!r} (has {sorted(scores)})")
      return jnp.asarray(scores[group.name], jnp.float32)

    return precomputed
  if callable(importance):
    return importance
  raise ValueError(f"importance must be a name, a callable or a dict of scores, got {type(importance).__name__}")

