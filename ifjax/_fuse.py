"""Intra-Fusion: plan the per-group OT maps, then apply them to the variables.

For a group of n neurons keeping m = floor(n * (1 - ratio)):

* ``T`` (n, m) is the OT plan from all n neurons (source) to the m targets.
* ``consumer_map`` (m, n) = ``T.T / T.sum(1)``: each source neuron's mass is fully
  redistributed (columns sum to 1), so a fused consumer column is a *sum*.
* ``producer_map`` (m, n): with ``normalization="paper"`` the same matrix as the
  consumer map (the authors' code: fused producers are sums, total weight ~n/m);
  with ``"barycentric"`` it is ``T.T / T.sum(0)`` (rows sum to 1), so a fused
  producer is a weighted *average* of its sources, which keeps the next layer's
  input unchanged when the merged neurons are duplicates.

A producer axis becomes ``producer_map @ W`` along its neuron axis, a consumer
axis ``consumer_map @ W``; plain pruning selects ``W[keep]`` on both.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, NamedTuple, cast

import jax
import jax.core
import jax.numpy as jnp
import numpy as np

from ifjax import _importance, _merging, _transport
from ifjax._batchnorm import derived_bn, folded_flat, input_statistics
from ifjax._errors import ArgumentTypeError, IfjaxError
from ifjax._scalars import ScalarTypeError, python_scalar
from ifjax._spec import (
  AnyArray,
  FlatMember,
  Group,
  Member,
  Spec,
  Variables,
  array_module,
  flatten,
  is_traced,
  member_rows,
  on_host,
  resized_spec,
  to_jax,
  unflatten,
  weight_members,
)


class GroupPlan(NamedTuple):
  """What happens to one group. All fields are arrays (or None), so a plan is a pytree: NumPy arrays from
  a call on concrete inputs (the host path), jax arrays (tracers) under ``jit``.

  Attributes:
    keep: (m,) int32 indices of the kept neurons, ascending; None for the
      ``cluster_centroid`` target, whose targets are not neurons.
    importance: (n,) importance scores used for ranking and masses.
    transport: (n, m) OT plan; None for plain pruning.
    producer_map: (m, n) map applied to producer axes; None for plain pruning.
    consumer_map: (m, n) map applied to consumer axes; None for plain pruning.
    converged: () bool solver flag (True for plain pruning).
    marginal_error: () float, max marginal violation of ``transport``.
    iterations: () int, Sinkhorn iterations (0 for exact / pruning).
    producer_shift: (m,) constants added to the fused pre-activations (the data-free statistics repair,
      ``repair="statistics"``), or None: nothing added.
  """

  keep: AnyArray | None
  importance: AnyArray
  transport: AnyArray | None
  producer_map: AnyArray | None
  consumer_map: AnyArray | None
  converged: AnyArray | np.generic
  marginal_error: AnyArray | np.generic
  iterations: AnyArray | np.generic
  producer_shift: AnyArray | None = None

  @property
  def n(self) -> int:
    """The group's neuron count before the plan (static, also under ``jit``)."""
    return int(np.shape(self.importance)[0])

  @property
  def m(self) -> int:
    """The neuron count after the plan: kept neurons or fused targets (static, also under ``jit``)."""
    rows = self.keep if self.keep is not None else self.producer_map  # a plan has one or the other
    return int(np.shape(cast(AnyArray, rows))[0])


class Plan(dict):
  """``{group name: GroupPlan}`` in network order, as :func:`plan` returns it: a dict (and a pytree) that also
  remembers the spec and the neuron counts it was planned on, so it gives the pruned model's widths and spec
  without the original variables or a zoo rebuild.

  A plain ``{name: GroupPlan}`` dict works wherever a plan is taken; it lacks :meth:`widths` and :meth:`spec`
  (use :func:`ifjax.widths` with the variables, and ``ifjax.save(..., plan=)``).

  Examples:
    >>> import numpy as np, ifjax
    >>> variables = {"params": {"hidden": {"kernel": np.ones((2, 4), np.float32)},
    ...                         "out": {"kernel": np.ones((4, 1), np.float32)}}}
    >>> spec = ifjax.Spec([ifjax.Group("hidden", [("params/hidden/kernel", 1)], [("params/out/kernel", 0)])])
    >>> pl = ifjax.plan(variables, spec, 0.5)
    >>> pl.widths()
    {'hidden': 2}
    >>> pl.spec().validate(ifjax.apply_plan(variables, spec, pl))
    {'hidden': 2}
  """

  def __init__(self, groups: Mapping[str, GroupPlan] | Iterable[tuple[str, GroupPlan]] = (),
               spec: Spec | None = None, sizes: Mapping[str, int] | None = None,
               ndims: Mapping[str, int] | None = None):
    """``groups``: the ``{name: GroupPlan}`` entries; ``spec`` and ``sizes`` (``{group: neuron count}`` of every
    group of ``spec`` before the plan) are what the plan was made with; ``ndims``: ``{member path: ndim}``."""
    super().__init__(groups)
    self._spec, self._sizes = spec, (dict(sizes) if sizes is not None else None)
    self._ndims = dict(ndims) if ndims is not None else None

  @property
  def source_spec(self) -> Spec | None:
    """The spec this plan was made with (None for a plan built by hand)."""
    return self._spec

  def widths(self) -> dict[str, int]:
    """``{group name: neuron count}`` of every group of the spec after :func:`apply_plan` (groups the plan
    leaves alone keep theirs): ``widths=`` of a zoo model rebuilt at the pruned size."""
    if self._sizes is None:
      raise ValueError("this plan does not know the neuron counts it was made on (it was built by hand, not by "
                       "ifjax.plan); use ifjax.widths(variables, spec, plan)")
    return {**self._sizes, **{name: gp.m for name, gp in self.items()}}

  def spec(self) -> Spec:
    """The spec of the variables :func:`apply_plan` returns: the spec the plan was made with, each planned
    group's ``size=`` (where it has one) set to its kept count and the offsets of segments of shared axes
    moved past the neurons removed before them. Batchnorm pairs are kept. For a zoo model this is the spec
    of ``ifjax.models.get(name, widths=plan.widths())``; pass it to :func:`ifjax.save` with the pruned
    variables, or to :func:`plan` to prune them again."""
    if self._spec is None:
      raise ValueError("this plan does not know the spec it was made with (it was built by hand, not by "
                       "ifjax.plan); use ifjax.save(path, pruned, spec, plan=plan)")
    return resized_spec(self._spec, {name: (gp.n, gp.m) for name, gp in self.items()}, self._ndims)

  def _aux(self):
    return (tuple(self), self._spec, None if self._sizes is None else tuple(self._sizes.items()),
            None if self._ndims is None else tuple(self._ndims.items()))


def _plan_flatten_with_keys(p: Plan):
  return [(jax.tree_util.DictKey(k), v) for k, v in p.items()], p._aux()


def _plan_unflatten(aux, children) -> Plan:
  names, spec, sizes, ndims = aux
  return Plan(zip(names, children), spec, None if sizes is None else dict(sizes),
              None if ndims is None else dict(ndims))


jax.tree_util.register_pytree_with_keys(Plan, _plan_flatten_with_keys, _plan_unflatten,
                                        lambda p: (list(p.values()), p._aux()))
