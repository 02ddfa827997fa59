"""OT fusion of several models of one architecture (OTFusion, Singh & Jaggi, NeurIPS 2020).

Model 0 is the anchor. Every other model is aligned to it group by group: a cost
between the anchor's n neurons and the model's n neurons, an OT plan ``T`` (n, n)
with uniform marginals (rows: the anchor's neurons, columns: the model's), and
the map ``M = T / T.sum(1)`` (n, n), a permutation matrix with the exact solver.
``M`` replaces the group's entries along every member axis of the model (producer
rows, consumer columns, each segment at its offset, the BN arrays of producer
layers): neuron i of the aligned model is ``sum_j M[i, j]`` neuron j. One map per
group, so residual streams and segment groups stay consistent. The aligned
models are then averaged array by array.

Costs are Euclidean (``p=2``) between BN-folded producer weights (``mode="weights"``)
or between activations on data (``mode="activations"``). BatchNorms are folded
before averaging by default (``fold_bn``), see :func:`align_models`.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np

from ifjax import _transport
from ifjax._batchnorm import derived_bn, folded_flat, input_statistics, with_statistics
from ifjax._fuse import ConvergenceWarning, GroupPlan, _bias_members, _check_choice, _checked, edit_members
from ifjax._repair import mapped_statistics
from ifjax._spec import (
  AnyArray,
  FlatMember,
  Group,
  Member,
  Spec,
  Variables,
  flatten,
  member_rows,
  on_host,
  to_jax,
  unflatten,
)


class GroupAlignment(NamedTuple):
  """How one group of one model was aligned to the anchor. All fields are arrays (a pytree).

  Attributes:
    cost: (n, n) ground cost, rows the anchor's neurons, columns the model's.
    transport: (n, n) OT plan with marginals ~1/n, same orientation.
    map: (n, n) ``transport / transport.sum(1)``: aligned neuron i = ``sum_j map[i, j]`` neuron j.
    converged: () bool solver flag.
    marginal_error: () float, max marginal violation of ``transport``.
    iterations: () int, Sinkhorn iterations (0 for the exact solver).
    cost_before: () float, mean cost of pairing neuron i with neuron i (this group unaligned).
    cost_after: () float, ``sum(transport * cost)``, the mean cost after alignment.
  """

  cost: AnyArray
  transport: AnyArray
  map: AnyArray
  converged: AnyArray
  marginal_error: AnyArray
  iterations: AnyArray
  cost_before: AnyArray
  cost_after: AnyArray


class Alignment(NamedTuple):
  """Result of :func:`align_models`.

  Attributes:
    models: the k variables aligned to model 0 (model 0 as given, BN-folded with ``fold_bn``).
    maps: ``maps[i]`` = ``{group name: GroupAlignment}`` of model i; ``maps[0]`` is empty (the anchor stays).
    order: group names in the order they were aligned.
  """

  models: list[dict]
  maps: list[dict[str, GroupAlignment]]
  order: tuple[str, ...]


def fuse_models(variables_list: Sequence[Variables], spec: Spec, *,
                mode: Literal["weights", "activations"] = "weights", apply_fn: Callable[..., Any] | None = None,
                batches: Any = None, solver: Literal["exact", "sinkhorn"] = "exact",
                weights: Sequence[float] | None = None, unfold_bn: bool = False, **options) -> dict:
  """OTFusion: aligns every model to model 0 (:func:`align_models`), then averages them.

  Args:
    variables_list: k >= 2 Flax variables of the same architecture (same tree, same shapes); not modified.
    spec: the group spec, valid for all of them.
    mode: see :func:`align_models`.
    apply_fn: see :func:`align_models`.
    batches: see :func:`align_models`.
    solver: see :func:`align_models`.
    **options: the other keyword arguments of :func:`align_models`.
    weights: k non-negative numbers summing to 1 (default uniform): the weighted average of the aligned
      models' arrays, every collection (``batch_stats`` too), each in model 0's dtype.
    unfold_bn: with BN folding (the default), give the fused model's folded BNs estimated statistics, the
      weighted average of each aligned model's BN input statistics (:func:`ifjax.unfold_batchnorm` explains
      them): the same function in eval mode, and a training-mode BN that starts near it, for fine-tuning.

  Returns:
    New variables with the shapes of the inputs.
  """
  k = len(variables_list) if isinstance(variables_list, Sequence) else 0
  w = _weights(weights, k) if k >= 2 else None
  aligned = align_models(variables_list, spec, mode=mode, apply_fn=apply_fn, batches=batches, solver=solver,
                         **options)
  flats = [flatten(v) for v in aligned.models]
  w = cast(np.ndarray, w)  # align_models refused fewer than two models
  out = {}
  for path, a0 in flats[0].items():
    if not jnp.issubdtype(jnp.result_type(a0), jnp.floating):
      out[path] = a0  # integer / bool leaves (counters, masks) are not averaged: model 0's
      continue
    total = sum(wi * np.asarray(f[path], np.float64) for wi, f in zip(w, flats))
    out[path] = jnp.asarray(total, jnp.result_type(a0))
  if unfold_bn and options.get("fold_bn", True):
    groups = {g.name: g for g in spec.groups}
    stats = [mapped_statistics(input_statistics(v, spec), spec, _maps_plan([(groups[n], a.map) for n, a in m.items()]))
             for v, m in zip(variables_list, aligned.maps)]
    mean = {p: sum(wi * np.asarray(st[p], np.float64) for wi, st in zip(w, stats)) for p in stats[0]}
    out = to_jax(with_statistics(on_host(out), spec, mean))
  return unflatten(out)


def align_models(variables_list: Sequence[Variables], spec: Spec, *,
                 mode: Literal["weights", "activations"] = "weights", apply_fn: Callable[..., Any] | None = None,
                 batches: Any = None, solver: Literal["exact", "sinkhorn"] = "exact", p: float = 2.0,
                 include_bias: bool = True, fold_bn: bool = True, apply_kwargs: Mapping[str, Any] | None = None,
                 epsilon: float = 1e-3, threshold: float = 1e-3, max_iterations: int = 10000) -> Alignment:
  """Permutes (or, with Sinkhorn, softly mixes) the neurons of models 1..k-1 into model 0's order.

  Args:
    variables_list: k >= 2 Flax variables with identical trees and shapes; not modified.
    spec: the group spec. Costs are always computed on BN-folded weights / BN outputs.
    mode: ``"weights"``: the cost of a pair is the p-norm distance between their producer rows (the
      producer kernels' entries plus, with ``include_bias``, biases and folded BN shifts), OTFusion's
      weight-based ground metric. Groups are aligned one at a time, each after the maps of the groups
      feeding its producers have been applied, so the rows compare like with like. The order is
      network order where it can be (first the group whose producer entries are most aligned
      already); residual streams couple a stream to the blocks that read it, so for a group whose
      producers still read unaligned groups only the aligned entries are compared (e.g. a ResNet's
      stream is matched on its stem conv, a stage's first block on the stream channels it reads).
      ``"activations"``: the cost is the p-norm distance between the neurons' activations on
      ``batches`` (every producer layer's output, or its BN's output when ``spec.batchnorms`` pairs one
      with it, flattened over samples and positions and concatenated over producers and batches; a
      segment member reads its channels at its offset). Computed once, on the unaligned models.
    apply_fn: a Flax linen ``module.apply``, called as ``apply_fn(variables, x, capture_intermediates=True,
      mutable=["intermediates"], **apply_kwargs)``; activations mode only.
    batches: one input array or an iterable of them (no labels); activations mode only.
    solver: ``"exact"`` (POT's EMD: a permutation) or ``"sinkhorn"`` (OTT-JAX, soft maps; ``epsilon`` is
      relative to each group's largest cost; an unconverged group is re-solved exactly with a
      :class:`ConvergenceWarning`).
    p: norm of the ground cost (2: Euclidean, as in OTFusion).
    include_bias: put biases and folded BN shifts into the weight vectors (weights mode).
    fold_bn: True (default) folds every BN of ``spec.batchnorms`` first (:func:`ifjax.fold_batchnorm`), so
      what is averaged is each neuron's effective affine map, the same quantity the costs compare; the
      fused model's BNs are identities. False keeps the BNs and maps their scale, bias, mean and var with
      their layer, so the fused model averages BN parameters and statistics separately; choose it to
      re-estimate BN statistics or fine-tune with BN afterwards. On two and three digits CNNs (Conv-BN-ReLU,
      seeds apart) folding gave the better fused model without data in every case (+1.5 to +6 points
      of test accuracy); after a BN-statistics reset the two were within 3 points, neither ahead.
      Permuted copies fuse back exactly either way.
    apply_kwargs: extra keyword arguments for ``apply_fn`` (e.g. ``{"train": False}``).
    epsilon: Sinkhorn regularisation, relative to the largest cost.
    threshold: Sinkhorn convergence threshold.
    max_iterations: Sinkhorn iteration limit.
  """
  flats = _check_models(variables_list, spec)
  _check_choice("mode", mode, ("weights", "activations"))
  _check_choice("solver", solver, ("exact", "sinkhorn"))
  if mode == "activations" and (apply_fn is None or batches is None):
    raise ValueError("mode='activations' needs apply_fn= (e.g. module.apply) and batches= (input arrays)")
  sizes = spec.validate(variables_list[0])
  folded = [folded_flat(v, spec) for v in variables_list]
  solve = functools.partial(_solve, solver=solver, epsilon=epsilon, threshold=threshold, max_iterations=max_iterations)
  if mode == "weights":
    order = _weight_order(folded[0], spec, sizes)
    maps = [{}] + [_align_by_weights(folded[0], f, spec, sizes, order, p, include_bias, solve) for f in folded[1:]]
    names = tuple(g.name for g, _ in order)
  else:
    acts = [_activations(apply_fn, v, batches, spec, sizes, dict(apply_kwargs or {})) for v in variables_list]
    names = tuple(spec.names)
    maps = [{}] + [solve(names, [_cost(acts[0][g], a[g], p) for g in names]) for a in acts[1:]]
  base = folded if fold_bn else flats
  groups = {g.name: g for g in spec.groups}
  models = [unflatten(_apply_maps(f, spec, [(groups[n], a.map) for n, a in m.items()])) for f, m in zip(base, maps)]
  return Alignment(models, maps, names)


# -- weights mode ----------------------------------------------------------------------
def _weight_order(flat, spec: Spec, sizes: dict[str, int]) -> list[tuple[Group, list[tuple[Member, np.ndarray]]]]:
  """Groups in alignment order, each with its producer kernels and a mask of their entries (per neuron,
  raveled in ``member_rows`` order) that lie on axes already aligned (or on no group's axis)."""
  owners: dict[tuple[str, int], list[tuple[str, Member | FlatMember]]] = {}
  for g in spec.groups:
    for m in g.members:
      owners.setdefault((m.path, m.axis % np.ndim(flat[m.path])), []).append((g.name, m))

  def known(path: str, axis: int, done: set[str]) -> np.ndarray:
    length = np.shape(flat[path])[axis]
    mask = np.ones(length, bool)
    for name, m in owners.get((path, axis), ()):
      if name not in done:
        mask[np.arange(length).reshape(m.outer, -1, m.inner)[:, m.offset:m.offset + sizes[name]].ravel()] = False
    return mask

  def masks(g: Group, done: set[str]) -> list[tuple[Member, np.ndarray]]:
    out = []
    for m in g.producers:
      nd = np.ndim(flat[m.path])
      if nd >= 2:
        parts = [np.ones(m.outer * m.inner, bool)] + [known(m.path, a, done) for a in range(nd) if a != m.axis % nd]
        out.append((m, functools.reduce(np.logical_and.outer, parts).ravel()))
    return out

  def aligned_fraction(ms) -> float:
    return sum(int(mk.sum()) for _, mk in ms) / max(1, sum(mk.size for _, mk in ms))

  order, done, todo = [], set(), list(spec.groups)
  while todo:
    g, ms = max(((g, masks(g, done)) for g in todo), key=lambda gm: aligned_fraction(gm[1]))  # ties: network order
    order.append((g, ms))
    done.add(g.name)
    todo.remove(g)
  return order


def _align_by_weights(anchor, flat, spec: Spec, sizes, order, p: float, include_bias: bool, solve) -> dict:
  out = {}
  for g, masks in order:
    n = sizes[g.name]

    def vectors(f, g=g, n=n, masks=masks):
      rows = [member_rows(f, m, n)[:, mk] for m, mk in masks]
      rows += [member_rows(f, m, n) for m in _bias_members(f, spec, g)] if include_bias else []
      return jnp.concatenate(rows, axis=1) if rows else jnp.zeros((n, 0))

    out.update(solve([g.name], [_cost(vectors(anchor), vectors(flat), p)]))
    flat = _apply_maps(flat, spec, [(g, out[g.name].map)])
  return out


# -- activations mode ----------------------------------------------------------------------
def _activations(apply_fn, variables, batches, spec: Spec, sizes, kwargs) -> dict[str, jax.Array]:
  """``{group: (n, d)}``: per neuron, its producers' outputs (BN outputs where paired) on all batches."""
  batches = [batches] if hasattr(batches, "shape") else list(batches)
  if not batches:
    raise ValueError("mode='activations' needs at least one batch in batches=")
  bn_of = {b.layer: b.bn for b in spec.batchnorms}
  rows: dict[str, list[jax.Array]] = {g.name: [] for g in spec.groups}
  for x in batches:
    _, state = apply_fn(variables, x, capture_intermediates=True, mutable=["intermediates"], **kwargs)
    inter = flatten(state["intermediates"])
    for g in spec.groups:
      n = sizes[g.name]
      for m in g.producers:
        if m.path.startswith("params/") and m.path.endswith("/kernel"):
          layer = m.path[len("params/"):-len("/kernel")]
          key = f"{bn_of.get(layer, layer)}/__call__"
          if key not in inter:
            raise ValueError(f"group {g.name!r}: apply_fn captured no output of module {key[:-9]!r} (is it a "
                             "Flax linen module.apply?)")
          out = jnp.asarray(inter[key][0], jnp.float32)[..., m.offset:m.offset + n]
          rows[g.name].append(jnp.moveaxis(out, -1, 0).reshape(n, -1))
  for name, r in rows.items():
    if not r:
      raise ValueError(f"group {name!r} has no producer kernel ('params/<layer>/kernel') whose output to read")
  return {name: jnp.concatenate(r, axis=1) for name, r in rows.items()}


# -- shared --------------------------------------------------------------------------------
def _cost(x_anchor: jax.Array, x_model: jax.Array, p: float):
  return _transport.pairwise_distance(x_anchor, x_model, p=float(p))


def _solve(names: Sequence[str], costs: Sequence[AnyArray], *, solver, epsilon, threshold,
           max_iterations) -> dict[str, GroupAlignment]:
  """Uniform-marginal OT per (n, n) cost; ``{group name: GroupAlignment}``."""
  problems = [(c, jnp.full((c.shape[0],), 1.0 / c.shape[0]), jnp.full((c.shape[1],), 1.0 / c.shape[1])) for c in costs]
  if solver == "exact":
    solved = [_transport.solve_exact(*pr) for pr in problems]
  else:
    solved = _transport.solve_sinkhorn(problems, epsilon=epsilon, threshold=threshold, max_iterations=max_iterations)
  out = {}
  for name, pr, t in zip(names, problems, solved):
    if not bool(t.converged) or not bool(jnp.all(jnp.isfinite(t.matrix))):
      if solver == "exact":
        raise RuntimeError(f"group {name!r}: exact OT failed (marginal error {float(t.marginal_error):.2e})")
      warnings.warn(f"group {name!r}: Sinkhorn did not converge (marginal error {float(t.marginal_error):.2e} after "
                    f"{int(t.iterations)} iterations); re-solving exactly", ConvergenceWarning, stacklevel=4)
      t = _transport.solve_exact(*pr)
    rows = jnp.sum(t.matrix, axis=1, keepdims=True)
    cost = pr[0]
    out[name] = GroupAlignment(cost, t.matrix, t.matrix / jnp.where(rows > 0, rows, 1.0), t.converged,
                               t.marginal_error, t.iterations, jnp.mean(jnp.diagonal(cost)), jnp.sum(t.matrix * cost))
  return out


def _maps_plan(group_maps: Iterable[tuple[Group, AnyArray]]) -> dict[str, GroupPlan]:
  """A plan whose (n, n) ``map`` per group is both its producer and its consumer map."""
  return {g.name: GroupPlan(None, jnp.zeros(mat.shape[0]), None, mat, mat, jnp.asarray(True), jnp.asarray(0.0),
                            jnp.asarray(0)) for g, mat in group_maps}


def _apply_maps(flat: Mapping[str, Any], spec: Spec, group_maps: Iterable[tuple[Group, jax.Array]]) -> dict:
  """``flat`` with every member of each group (and the BN arrays of its producer layers) mapped: the group's
  n entries along the member axis become ``map @ entries``. The segment-edit loop of :func:`ifjax.apply_plan`
  (``edit_members``), with (n, n) maps on both sides."""

  def roles(g: Group):
    return [(m, "producer") for m in (*g.members, *(m for m, _ in derived_bn(spec, g) if m.path in flat))]

  return edit_members(flat, spec, _maps_plan(group_maps), roles)


# -- input checks ----------------------------------------------------------------------------
def _check_models(variables_list, spec: Spec) -> list[dict[str, Any]]:
  """Flattened models after checking there are >= 2 with one tree and one set of shapes."""
  if not isinstance(variables_list, Sequence) or isinstance(variables_list, (str, Mapping)) or len(variables_list) < 2:
    got = f"{len(variables_list)} model(s)" if isinstance(variables_list, Sequence) else type(variables_list).__name__
    raise ValueError(f"model fusion needs a list of at least 2 variables dicts, got {got}")
  for i, v in enumerate(variables_list):
    if not isinstance(v, Mapping) or "params" not in v:
      raise ValueError(f"model {i} is not a Flax variables dict with a 'params' collection")
  flats = [flatten(v) for v in variables_list]
  for i, f in enumerate(flats[1:], start=1):
    for path in list(flats[0]) + [q for q in f if q not in flats[0]]:
      s0 = f"shape {np.shape(flats[0][path])}" if path in flats[0] else "no such array"
      si = f"shape {np.shape(f[path])}" if path in f else "no such array"
      if s0 != si:
        raise ValueError(f"models 0 and {i} differ at {path!r}: {s0} vs {si}; fusion needs one architecture")
  for v in variables_list:
    _checked(v, spec)
  return flats


def _weights(weights, k: int) -> np.ndarray:
  if weights is None:
    return np.full(k, 1.0 / k)
  try:
    raw = np.asarray(weights)
  except (TypeError, ValueError):  # ragged nestings
    raw = np.asarray(None)
  if raw.dtype.kind not in "iuf":
    raise TypeError(f"fuse_models: weights must be {k} numbers, one per model, got {type(weights).__name__} "
                    f"{weights!r:.80}")
  w = raw.astype(np.float64)
  if w.shape != (k,):
    raise ValueError(f"fuse_models: weights must be {k} numbers, one per model, got shape {w.shape}")
  if not np.all(np.isfinite(w)) or np.any(w < 0):
    raise ValueError(f"fuse_models: weights must be finite and non-negative, got {w.tolist()}")
  if abs(w.sum() - 1.0) > 1e-6:
    raise ValueError(f"fuse_models: weights must sum to 1, got {w.tolist()} (sum {w.sum():.6g})")
  return w
