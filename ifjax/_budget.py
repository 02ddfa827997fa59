"""What a network costs (parameters, FLOPs read from XLA's cost analysis) and per-group ratios that meet a budget."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple, cast

import jax
import numpy as np
from scipy.special import ndtr

from ifjax._errors import ArgumentTypeError
from ifjax._fuse import apply_plan, kept_count, plan, relative_ratios
from ifjax._importance import group_size, member_rows
from ifjax._scalars import python_scalar
from ifjax._spec import Spec, Variables, _module_path, flatten, unflatten
from ifjax._trace.resize import resize


def param_count(variables: Mapping[str, Any]) -> int:
  """Number of trainable parameters: the entries of ``variables["params"]`` (of the whole tree if it has no
  ``"params"`` collection). BatchNorm statistics and other collections do not count.

  >>> import jax.numpy as jnp
  >>> param_count({"params": {"fc": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)}},
  ...              "batch_stats": {"bn": {"mean": jnp.ones(4)}}})
  16
  """
  tree = variables["params"] if isinstance(variables, Mapping) and "params" in variables else variables
  return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(tree)))


def flops(apply_fn: Callable[..., Any], variables: Any, *args, **kwargs) -> float:
  """Floating-point operations of one call ``apply_fn(variables, *args, **kwargs)``, from XLA's cost analysis
  of the lowered program (nothing is compiled or run). A multiply-add counts 2 and elementwise ops 1 per
  element; a convolution's taps that fall on its zero padding are not counted, so a 3x3 SAME conv costs a
  little less than the usual ``2 * H * W * 9 * C_in * C_out``.

  Works on any variables, pruned ones included, as long as ``apply_fn`` accepts their shapes (a zoo model
  rebuilt with ``widths=``, or a resized function). Non-array keyword arguments (``train=False``) are static.
  """
  arrays = {k: v for k, v in kwargs.items() if isinstance(v, (jax.Array, np.ndarray))}
  static = {k: v for k, v in kwargs.items() if k not in arrays}
  lowered = jax.jit(lambda v, a, kw: apply_fn(v, *a, **kw, **static)).lower(variables, args, arrays)
  analysis = lowered.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
    analysis = analysis[0] if analysis else {}
  if not analysis or "flops" not in analysis:
    raise RuntimeError(f"XLA's cost analysis gave no FLOP count for this function (got {analysis!r})")
  return float(analysis["flops"])


def _relu_second_moment(mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """``E[relu(X)^2]`` for ``X ~ N(mean, std^2)``, elementwise: ``(mean^2 + std^2) Phi(z) + mean std phi(z)``,
  ``z = mean / std`` (``relu(mean)^2`` where ``std == 0``)."""
  std = np.maximum(std, 1e-12)
  z = mean / std
  return (mean**2 + std**2) * ndtr(z) + mean * std * np.exp(-0.5 * z**2) / np.sqrt(2 * np.pi)


def bn_sensitivity(variables: Variables, spec: Spec, groups: Any = None) -> dict[str, np.ndarray]:
  """Data-free sensitivity of every neuron: the expected squared change of the next layers' normalised outputs
  when the neuron is removed, from the BatchNorm statistics alone. ``{group name: (n,) float64}``.

  A BN normalises its input with the running mean / variance of the training data, so its output for
  channel j has mean ``beta_j`` and standard deviation ``|gamma_j|`` on that data. Taking it Gaussian, the
  activation ``a_j = relu(N(beta_j, gamma_j^2))`` has the closed-form second moment ``E[a_j^2]``. Removing the
  neuron drops ``a_j`` from every consumer; consumer output o changes by ``W[o, j] * a_j`` before its BN and by
  ``g_o W[o, j] a_j`` after it (``g_o = gamma_o / sqrt(var_o + eps)``), so, with the activations taken
  uncorrelated, the expected squared change summed over the consumers' outputs (and kernel taps) is

      s_j = E[a_j^2] * sum_consumers sum_o g_o^2 ||W[o, j]||^2.

  Everything is in units of the consumers' normalised (unit-variance) outputs, so scores compare across
  groups and layers. A neuron written by several producers (a residual stream: the stem and every block's
  last conv) gets the sum of their independent contributions, mean ``sum beta`` and variance
  ``sum gamma^2``. A producer without a BN counts ``||w_j||^2 + b_j^2`` (unit-variance inputs); a consumer
  without a BN counts ``g_o = 1``; a group without weight consumers gets gain 1.
  """
  flat = flatten(variables)
  bn_of = {b.layer: b for b in spec.batchnorms}

  def affine(layer: str, n_all: int):
    b = bn_of.get(layer)
    if b is None:
      return None
    gamma = np.asarray(flat.get(f"params/{b.bn}/scale", np.ones(n_all)), np.float64)
    beta = np.asarray(flat.get(f"params/{b.bn}/bias", np.zeros(n_all)), np.float64)
    path = f"batch_stats/{b.bn}/var"
    var = np.asarray(flat[path], np.float64)
    bad = ~np.isfinite(var) | (var < 0)
    if bad.any():
      j = int(np.argmax(bad))
      raise ValueError(f"bn_sensitivity: variables[{path!r}] must hold finite, non-negative BatchNorm running "
                       f"variances, got {var[j]} at channel {j} ({int(bad.sum())} of {var.size} bad)")
    return gamma, beta, gamma / np.sqrt(var + b.eps)

  out = {}
  for g in spec.select(groups):
    n = group_size(flat, g)
    mean, var = np.zeros(n), np.zeros(n)
    for m in g.producers:
      arr = flat[m.path]
      if np.ndim(arr) < 2:
        continue
      layer = _module_path(m.path).rsplit("/", 1)[0]
      bn = affine(layer, np.shape(arr)[-1]) if m.axis == np.ndim(arr) - 1 else None
      if bn is not None:
        mean += bn[1][m.offset:m.offset + n]
        var += bn[0][m.offset:m.offset + n] ** 2
      else:
        var += np.sum(np.asarray(member_rows(flat, m, n), np.float64) ** 2, axis=1)
        bias = flat.get(m.path.rsplit("/", 1)[0] + "/bias")
        if bias is not None:
          mean += np.asarray(bias, np.float64)[m.offset:m.offset + n]
    gain = np.zeros(n)
    for m in g.consumers:
      arr = flat[m.path]
      if np.ndim(arr) < 2:
        continue
      rows = np.asarray(member_rows(flat, m, n), np.float64) ** 2  # (n, d), output channels innermost
      bn = affine(_module_path(m.path).rsplit("/", 1)[0], np.shape(arr)[-1])
      if m.axis == np.ndim(arr) - 1:  # the neuron is the consumer's output channel (a depthwise conv)
        scale = bn[2][m.offset:m.offset + n] ** 2 if bn is not None else np.ones(n)
        gain += rows.sum(axis=1) * scale
      else:
        scale = bn[2] ** 2 if bn is not None else np.ones(np.shape(arr)[-1])
        gain += (rows.reshape(n, -1, np.shape(arr)[-1]) * scale).sum(axis=(1, 2))
    if not gain.any():
      gain = np.ones(n)
    out[g.name] = _relu_second_moment(mean, np.sqrt(var)) * gain
  return out


def resized_shapes(shapes: Any, spec: Spec, removed: Mapping[str, int]) -> Any:
  """The ``jax.ShapeDtypeStruct`` tree of ``apply_plan``'s output when group g loses ``removed[g]`` neurons:
  every member axis of g shrinks by that many neurons (times ``outer * inner`` on a flattened axis), and a
  BatchNorm's arrays follow its layer's output axis. ``shapes``: the dense tree (e.g. ``jax.eval_shape``
  of a plan that keeps everything), so no weights are touched."""
  flat = dict(flatten(shapes))
  dims = {p: list(s.shape) for p, s in flat.items()}
  for g in spec.groups:
    for m in g.members if removed.get(g.name) else ():
      dims[m.path][m.axis] -= removed[g.name] * m.outer * m.inner
  for b in spec.batchnorms:
    out = dims[f"params/{b.layer}/kernel"][-1]
    for p in (f"params/{b.bn}/scale", f"params/{b.bn}/bias", f"batch_stats/{b.bn}/mean", f"batch_stats/{b.bn}/var"):
      if p in dims:
        dims[p][-1] = out
  return unflatten({p: jax.ShapeDtypeStruct(tuple(dims[p]), s.dtype) for p, s in flat.items()})


def hull_scores(curves: Any, sizes: Mapping[str, int]) -> dict[str, np.ndarray]:
  """``{group: (n,) scores}`` from measured curves: the slopes of the lower convex hull of (neurons removed,
  loss), one per neuron in removal order (increasing), so that "remove the neurons scoring below a cut"
  follows the hull. Beyond the last probe the last slope continues."""
  missing = [g for g in sizes if g not in curves.loss]
  if missing:
    raise ValueError(f"curves has no measurement for groups {missing}: measure_sensitivity(groups=...) must "
                     f"cover every group allocate may prune")
  out = {}
  for g, n in sizes.items():
    if curves.size[g] != n:
      raise ValueError(f"curves were measured on group {g!r} at width {curves.size[g]}, but it has {n} neurons")
    removed = np.concatenate([[0], n - np.asarray(curves.kept[g])]).astype(np.float64)
    loss = np.concatenate([[0.0], np.asarray(curves.loss[g], np.float64)])
    order = np.argsort(removed, kind="stable")
    hull = [0]
    for i in order[1:]:
      if removed[i] == removed[hull[-1]]:
        continue
      while len(hull) >= 2 and ((loss[hull[-1]] - loss[hull[-2]]) * (removed[i] - removed[hull[-2]])
                                >= (loss[i] - loss[hull[-2]]) * (removed[hull[-1]] - removed[hull[-2]])):
        hull.pop()
      hull.append(i)
    if len(hull) == 1:  # no probe removed a neuron (a tiny group): nothing is known, keep it
      out[g] = np.full(n, np.inf)
      continue
    scores, done = np.empty(n), 0
    for a, b in zip(hull, hull[1:]):
      slope = (loss[b] - loss[a]) / (removed[b] - removed[a])
      scores[done:int(removed[b])] = slope
      done = int(removed[b])
    scores[done:] = slope
    # strictly increasing in removal order, so a cut removes a segment's neurons one at a time
    out[g] = scores + np.arange(n) * 1e-9 * (np.abs(scores).max() + 1e-30)
  return out


class Allocation(NamedTuple):
  """A per-group sparsity that meets a budget.

  Attributes:
    ratios: ``{group name: ratio}`` for :func:`ifjax.plan` / ``intra_fuse`` / ``prune``; every group that
      is not protected is present (0.0 where it keeps everything).
    kept: ``{group name: neurons kept}`` (what the ratios give with :func:`ifjax.kept_count`).
    cost: the budgeted quantity reached (params or FLOPs).
    dense_cost: the same quantity of the unpruned network.
    target: the budget asked for.
  """

  ratios: dict[str, float]
  kept: dict[str, int]
  cost: float
  dense_cost: float
  target: float


def allocate(variables: Variables, spec: Spec, *, target_params: float | None = None,
             target_flops: float | None = None, method: str = "uniform",
             rebuild: Callable[[dict], Callable] | None = None, apply_fn: Callable[..., Any] | None = None,
             example_args: tuple = (),
             example_kwargs: Mapping[str, Any] | None = None, importance: Any = "l1",
             protect: Iterable[str | int] = (), groups: Any = None, curves: Any = None) -> Allocation:
  """Per-group ratios whose pruned network costs at most the target, for ``plan(variables, spec, ratios)``.

  Args:
    variables: the dense Flax variables.
    spec: their :class:`ifjax.Spec`.
    target_params: parameters to keep at most (an int), or a fraction of the dense count if < 1.
    target_flops: FLOPs of one call at most, or a fraction of the dense FLOPs if < 1; needs ``rebuild``
      (``widths -> apply_fn`` of the network at those widths, e.g. ``lambda w: models.get(name, widths=w)[0].apply``)
      or ``apply_fn`` (the dense network's ``apply_fn(variables, *example_args, **example_kwargs)``, e.g. the
      function given to :func:`ifjax.trace_spec`: the pruned networks are run through :func:`ifjax.resize`, so a
      model of your own needs no rebuild), and ``example_args`` / ``example_kwargs`` for the call (``train=False``).
    rebuild: ``widths -> apply_fn`` of the network at those widths, for ``target_flops``.
    apply_fn: the dense network's apply function, for ``target_flops`` without ``rebuild``.
    example_args: the positional arguments of the call whose FLOPs are counted (after the variables).
    example_kwargs: its keyword arguments.
    method: ``"uniform"``, one ratio for every selected group (the largest-kept one that meets the budget);
      ``"global"``, the neurons of all selected groups ranked together by importance (each group's scores
      divided by their mean, as the built-in importances are), the least important removed first
      (Torch-Pruning's global pruning); ``"sensitivity"``, data-free: each neuron's :func:`bn_sensitivity`
      (the expected squared change of the next layers' normalised outputs if it is removed, from the BN
      statistics) divided by what one neuron of its group costs (the budgeted quantity; FLOPs from XLA), and
      the neurons with the smallest sensitivity per unit of cost removed first. Removing neuron j of group g
      then costs ``s_j`` and saves ``c_g``; with the neurons taken independent, the total sensitivity is
      additive, and cutting every neuron with ``s_j < lambda * c_g`` (``lambda`` the smallest that meets the
      budget) is the Lagrangian solution of "least total sensitivity at this cost". Unlike ``"global"`` it
      compares groups in one unit (normalised output energy, not importance divided by the group's mean) and
      prefers cutting where a neuron is expensive (early, high-resolution layers). The per-neuron cost depends
      on the neighbours' widths, so it is measured twice: at the dense widths, then at the first allocation;
      ``"measured"``, the same per-unit-of-cost rule on ``curves`` (:func:`ifjax.measure_sensitivity`: the KL
      divergence of the predictions with each group pruned alone at a few ratios). Each group's curve, loss
      against neurons removed (linear between the probes, the last slope beyond them), is replaced by its
      lower convex hull, whose slopes are the per-neuron scores: with the losses of the groups taken additive,
      cutting every neuron whose slope per unit of cost is below ``lambda`` is again the Lagrangian solution.
    importance: the neuron importance, as :func:`ifjax.plan` takes it (default ``"l1"``).
    protect: groups (names or paper indices) that keep every neuron.
    groups: the groups that may be pruned (default all); ``protect`` is taken out of them.
    curves: the :func:`ifjax.measure_sensitivity` result, for ``method="measured"`` (and only then).

  Every group keeps at least one neuron. The budget is met to within one neuron per group: the next step,
  one more neuron in every group (uniform) or the last neuron removed (global, sensitivity), would exceed it. A budget
  below what the network costs with one neuron per group raises ``ValueError`` with that minimum.
  """
  if not isinstance(variables, Mapping):
    raise ArgumentTypeError(f"allocate: variables must be a Flax variables dict, got {type(variables).__name__}")
  if not isinstance(spec, Spec):
    raise ArgumentTypeError(f"allocate: spec must be an ifjax.Spec, got {type(spec).__name__}")
  if not isinstance(method, str):
    raise ArgumentTypeError(f"allocate: method must be a str, got {type(method).__name__}")
  if not isinstance(example_args, (tuple, list)):
    raise ArgumentTypeError(f"allocate: example_args must be a tuple of the call's positional arguments, got "
                            f"{type(example_args).__name__}")
  if example_kwargs is not None and not isinstance(example_kwargs, Mapping):
    raise ArgumentTypeError(f"allocate: example_kwargs must be a dict, got {type(example_kwargs).__name__}")
  if (target_params is None) == (target_flops is None):
    raise ValueError("allocate needs exactly one of target_params= or target_flops=")
  what = "target_params" if target_params is not None else "target_flops"
  given = python_scalar(target_params if target_params is not None else target_flops, "iuf", f"allocate: {what}")
  if isinstance(given, bool) or not isinstance(given, (int, float)):
    raise TypeError(f"allocate: {what} must be a number, got {type(given).__name__} {given!r:.80}")
  if not (math.isfinite(given) and given > 0):
    raise ValueError(f"allocate: {what} must be a finite number > 0 (a budget, or a fraction of the dense cost if "
                     f"< 1), got {given!r}")
  target_params, target_flops = (given, None) if target_params is not None else (None, given)
  if method not in ("uniform", "global", "sensitivity", "measured"):
    raise ValueError(f"method must be 'uniform', 'global', 'sensitivity' or 'measured', got {method!r}")
  if (method == "measured") != (curves is not None):
    raise ValueError("method='measured' needs curves=measure_sensitivity(...), and curves= needs method='measured'")
  if target_flops is not None and (rebuild is None) == (apply_fn is None):
    raise ValueError("target_flops needs rebuild=widths -> apply_fn (e.g. a zoo model rebuilt at those widths) or "
                     "apply_fn= (the dense model's apply function, run at the pruned widths by ifjax.resize), not "
                     "both, and the example inputs of one call")
  for what, fn in (("rebuild", rebuild), ("apply_fn", apply_fn)):
    if fn is not None and not callable(fn):
      raise ArgumentTypeError(f"allocate: {what} must be callable, got {type(fn).__name__}")
  protected = {spec[p].name for p in protect}
  selected = [g.name for g in spec.select(groups) if g.name not in protected]
  if not selected:
    raise ValueError("allocate: every selected group is protected; nothing to prune")
  full = plan(variables, spec, 0.0, groups=selected, importance=importance, method="default")
  sizes = {g: p.n for g, p in full.items()}
  dense_widths = spec.validate(variables)
  kwargs = dict(example_kwargs or {})

  def ratios_of(kept: Mapping[str, int]) -> dict[str, float]:
    return {**{g: 0.0 for g in kept}, **relative_ratios(sizes, kept)}

  dense_shapes = jax.eval_shape(lambda v: apply_plan(v, spec, full), variables)
  memo: dict[tuple, float] = {}
  resized = None
  if target_flops is not None and rebuild is None:  # one resized function, re-evaluated at each set of widths
    resized = resize(cast(Callable[..., Any], apply_fn), dense_shapes, dense_shapes, *example_args, **kwargs)  # checked

  def cost(kept: Mapping[str, int]) -> float:
    key = tuple(sorted(kept.items()))
    if key not in memo:
      shapes = resized_shapes(dense_shapes, spec, {g: sizes[g] - k for g, k in kept.items()})
      memo[key] = float(param_count(shapes)) if target_params is not None else \
          flops(cast(Callable[..., Any], resized) if rebuild is None else rebuild({**dense_widths, **kept}), shapes,
                *example_args, **kwargs)
    return memo[key]

  dense = cost(sizes)
  target = float(cast(float, target_params if target_params is not None else target_flops))  # one is given
  if target < 1:
    target *= dense
  smallest = cost({g: 1 for g in sizes})
  if smallest > target:
    raise ValueError(f"the budget {target:.6g} is below what the network costs with one neuron per selected group "
                     f"({smallest:.6g}; dense {dense:.6g}): protect fewer groups, select more, or raise the target")

  def pooled(scores: Mapping[str, np.ndarray]):
    ranked = np.sort(np.concatenate(list(scores.values())))

    def candidates(t):  # t in [0, 1): the fraction of all pooled neurons removed, lowest scores first
      cut = ranked[min(len(ranked) - 1, int(t * len(ranked)))] if t > 0 else -np.inf
      return {g: max(1, int(np.sum(s > cut)) if t > 0 else len(s)) for g, s in scores.items()}
    return candidates

  def search(candidates):
    # candidates(0) is the dense network and candidates(1) one neuron per group:
    # cost(candidates(lo)) > target >= cost(candidates(hi)) unless the dense network already fits
    lo, hi = (0.0, 0.0) if dense <= target else (0.0, 1.0)
    for _ in range(30):
      if hi - lo < 1e-6:
        break
      mid = (lo + hi) / 2
      if cost(candidates(mid)) <= target:
        hi = mid
      else:
        lo = mid
    return candidates(hi)

  if method == "uniform":
    kept = search(lambda t: {g: max(1, kept_count(n, t)) for g, n in sizes.items()})  # t = the common ratio
  elif method == "global":
    kept = search(pooled({g: np.asarray(full[g].importance, np.float64) / max(float(np.mean(full[g].importance)), 1e-30)
                          for g in sizes}))
  else:
    sens = bn_sensitivity(variables, spec, list(sizes)) if method == "sensitivity" else hull_scores(curves, sizes)
    kept = dict(sizes)
    for _ in range(2):  # the cost of one neuron of g, at the current widths (costs are linear in each width)
      at = cost(kept)
      unit = {g: 1.0 if n == 1 else abs(at - cost({**kept, g: kept[g] - 1})) if kept[g] > 1
              else abs(cost({**kept, g: 2}) - at) for g, n in sizes.items()}
      kept = search(pooled({g: sens[g] / max(unit[g], 1e-30) for g in sizes}))
  reached = cost(kept)
  return Allocation(ratios_of(kept), kept, reached, dense, target)