Ratio = float | Mapping[str, float] | Mapping[int, float] | Mapping[str | int, float]
GroupSelection = str | int | Iterable[str | int] | None


class ConvergenceWarning(UserWarning):
  """Sinkhorn did not reach its threshold; see ``fallback=`` of :func:`plan`."""


class ConvergenceError(IfjaxError, RuntimeError):
  """An OT solver did not converge: Sinkhorn with ``fallback="raise"``, or the exact LP failed."""


def kept_count(n: int, ratio: float) -> int:
  """m = ``int(n * (1 - ratio))`` in float64, as the authors' code computes it.

  That is floor(n * (1 - ratio)) except where float rounding puts an exact integer just below itself:
  ``1 - 0.9`` is 0.09999999999999998, so 20 neurons at ratio 0.9 keep 1, not 2.

  >>> kept_count(20, 0.9), kept_count(20, 0.85)
  (1, 3)
  """
  return int(n * (1 - ratio))


METHODS = ("if", "default", "neuron_merging", "model_folding")


def plan(variables: Variables, spec: Spec, ratio: Ratio, *, groups: GroupSelection = None,
         importance: Any = "l1", method: Literal["if", "default", "neuron_merging", "model_folding"] = "if",
         merge_threshold: float | None = None, repair: Literal["none", "statistics"] | None = None,
         fuse: bool | None = None, solver: Literal["exact", "sinkhorn"] = "exact",
         target: Literal["most_important", "cluster_centroid"] = "most_important",
         source_mass: Literal["uniform", "importance"] = "uniform",
         target_mass: Literal["uniform", "importance"] = "uniform",
         normalization: Literal["paper", "barycentric"] = "paper",
         p: float = 1.0, include_bias: bool = False,
         epsilon: float = 1e-3, threshold: float = 1e-3, max_iterations: int = 10000,
         fallback: Literal["exact", "warn", "raise"] = "exact",
         seed: int = 0, features: Mapping[str, Any] | None = None) -> Plan:
  """Computes, per selected group, the keep set, importance and the maps of ``method``.

  Args:
    variables: Flax variables ``{"params": ..., "batch_stats": ...}``; not modified.
    spec: the group spec. BatchNorms in ``spec.batchnorms`` are folded first.
    ratio: neuron sparsity per group in [0, 1), or ``{group name or paper index: ratio}``
      (groups missing from the dict are left alone).
    groups: names or paper indices (0 = closest to the output); None = all.
    importance: "l1" | "l2" | "linf" | "lamp" | "random", a callable
      ``fn(folded_variables, group) -> (n,)``, or precomputed ``{group: (n,) scores}``.
    method: how the m survivors stand in for the n neurons. ``"if"``: Intra-Fusion (OT maps, the options
      below). ``"default"``: plain pruning (keep the m most important, drop the rest). ``"neuron_merging"``:
      Neuron Merging (Kim et al., 2020): the kept neurons keep their weights and each pruned neuron whose
      producer vector (folded weights and bias) has a cosine >= ``merge_threshold`` (default 0.1) with a kept
      one is added to that neuron's consumer column, scaled by their norm ratio. ``"model_folding"``: Model
      Folding (Wang et al., 2025): k-means clusters of the producer vectors (``seed``), producers averaged,
      consumers summed, with ``repair="statistics"`` by default. Pruning-only groups (``Group.exact`` False,
      e.g. channels under a LayerNorm) are always pruned. See :mod:`ifjax._merging`.
    merge_threshold: with ``"if"``: only pairs of neurons whose cosine (of the OT feature vectors) is at
      least this are merged; a pruned neuron with no such target is dropped. Default None: all merged.
      With ``"neuron_merging"``: its cosine threshold.
    repair: ``"statistics"``: data-free REPAIR of every merged channel of a group with one producer layer and
      a BatchNorm: rescaled about its predicted mean to the deviation its sources had, from the BN statistics
      and correlations estimated as the cosines of the folded producer rows (``GroupPlan.producer_shift``
      holds the shift). ``"none"``: no repair. Default None: ``"statistics"`` for ``"model_folding"``,
      ``"none"`` otherwise.
    fuse: deprecated: ``fuse=False`` is ``method="default"``.
    solver: "exact" (POT EMD, the authors' solver) or "sinkhorn" (OTT-JAX).
    target: "most_important" (the kept neurons) or "cluster_centroid" (k-means
      centroids of the neuron vectors; the fused weights are still OT-weighted
      combinations of the original neurons).
    source_mass: "uniform" or "importance" (scores / their sum; for
      centroids, the summed importance of each cluster's members).
    target_mass: "uniform" or "importance", as ``source_mass``.
    normalization: "paper" (sums on both sides) or "barycentric" (averaged
      producers, summed consumers); see the module docstring.
    p: the cost is the p-norm distance between L2-normalised neuron vectors (0 < p <= inf).
    include_bias: also put producer biases (and folded BN shifts) in the neuron
      vectors, as the paper's text says; the authors' code leaves them out.
    epsilon: Sinkhorn regularisation (> 0), relative to the largest cost of each group.
    threshold: Sinkhorn convergence threshold.
    max_iterations: Sinkhorn iteration limit.
    fallback: when Sinkhorn does not converge: "exact" re-solves that group with
      the exact solver and warns; "warn" keeps the unconverged plan and warns;
      "raise" raises :class:`ConvergenceError` (a ``RuntimeError``).
    seed: seed for the k-means of ``cluster_centroid``.
    features: ``{group name: (n, d)}`` vectors that replace the weight vectors in the OT cost (and in
      ``merge_threshold``'s cosines), e.g. each neuron's activations on calibration data
      (``ifjax.calibration.consumer_statistics(...).features(variables)``). Groups it lacks use weights.

  Returns:
    ``{group name: GroupPlan}`` in network order.

  Concrete inputs run on the host in NumPy (and POT), apart from large cost matrices, which are tiles of
  one compiled kernel shared by every shape (p = 2: a BLAS matmul), so a first call compiles at most two
  programs and the next model none. Inside ``jax.jit`` (the spec,
  ratio and options static) everything is ``jax.numpy`` and ``solver="sinkhorn"`` is required; the
  checks that need concrete values and the Sinkhorn ``fallback`` are then skipped (read ``converged``
  and ``marginal_error`` off the plan).

  Examples:
    Four neurons; the two weakest (0, 1) are near-duplicates of the two strongest (2, 3). At 50% each kept
    neuron takes one pruned neuron whole, so the paper's maps hold 0s and 1s:

    >>> import numpy as np, ifjax
    >>> variables = {"params": {"hidden": {"kernel": np.array([[1., 0., 3., 0.], [0., 1., 0., 3.]], np.float32)},
    ...                         "out": {"kernel": np.ones((4, 1), np.float32)}}}
    >>> spec = ifjax.Spec([ifjax.Group("hidden", [("params/hidden/kernel", 1)], [("params/out/kernel", 0)])])
    >>> pl = ifjax.plan(variables, spec, 0.5)
    >>> pl["hidden"].keep
    array([2, 3], dtype=int32)
    >>> pl["hidden"].producer_map
    array([[1., 0., 1., 0.],
           [0., 1., 0., 1.]], dtype=float32)
  """
  return _plan(variables, spec, ratio, groups=groups, importance=importance, method=method,
               merge_threshold=merge_threshold, repair=repair, fuse=fuse, solver=solver, target=target,
               source_mass=source_mass, target_mass=target_mass, normalization=normalization, p=p,
               include_bias=include_bias, epsilon=epsilon, threshold=threshold, max_iterations=max_iterations,
               fallback=fallback, seed=seed, features=features)[0]


def _plan(variables: Variables, spec: Spec, ratio: Ratio, *, groups: GroupSelection = None,
          importance: Any = "l1", method: str = "if", merge_threshold: float | None = None,
          repair: str | None = None, fuse: bool | None = None, solver: str = "exact", target: str = "most_important",
          source_mass: str = "uniform", target_mass: str = "uniform", normalization: str = "paper",
          p: float = 1.0, include_bias: bool = False, epsilon: float = 1e-3, threshold: float = 1e-3,
          max_iterations: int = 10000, fallback: str = "exact", seed: int = 0,
          features: Mapping[str, Any] | None = None) -> tuple[Plan, dict]:
  """:func:`plan`, and the BN-folded flat variables it planned on (for :func:`intra_fuse` / :func:`prune`,
  which apply the plan to them without folding and validating a second time)."""
  ratio = _scalar_ratios(ratio)  # jnp.float32(0.5) is the ratio 0.5
  _check_types(variables, spec, ratio, importance=importance, fuse=True if fuse is None else fuse, solver=solver,
               target=target, source_mass=source_mass, target_mass=target_mass, normalization=normalization,
               include_bias=include_bias, fallback=fallback, method=method)
  required = repair is not None  # model_folding's default repair skips a network without BatchNorms
  method, merge_threshold, repair = _method_options(method, fuse, merge_threshold, repair, target)
  fuse = method != "default"
  traced = is_traced(variables)
  if traced and (method in ("neuron_merging", "model_folding") or merge_threshold is not None
                 or repair != "none"):
    raise ValueError(f"method={method!r}, merge_threshold and repair run on the host and cannot be traced; inside "
                     "jax.jit use method='if' or 'default' without them")
  if traced and solver == "exact":
    raise ValueError("solver='exact' runs POT on the host and cannot be traced; inside jax.jit use "
                     "solver='sinkhorn'")
  xp = jnp if traced else np
  variables = variables if traced else on_host(variables)
  sizes = _checked(variables, spec)
  flat = folded_flat(variables, spec)
  folded = unflatten(flat, keep_flat=True)  # importance functions flatten it again: for free
  ratios = _ratios(spec, ratio, groups)
  if isinstance(importance, Mapping):
    importance = _by_name(spec, importance, "importance")
  score_fn = _importance.resolve(importance)
  _check_choice("target", target, ("most_important", "cluster_centroid"))
  _check_choice("source_mass", source_mass, ("uniform", "importance"))
  _check_choice("target_mass", target_mass, ("uniform", "importance"))
  _check_choice("normalization", normalization, ("paper", "barycentric"))
  _check_choice("solver", solver, ("exact", "sinkhorn"))
  _check_choice("fallback", fallback, ("exact", "warn", "raise"))
  p = _transport.check_p(p)
  if solver == "sinkhorn":
    _transport.check_sinkhorn(epsilon, threshold, max_iterations)
  if method != "if" and target != "most_important":
    raise ValueError(f"method={method!r} keeps neurons; target must be 'most_important' (cluster_centroid is "
                     "Intra-Fusion's)")

  prepared = {}
  for g, r in ratios:
    n = sizes[g.name]
    m = kept_count(n, r)
    if m < 1:
      raise ValueError(f"group {g.name!r}: ratio {r} keeps int({n} * (1 - {r})) = {m} of {n} neurons "
                       "(float arithmetic, as kept_count); at least one must remain")
    scores = xp.asarray(score_fn(folded, dataclasses.replace(g, size=n)), xp.float32)
    if scores.shape != (n,):
      raise ValueError(f"importance for group {g.name!r} has shape {scores.shape}, expected ({n},)")
    if not traced and not np.all(np.isfinite(scores)):
      raise ValueError(f"importance for group {g.name!r} has NaN or Inf values")
    keep = xp.sort(xp.argsort(-scores, stable=True)[:m]).astype(xp.int32)
    prepared[g.name] = (g, n, m, scores, keep)

  pruned = {name: GroupPlan(keep, scores, None, None, None, xp.asarray(True), xp.asarray(0.0, xp.float32),
                            xp.asarray(0))
            for name, (g, n, m, scores, keep) in prepared.items() if not fuse or not g.exact}
  if not fuse:
    return _as_plan(pruned, spec, sizes, flat), flat
  if method != "if":
    merged = {name: _merged_group(method, flat, spec, g, n, m, scores, keep, merge_threshold, seed, i)
              for i, (name, (g, n, m, scores, keep)) in enumerate(prepared.items()) if name not in pruned}
    merged = _repaired(merged, variables, spec, flat, repair, required)
    return _as_plan({name: merged.get(name) or pruned[name] for name in prepared}, spec, sizes, flat), flat

  fused = [name for name in prepared if name not in pruned]  # pruning-only groups (Group.exact False) are done
  position = {name: i for i, name in enumerate(fused)}
  if solver == "exact" and not traced:  # largest first: the host solves it while XLA computes the smaller costs
    fused = sorted(fused, key=lambda k: -prepared[k][1] * prepared[k][2])
  problems = {}
  early, pending = {}, []  # exact: groups solved inside the loop; (name, bytes) of costs still being computed
  for name in fused:
    g, n, m, scores, keep = prepared[name]
    x = _transport.normalize_rows(_cost_vectors(flat, spec, g, n, include_bias, features, xp),
                                  in_place=not traced)  # a new array
    uses_scores = source_mass == "importance" or target_mass == "importance"
    if uses_scores and not traced and np.any(scores < 0):
      raise ValueError(f"group {name!r}: importance masses need non-negative scores")
    if uses_scores and not traced and np.sum(scores) <= 0:
      raise ValueError(f"group {name!r}: importance masses sum to zero (scores must have a positive sum)")
    a = scores / xp.sum(scores) if source_mass == "importance" else xp.full((n,), 1.0 / n, xp.float32)
    if target == "most_important":
      y = x[keep] if traced else None  # the host's kept_distance takes x and keep
      b = scores[keep] if target_mass == "importance" else xp.ones((m,), xp.float32)
    else:
      key = jax.random.fold_in(jax.random.key(seed), position[name])
      centroids, labels = _transport.kmeans(x, m, key)
      y = _transport.normalize_rows(xp.asarray(centroids))
      b = jnp.zeros((m,)).at[labels].add(scores) if target_mass == "importance" else jnp.ones((m,))
      b = xp.asarray(b, xp.float32)
      keep = None
      prepared[name] = (g, n, m, scores, keep)
    if not traced and (np.sum(b) <= 0 or np.sum(a) <= 0):
      raise ValueError(f"group {name!r}: importance masses sum to zero")
    if traced:
      assert y is not None  # x[keep], or the centroids
      cost = _transport.pairwise_distance(x, y, p=p)
    else:  # the exact solver does not wait for a compiled cost here: it solves a group while XLA computes the next
      cost = (_transport.kept_distance(x, keep, p) if keep is not None else
              _transport.host_distance(x, cast(AnyArray, y), p))  # y: the centroids
      cost = cost if solver == "exact" else np.asarray(cost)
    problems[name] = (cost, a, b / xp.sum(b))
    if solver == "exact" and isinstance(cost, _transport.PendingCost):  # holds its inputs until it is done
      pending.append((name, x.nbytes + 4 * n * m))
      while len(pending) > 1 and sum(nbytes for _, nbytes in pending) > _INFLIGHT_BYTES:
        first = pending.pop(0)[0]  # solve the oldest now: its inputs are freed before more are queued
        early[first], problems[first] = _transport.solve_exact(*problems[first]), None
    x = y = cost = None  # not held while the next group's vectors are built

  names = list(problems)
  if solver == "exact" or not names:
    solved = []
    for k in names:
      solved.append(early.pop(k) if k in early else _transport.solve_exact(*problems[k]))
      problems[k] = None  # the exact path needs no cost again
  else:
    solved = _transport.solve_sinkhorn([problems[k] for k in names], epsilon=epsilon, threshold=threshold,
                                       max_iterations=max_iterations)
  out = {}
  for name, t in zip(names, solved):
    if not traced and (not bool(t.converged) or not np.all(np.isfinite(np.asarray(t.matrix)))):
      msg = (f"group {name!r}: {solver} OT did not converge (marginal error {float(t.marginal_error):.2e} after "
             f"{int(t.iterations)} iterations)")
      if fallback == "raise" or solver == "exact":
        raise ConvergenceError(msg)
      if fallback == "exact":
        warnings.warn(msg + "; falling back to the exact solver for this group", ConvergenceWarning, stacklevel=2)
        t = _transport.solve_exact(*problems[name])
      else:
        warnings.warn(msg + "; keeping the unconverged plan", ConvergenceWarning, stacklevel=2)
    g, n, m, scores, keep = prepared[name]
    matrix = t.matrix
    if merge_threshold is not None:
      unit = _merging.unit_rows(_cost_vectors(flat, spec, g, n, include_bias, features, np))
      matrix = _merging.thresholded_transport(np.asarray(matrix), unit, np.asarray(keep), merge_threshold)
    out[name] = GroupPlan(keep, scores, matrix, *transport_maps(matrix, normalization), t.converged,
                          t.marginal_error, t.iterations)
  out = _repaired(out, variables, spec, flat, repair, required)
  return _as_plan({name: out[name] if name in out else pruned[name] for name in prepared}, spec, sizes, flat), flat


def _method_options(method: str, fuse: bool | None, merge_threshold: float | None, repair: str | None,
                    target: str) -> tuple[str, float | None, str]:
  """``(method, merge_threshold, repair)`` with the deprecated ``fuse`` resolved and the defaults filled in."""
  _check_choice("method", method, METHODS)
  if fuse is not None:
    warnings.warn("fuse= is deprecated: use method='default' for plain pruning, method='if' for Intra-Fusion",
                  DeprecationWarning, stacklevel=4)
    if not fuse:
      if method not in ("if", "default"):
        raise ValueError(f"fuse=False (plain pruning) contradicts method={method!r}; give method alone")
      method = "default"
  if repair is None:
    repair = "statistics" if method == "model_folding" else "none"
  _check_choice("repair", repair, ("none", "statistics"))
  if merge_threshold is not None:
    merge_threshold = python_scalar(merge_threshold, "iuf", "merge_threshold")
    if isinstance(merge_threshold, bool) or not isinstance(merge_threshold, (int, float)):
      raise ArgumentTypeError(f"merge_threshold must be a number in [-1, 1] or None, got "
                              f"{type(merge_threshold).__name__}")
    if not -1 <= merge_threshold <= 1:
      raise ValueError(f"merge_threshold is a cosine: it must be in [-1, 1], got {merge_threshold!r}")
    if method not in ("if", "neuron_merging"):
      raise ValueError(f"merge_threshold applies to method 'if' and 'neuron_merging', not {method!r}")
    if method == "if" and target != "most_important":
      raise ValueError("merge_threshold needs target='most_important' (the kept neurons are the targets)")
  elif method == "neuron_merging":
    merge_threshold = 0.1
  if repair == "statistics" and method not in ("if", "model_folding"):
    raise ValueError(f"repair='statistics' rescales merged producers; method {method!r} keeps its producers as "
                     "they are")
  return method, merge_threshold, repair


def _producer_vectors(flat: Mapping[str, Any], spec: Spec, group: Group, n: int) -> np.ndarray:
  """(n, d): each neuron's folded producer rows and biases (what the neuron computes from its input)."""
  members = [m for m in group.producers if np.ndim(flat[m.path]) >= 2] + _bias_members(flat, spec, group)
  return np.concatenate([np.asarray(member_rows(flat, m, n), np.float64) for m in members], axis=1)


def _merged_group(method: str, flat, spec: Spec, g: Group, n: int, m: int, scores, keep, merge_threshold, seed: int,
                  position: int) -> GroupPlan:
  """The GroupPlan of ``"neuron_merging"`` or ``"model_folding"`` for one group (host)."""
  v = _producer_vectors(flat, spec, g, n)
  scores, keep = np.asarray(scores), np.asarray(keep)
  if method == "neuron_merging":
    producer, consumer = _merging.neuron_merging_maps(v, keep, merge_threshold)
  else:
    key = jax.random.fold_in(jax.random.key(seed), position)
    labels = np.arange(n) if m == n else np.asarray(_transport.kmeans(v.astype(np.float32), m, key)[1])
    keep, producer, consumer = _merging.folding_maps(v, labels, scores)
    if len(keep) != m:
      raise ValueError(f"group {g.name!r}: k-means found {len(keep)} clusters, not {m}")
  return GroupPlan(keep.astype(np.int32), scores, None, producer, consumer, np.asarray(True),
                   np.asarray(0.0, np.float32), np.asarray(0))


def _repaired(plans: dict[str, GroupPlan], variables: Variables, spec: Spec, flat, repair: str,
              required: bool) -> dict:
  """``plans`` with :func:`ifjax._merging.repair_statistics` applied to each merged group that has one producer
  layer with a BatchNorm (``repair="statistics"``); ValueError if none has and the repair was asked for."""
  if repair == "none" or not plans:
    return plans
  statistics = input_statistics(variables, spec)
  bn_of = {pair.layer: pair.bn for pair in spec.batchnorms}
  out, repaired = dict(plans), 0
  for name, gp in plans.items():
    g = spec[name]
    kernels = [m for m in g.producers if m.path.endswith("/kernel") and np.ndim(flat[m.path]) >= 2]
    layers = {m.path[len("params/"):-len("/kernel")] for m in kernels}
    if gp.producer_map is None or len(kernels) != 1 or len(layers) != 1:
      continue
    bn = bn_of.get(layers.pop())
    if bn is None or f"batch_stats/{bn}/mean" not in statistics:
      continue
    k = kernels[0]
    mean = statistics[f"batch_stats/{bn}/mean"][k.offset:k.offset + gp.n]
    sd = statistics[f"batch_stats/{bn}/var"][k.offset:k.offset + gp.n]  # input_statistics keeps deviations there
    unit = _merging.unit_rows(np.asarray(member_rows(flat, k, gp.n)))
    scale, shift = _merging.repair_statistics(gp.producer_map, mean, sd, unit @ unit.T)
    out[name] = gp._replace(producer_map=np.asarray(gp.producer_map, np.float32) * scale[:, None],
                            producer_shift=shift)
    repaired += 1
  if not repaired and required:
    raise ValueError("repair='statistics' needs a BatchNorm after the single producer layer of a merged group (its "
                     "running statistics give the channels' means and deviations); none of the planned groups has one")
  return out


def _as_plan(groups: Mapping[str, GroupPlan], spec: Spec, sizes: Mapping[str, int], flat: Mapping[str, Any]) -> Plan:
  ndims = {m.path: np.ndim(flat[m.path]) for g in spec.groups for m in g.members}
  return Plan(groups, spec, sizes, ndims)


# bytes of queued compiled-cost inputs and outputs (neuron vectors, cost matrices) the exact path lets pile up
# while the host solves earlier groups: more overlaps more, less keeps the peak memory down
_INFLIGHT_BYTES = 64 * 2**20


def transport_maps(t: AnyArray, normalization: str) -> tuple[AnyArray, AnyArray]:
  """(n, m) plan -> (producer_map, consumer_map), each (m, n). See the module docstring."""
  xp = array_module(t)
  one = xp.asarray(1.0, t.dtype)
  row = xp.sum(t, axis=1)  # source masses as the plan has them
  consumer = (t / xp.where(row > 0, row, one)[:, None]).T
  if normalization == "paper":
    return consumer, consumer
  col = xp.sum(t, axis=0)
  return (t / xp.where(col > 0, col, one)[None, :]).T, consumer


def neuron_vectors(flat: Mapping[str, Any], spec: Spec, group: Group, n: int, include_bias: bool) -> AnyArray:
  """(n, d): per neuron, its producer rows and consumer columns concatenated (the OT features)."""
  rows = [member_rows(flat, m, n) for m in weight_members(flat, group)]
  if include_bias:
    rows += [member_rows(flat, m, n) for m in _bias_members(flat, spec, group)]
  return array_module(*rows).concatenate(rows, axis=1)


def _cost_vectors(flat, spec: Spec, group: Group, n: int, include_bias: bool, features, xp) -> AnyArray:
  """The OT feature vectors of a group: ``features[name]`` (a new float32 array) where given, else weights."""
  if features is None or group.name not in features:
    return neuron_vectors(flat, spec, group, n, include_bias)
  x = xp.array(features[group.name], dtype=xp.float32)
  if x.ndim != 2 or x.shape[0] != n:
    raise ValueError(f"features[{group.name!r}] has shape {tuple(x.shape)}; expected (n, d) with n = {n}")
  return x


def _bias_members(flat, spec: Spec, group: Group) -> list[Member | FlatMember]:
  out = [m for m in group.producers if np.ndim(flat[m.path]) == 1]
  return out + [m for m, role in derived_bn(spec, group) if role == "shift" and m.path in flat]


def apply_plan(variables: Variables, spec: Spec, plan: Mapping[str, GroupPlan], *, keep_shapes: bool = False) -> dict:
  """New variables with every planned group reduced to its m neurons. Jit-able with ``spec`` static.

  BatchNorms are folded first; the folded (identity) BN arrays of a group's
  producers are cut to m entries, and a BN that carries a folded shift has it
  fused like a producer bias.

  With ``keep_shapes=True`` every array keeps its shape: a group's m neurons fill
  the first m slots of its n and the other n - m slots are zero. Dropped
  channels are then read only through zero weights, so the full-size model
  computes the reduced model's function (unless a parameter-free op mixes
  channels, e.g. a LayerNorm over them), and one compiled model can evaluate
  many plans.

  Concrete inputs are edited in NumPy on the host (no compilation); the result holds jax arrays. A plan that
  does not fit the variables (made for other variables or another spec) raises ValueError naming the group.

  Examples:
    The plan of :func:`plan`'s example: neuron 0 is summed into 2 and neuron 1 into 3, on both sides.

    >>> import numpy as np, ifjax
    >>> variables = {"params": {"hidden": {"kernel": np.array([[1., 0., 3., 0.], [0., 1., 0., 3.]], np.float32)},
    ...                         "out": {"kernel": np.ones((4, 1), np.float32)}}}
    >>> spec = ifjax.Spec([ifjax.Group("hidden", [("params/hidden/kernel", 1)], [("params/out/kernel", 0)])])
    >>> pl = ifjax.plan(variables, spec, 0.5)
    >>> small = ifjax.apply_plan(variables, spec, pl)
    >>> small["params"]["hidden"]["kernel"]
    Array([[4., 0.],
           [0., 4.]], dtype=float32)
    >>> small["params"]["out"]["kernel"].ravel()
    Array([2., 2.], dtype=float32)
    >>> ifjax.apply_plan(variables, spec, pl, keep_shapes=True)["params"]["hidden"]["kernel"]
    Array([[4., 0., 0., 0.],
           [0., 4., 0., 0.]], dtype=float32)
  """
  _check_plan(variables, spec, plan)
  traced = is_traced((variables, plan))
  if not traced:
    variables, plan = on_host((variables, plan))
  return _apply_folded(folded_flat(variables, spec), spec, plan, keep_shapes, traced)


def _apply_folded(flat: Mapping[str, Any], spec: Spec, plan: Mapping[str, GroupPlan], keep_shapes: bool,
                  traced: bool) -> dict:
  """:func:`apply_plan` on BN-folded flat variables and a plan already checked against them."""
  out = unflatten(edit_members(flat, spec, plan, _apply_roles(spec, flat), keep_shapes))
  return out if traced else to_jax(out)


def _apply_roles(spec: Spec, flat: Mapping[str, Any]):
  """``roles(group)`` for :func:`edit_members`: producers, consumers and the group's folded BN arrays."""

  def roles(g: Group):
    out = [(m, "producer") for m in g.producers] + [(m, "consumer") for m in g.consumers]
    out += [(m, "producer" if role == "shift" else "identity") for m, role in derived_bn(spec, g) if m.path in flat]
    return _with_shift_member(out, flat)

  return roles


def _with_shift_member(roles: list[tuple[Member | FlatMember, str]],
                       flat: Mapping[str, Any]) -> list[tuple[Member | FlatMember, str]]:
  """``roles`` with the last 1-d producer (the folded BN shift, else the layer's bias) marked
  ``"producer+shift"``: the member that also takes a plan's ``producer_shift``."""
  last = max((i for i, (m, role) in enumerate(roles) if role == "producer" and np.ndim(flat[m.path]) == 1),
             default=None)
  if last is None:
    return roles
  return [(m, "producer+shift" if i == last else role) for i, (m, role) in enumerate(roles)]


def edit_members(flat: Mapping[str, Any], spec: Spec, plan: Mapping[str, GroupPlan], roles,
                 keep_shapes: bool = False) -> dict:
  """``flat`` with every ``(member, role)`` of ``roles(group)`` reduced by its group's plan; other arrays as
  they are. Members sharing an axis (segments) are edited together, in offset order."""
  by_name = {g.name: g for g in spec.groups}
  edits: dict[Member | FlatMember, list[tuple[int, int, str, GroupPlan]]] = {}
  for name, gp in plan.items():
    if name not in by_name:
      raise ValueError(f"plan has group {name!r}, which the spec does not have ({list(by_name)})")
    for m, role in roles(by_name[name]):
      view = m._replace(axis=m.axis % np.ndim(flat[m.path]), offset=0)
      edits.setdefault(view, []).append((m.offset, gp.n, role, gp))
  out = dict(flat)
  pairs: dict[int, tuple[Any, Any]] = {}  # id(host map) -> (map, _unit_pairs(map))
  # an array may have 2 axes edited: in (path, axis) order, so the rounding does not depend on the plan's order
  for view in sorted(edits, key=lambda v: (v.path, v.axis)):
    out[view.path] = _edit_axis(out[view.path], view, sorted(edits[view], key=lambda s: s[0]), keep_shapes, pairs)
  return out


def _unit_pairs(mat: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray] | None:
  """(m, n) map -> ``(first, rows, second)`` if every row of ``mat`` has one or two nonzero entries and all of
  them are exactly 1, else None: ``first`` (m,) is each row's first source, ``rows`` the rows with a second
  source (None: all of them) and ``second`` their second sources.

  A row of such a map is the sum of at most two source rows with exact products, which rounds the same in
  any order: the gather-add of :func:`_edit_axis` gives the dense product's bits without a matmul. The
  paper's maps at ratio 0.5 with uniform masses and an even n are of this kind (the exact plan is integral).
  """
  nz = mat != 0
  count = nz.sum(1)
  if count.min() < 1 or count.max() > 2 or not np.all(mat[nz] == 1):
    return None
  first = np.argmax(nz, axis=1)
  last = mat.shape[1] - 1 - np.argmax(nz[:, ::-1], axis=1)
  if count.min() == 2:
    return first, None, last
  rows = np.flatnonzero(count == 2)
  return first, rows, last[rows]


# multiply-adds of a map product above which a sparse map (an exact OT plan has at most n + m - 1 nonzeros) is
# applied by its nonzero entries instead of a dense tensordot: LLM-sized groups, never the small pinned models
_SPARSE_PRODUCT = 2**32


def _sparse_rows(mat: np.ndarray, seg: np.ndarray) -> np.ndarray:
  """``tensordot(mat, seg, 1)`` from ``mat``'s nonzero entries: (m, n) x (n, ...) -> (m, ...), each row the sum
  of its sources in column order (dense where the map is more than a quarter full)."""
  rows, cols = np.nonzero(mat)
  if rows.size * 4 > mat.size:
    return np.tensordot(mat, seg, axes=1)
  out = np.zeros((mat.shape[0], *seg.shape[1:]), np.float32)
  step = max(1, 2**26 // max(1, seg[0].size))  # bound the (entries, ...) products held at once
  for i in range(0, rows.size, step):
    r, c = rows[i:i + step], cols[i:i + step]
    np.add.at(out, r, mat[r, c].reshape(-1, *([1] * (seg.ndim - 1))) * seg[c])
  return out


def _edit_axis(arr: jax.Array, view: Member | FlatMember, segs, keep_shapes: bool,
               pairs: dict[int, tuple[Any, Any]]) -> jax.Array:
  """Replaces segments [offset, offset + n) of the neuron (sub-)axis by their m reduced entries
  (followed by n - m zeros if ``keep_shapes``). ``pairs`` caches :func:`_unit_pairs` per host map."""
  x = view.neurons_first(arr)
  xp = array_module(x)
  pieces, pos = [], 0
  for offset, n, role, gp in segs:
    pieces.append(x[pos:offset])
    seg = x[offset:offset + n]
    m = gp.m
    if role == "identity":  # constant after BN folding
      pieces.append(seg[gp.keep] if gp.keep is not None else seg[:m])
    elif gp.producer_map is None:
      pieces.append(seg[gp.keep])
    else:
      mat = gp.consumer_map if role == "consumer" else gp.producer_map
      if xp is np:
        if id(mat) not in pairs:  # the map is kept in the entry, so its id is not reused while cached
          pairs[id(mat)] = (mat, _unit_pairs(np.asarray(mat, np.float32)))
        unit = pairs[id(mat)][1]
        if unit is None and mat.size * seg[0].size > _SPARSE_PRODUCT:
          fused = _sparse_rows(np.asarray(mat, np.float32), seg.astype(np.float32, copy=False))
        elif unit is None:
          fused = np.tensordot(np.asarray(mat, np.float32), seg.astype(np.float32), axes=1)
        else:
          first, rows, second = unit
          seg = seg.astype(np.float32, copy=False)
          fused = seg[first]
          if rows is None:
            fused += seg[second]
          else:
            fused[rows] += seg[second]
          fused += np.float32(0)  # -0 -> +0, as a matmul accumulating from +0 gives
      else:
        fused = jnp.tensordot(mat, seg.astype(jnp.float32), axes=1, precision=jax.lax.Precision.HIGHEST)
      if role == "producer+shift" and gp.producer_shift is not None:
        fused = fused + xp.asarray(gp.producer_shift, xp.float32).reshape((m,) + (1,) * (fused.ndim - 1))
      pieces.append(fused.astype(arr.dtype))
    if keep_shapes:
      pieces.append(xp.zeros((n - m, *x.shape[1:]), x.dtype))
    pos = offset + n
  pieces.append(x[pos:])
  return view.restore(xp.concatenate(pieces, axis=0))


def step_widths(sizes: Mapping[str, int], ratio: Mapping[str, float], steps: int) -> list[dict[str, int]]:
  """Target widths after each of ``steps`` pruning steps: ``kept_count(n, r * i / steps)``.

  >>> step_widths({"a": 64}, {"a": 0.5}, 4)
  [{'a': 56}, {'a': 48}, {'a': 40}, {'a': 32}]
  """
  if not isinstance(steps, int) or steps < 1:
    raise ValueError(f"steps must be a positive int, got {steps!r}")
  return [{g: kept_count(sizes[g], r * i / steps) if i < steps else kept_count(sizes[g], r) for g, r in ratio.items()}
          for i in range(1, steps + 1)]


def relative_ratios(current: Mapping[str, int], target: Mapping[str, int]) -> dict[str, float]:
  """Ratios that take each group from ``current`` to ``target`` neurons under ``kept_count``'s rounding
  (groups already at their target are left out)."""
  return {g: 1.0 - (m + 0.5) / current[g] for g, m in target.items() if m < current[g]}


def iterative_fuse(variables: Variables, spec: Spec | Callable[[Mapping[str, int] | None], Spec], ratio: Ratio, *,
                   steps: int = 4, groups: GroupSelection = None, fuse: bool = True, **options) -> Variables:
  """Intra-Fusion (``fuse=False``: default pruning) to ``ratio`` in ``steps`` steps, re-planning on the fused
  weights after each: step i cuts every group to ``kept_count(n, r * i / steps)`` neurons (the paper's
  dev code used 4 steps), so the last step lands on the one-shot widths and ``steps=1`` is ``intra_fuse``.

  ``spec``: a Spec, or ``widths -> Spec`` for specs whose groups carry a fixed ``size`` (segment groups,
  e.g. the option-A ResNet streams): ``lambda w: ifjax.models.get(name, widths=w)[1]``. ``options`` go to
  :func:`plan`. Returns the fused variables.
  """
  build = spec if callable(spec) and not isinstance(spec, Spec) else None
  sp = cast(Spec, spec) if build is None else build(None)  # build(None): the spec of the dense widths
  now = sp.validate(variables)
  ratios = {g.name: r for g, r in _ratios(sp, ratio, groups)}
  v = variables
  for target in step_widths({g: now[g] for g in ratios}, ratios, steps):
    rel = relative_ratios(now, target)
    if rel:
      pl, flat = _plan(v, sp, rel, fuse=fuse, **options)
      v = _apply_folded(flat, sp, pl, False, is_traced(v))
      if build is not None:
        sp = build({**now, **target})
      now = sp.validate(v)
  return v


def intra_fuse(variables: Variables, spec: Spec, ratio: Ratio, *, groups: GroupSelection = None,
               importance: Any = "l1", solver: str = "exact", target: str = "most_important",
               source_mass: str = "uniform", target_mass: str = "uniform", normalization: str = "paper",
               p: float = 1.0, **options) -> dict:
  """Intra-Fusion: every neuron of each selected group is fused into the m survivors by OT.

  Equal to ``apply_plan(variables, spec, plan(variables, spec, ratio, ...))``; see
  :func:`plan` for the arguments. Returns new, smaller variables with the BNs folded.

  Examples:
    The paper's normalization sums the fused neurons, ``"barycentric"`` averages the producers:

    >>> import numpy as np, ifjax
    >>> variables = {"params": {"hidden": {"kernel": np.array([[1., 0., 3., 0.], [0., 1., 0., 3.]], np.float32)},
    ...                         "out": {"kernel": np.ones((4, 1), np.float32)}}}
    >>> spec = ifjax.Spec([ifjax.Group("hidden", [("params/hidden/kernel", 1)], [("params/out/kernel", 0)])])
    >>> ifjax.intra_fuse(variables, spec, 0.5)["params"]["hidden"]["kernel"]
    Array([[4., 0.],
           [0., 4.]], dtype=float32)
    >>> ifjax.intra_fuse(variables, spec, 0.5, normalization="barycentric")["params"]["hidden"]["kernel"]
    Array([[2., 0.],
           [0., 2.]], dtype=float32)
  """
  kwargs = dict(importance=importance, solver=solver, target=target, source_mass=source_mass,
                target_mass=target_mass, normalization=normalization, p=p, **options)
  if not is_traced(variables) and _map_bytes(variables, spec, ratio, groups) > _STREAM_BYTES:
    return _intra_fuse_by_group(variables, spec, ratio, groups, kwargs)
  pl, flat = _plan(variables, spec, ratio, groups=groups, **kwargs)
  return _apply_folded(flat, spec, pl, False, is_traced(variables))


# dense (n, m) maps of all groups together above which intra_fuse plans and applies one group at a time (an
# LLM's MLP groups: 16 x 8192 x 6144 x 3 maps would be 9.7 GB); the small pinned models never get here
_STREAM_BYTES = 2**30


def _map_bytes(variables: Variables, spec: Spec, ratio: Ratio, groups: GroupSelection) -> int:
  """Bytes of the transport and the two maps a plan holds, float32, over the selected groups."""
  if not isinstance(variables, Mapping) or not isinstance(spec, Spec):
    return 0  # bad input: the regular path raises the precise error
  try:
    flat, pairs = flatten(variables), _ratios(spec, _scalar_ratios(ratio), groups)
    sizes = {g.name: _importance.group_size(flat, g) for g, _ in pairs}
    axes = [(m.path, m.axis % np.ndim(flat[m.path])) for g, _ in pairs for m in g.members]
  except (ValueError, KeyError, TypeError, IndexError, AttributeError):
    return 0  # bad input: the regular path raises the precise error
  if len(axes) != len(set(axes)):
    return 0  # segments of one axis (a concat): their offsets hold only when all are cut together
  return sum(12 * sizes[g.name] * kept_count(sizes[g.name], float(r)) for g, r in pairs)


def _intra_fuse_by_group(variables: Variables, spec: Spec, ratio: Ratio, groups: GroupSelection,
                         kwargs: Mapping[str, Any]) -> dict:
  """:func:`intra_fuse` for groups whose maps would not fit together: each group is planned on the original
  variables (as one plan of all of them would be) and applied to the running result, then its maps are
  dropped. Edits of different groups touch different axes, so the result is the one-plan result (to
  rounding)."""
  out: dict | None = None  # the first group's folded flat variables, then edited group by group
  for g, r in _ratios(spec, _scalar_ratios(ratio), groups):  # not empty: _map_bytes counted its maps
    pl, flat = _plan(variables, spec, {g.name: r}, **kwargs)
    out = dict(flat) if out is None else out
    out = dict(edit_members(out, spec, pl, _apply_roles(spec, out), False))
    pl = flat = None
  assert out is not None
  return to_jax(unflatten(out))


def prune(variables: Variables, spec: Spec, ratio: Ratio, *, groups: GroupSelection = None,
          importance: Any = "l1") -> dict:
  """Default structured pruning (the paper's baseline): keep the m most important neurons of each group.

  Examples:
    The two strongest neurons (2, 3; l1 importance) are kept, the others dropped:

    >>> import numpy as np, ifjax
    >>> variables = {"params": {"hidden": {"kernel": np.array([[1., 0., 3., 0.], [0., 1., 0., 3.]], np.float32)},
    ...                         "out": {"kernel": np.ones((4, 1), np.float32)}}}
    >>> spec = ifjax.Spec([ifjax.Group("hidden", [("params/hidden/kernel", 1)], [("params/out/kernel", 0)])])
    >>> small = ifjax.prune(variables, spec, 0.5)
    >>> small["params"]["hidden"]["kernel"]
    Array([[3., 0.],
           [0., 3.]], dtype=float32)
    >>> ifjax.widths(small, spec)
    {'hidden': 2}
  """
  pl, flat = _plan(variables, spec, ratio, groups=groups, importance=importance, method="default")
  return _apply_folded(flat, spec, pl, False, is_traced(variables))


# -- input checks ------------------------------------------------------------------
def _check_types(variables, spec, ratio, *, importance, fuse, include_bias, **choices) -> None:
  """:class:`ArgumentTypeError` (a TypeError and a ValueError) naming the argument of the wrong type given to
  :func:`plan` / :func:`intra_fuse` / :func:`prune` / :func:`iterative_fuse`; values are checked later."""
  def bad(what, value, want):
    raise ArgumentTypeError(f"{what} must be {want}, got {type(value).__name__} {value!r:.80}")

  real = lambda v: isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
  if not isinstance(variables, Mapping):
    bad("variables", variables, "a Flax variables dict with a 'params' collection")
  if not isinstance(spec, Spec):
    bad("spec", spec, "an ifjax.Spec (ifjax.trace_spec, ifjax.models.get, or written by hand)")
  if not isinstance(ratio, Mapping) and not real(ratio):
    bad("ratio", ratio, "a number in [0, 1) or a dict {group name or paper index: ratio}")
  for k, r in (ratio.items() if isinstance(ratio, Mapping) else ()):
    if not real(r):
      raise ArgumentTypeError(f"ratio for group {k!r} must be a number in [0, 1), got {type(r).__name__} {r!r:.80}")
  if not (isinstance(importance, (str, Mapping)) or callable(importance)):
    bad("importance", importance, "a name, a callable or a dict of scores")
  for what, v in (("fuse", fuse), ("include_bias", include_bias)):
    if not isinstance(v, (bool, np.bool_)):
      bad(what, v, "a bool")
  for what, v in choices.items():
    if not isinstance(v, str):
      bad(what, v, "a str")


def _check_choice(what: str, value: str, options: tuple[str, ...]):
  if value not in options:
    raise ValueError(f"{what} must be one of {options}, got {value!r}")


def _checked(variables: Variables, spec: Spec) -> dict[str, int]:
  """Rejects integer or non-finite arrays among the spec's members and folded BNs; returns
  :meth:`Spec.validate`'s ``{group: neuron count}`` (folding keeps every shape)."""
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise ValueError("variables must be a Flax variables dict with a 'params' collection, "
                     f"got {type(variables).__name__}"
                     + (f" with keys {list(variables)}" if isinstance(variables, Mapping) else ""))
  flat = flatten(variables)
  sizes = spec.validate(variables)
  paths = {m.path for g in spec.groups for m in g.members}
  for b in spec.batchnorms:
    paths |= {f"params/{b.layer}/kernel", f"batch_stats/{b.bn}/mean", f"batch_stats/{b.bn}/var"}
    paths |= {p for p in (f"params/{b.layer}/bias", f"params/{b.bn}/scale", f"params/{b.bn}/bias") if p in flat}
  for path in sorted(paths):
    arr = flat[path]
    dtype = arr.dtype if hasattr(arr, "dtype") else np.result_type(arr)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(f"{path!r} has dtype {dtype}; Intra-Fusion needs floating-point parameters")
    if not isinstance(arr, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(arr, np.float32))):
      raise ValueError(f"{path!r} contains NaN or Inf")
  return sizes


def _by_name(spec: Spec, mapping: Mapping[str, Any] | Mapping[int, Any] | Mapping[str | int, Any],
             what: str) -> dict[str, Any]:
  """``{group name or paper index: value}`` -> ``{group name: value}``; ValueError for an unknown group or one
  given twice (by name and by index)."""
  out, keys = {}, {}
  for k, v in mapping.items():
    try:
      name = spec[k].name
    except ValueError as e:
      raise ValueError(f"{what}={{...}}: {e}") from None
    if name in out:
      raise ValueError(f"{what}={{...}} gives group {name!r} twice (keys {keys[name]!r} and {k!r})")
    out[name], keys[name] = v, k
  return out


def _check_plan(variables: Variables, spec: Spec, plan: Mapping[str, GroupPlan]) -> None:
  """ValueError naming the group unless every ``GroupPlan`` fits its group of n neurons in ``variables``:
  importance (n,), keep (m,) integer indices in [0, n), maps (m, n), 1 <= m <= n. Shapes are static under
  ``jit``; the index range is checked for concrete plans only."""
  if not isinstance(plan, Mapping):
    raise ArgumentTypeError(f"plan must be a dict {{group name: GroupPlan}} (of ifjax.plan), got {type(plan).__name__}")
  if not isinstance(spec, Spec):
    raise ArgumentTypeError(f"spec must be an ifjax.Spec, got {type(spec).__name__}")
  sizes = spec.validate(variables)
  for name, gp in plan.items():
    if name not in sizes:
      raise ValueError(f"plan has group {name!r}, which the spec does not have ({spec.names})")
    if not isinstance(gp, GroupPlan):
      raise ArgumentTypeError(f"plan[{name!r}] must be a GroupPlan, got {type(gp).__name__}")
    n = sizes[name]
    where = f"plan[{name!r}] does not fit group {name!r}, which has {n} neurons in these variables"
    if np.shape(gp.importance) != (n,):
      raise ValueError(f"{where}: its importance has shape {np.shape(gp.importance)}, expected ({n},); was the plan "
                       "made for other variables or another spec?")
    if (gp.producer_map is None) != (gp.consumer_map is None) or (gp.keep is None and gp.producer_map is None):
      raise ValueError(f"{where}: it needs keep (pruning), producer_map and consumer_map (fusion), or all three")
    if gp.keep is not None and (np.ndim(gp.keep) != 1 or not jnp.issubdtype(gp.keep.dtype, jnp.integer)):
      raise ValueError(f"{where}: keep must be a 1-d integer array, got shape {np.shape(gp.keep)} "
                       f"dtype {gp.keep.dtype}")
    m = np.shape(gp.keep)[0] if gp.keep is not None else np.shape(cast(AnyArray, gp.producer_map))[0]
    if not 1 <= m <= n:
      raise ValueError(f"{where}: it keeps {m} neurons, expected 1 to {n}")
    if gp.producer_shift is not None and (gp.producer_map is None or np.shape(gp.producer_shift) != (m,)):
      raise ValueError(f"{where}: producer_shift must be None or of shape ({m},) beside a producer_map, got "
                       f"shape {np.shape(gp.producer_shift)}")
    for field in ("producer_map", "consumer_map"):
      if getattr(gp, field) is not None and np.shape(getattr(gp, field)) != (m, n):
        raise ValueError(f"{where}: {field} has shape {np.shape(getattr(gp, field))}, expected ({m}, {n}) "
                         f"(m = {m} kept of n = {n})")
    if gp.keep is not None and not is_traced(gp.keep):
      lo, hi = int(np.min(gp.keep)), int(np.max(gp.keep))
      if lo < 0 or hi >= n:
        raise ValueError(f"{where}: keep has indices in [{lo}, {hi}], outside [0, {n})")


def _scalar_ratios(ratio: Any) -> Any:
  """NumPy and concrete JAX 0-d numbers (``jnp.float32(0.5)``, ``np.float64(0.3)``), alone or as the values of a
  ratio dict, as Python numbers; anything else (bools, strings, lists) unchanged, for the checks to refuse."""
  if isinstance(ratio, Mapping):
    return {k: python_scalar(r, "iuf", f"ratio for group {k!r}") for k, r in ratio.items()}
  return python_scalar(ratio, "iuf", "ratio")


def _ratios(spec: Spec, ratio: Ratio, groups: GroupSelection) -> list[tuple[Group, float]]:
  ratio = _scalar_ratios(ratio)
  selected = spec.select(groups)
  if isinstance(ratio, Mapping):
    per = _by_name(spec, ratio, "ratio")
    pairs = [(g, per[g.name]) for g in selected if g.name in per]
  else:
    pairs = [(g, ratio) for g in selected]
  for g, r in pairs:
    if isinstance(r, (bool, np.bool_)) or not isinstance(r, (int, float, np.floating, np.integer)):
      raise ScalarTypeError(f"ratio for group {g.name!r} must be a number in [0, 1), got {type(r).__name__} "
                            f"{r!r:.80}")
    if not 0 <= r < 1:
      raise ValueError(f"ratio for group {g.name!r} must be a number in [0, 1), got {r!r}")
  return [(g, float(r)) for g, r in pairs]
