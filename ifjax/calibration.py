"""Activation-aware pruning from calibration data: what each group's consumers read, and what to do with it.

A group's neurons are read by its consumer layers (a Dense's input features, a conv's input channels). On a few
calibration batches :func:`consumer_statistics` records, per consumer, the mean and the mean square of every
input feature and a sample of the inputs. From them:

- :func:`wanda`: Wanda-sp importance (the structured Wanda of An et al., AAAI 2024): ``sum |W| * sqrt(E[x^2])``
  over a neuron's consumer weights;
- :func:`flap`: FLAP's fluctuation importance (An et al., AAAI 2024): ``sum Var[x] * W^2``;
- :func:`compensate_bias`: FLAP's bias compensation. Each consumer's bias takes the expected contribution of
  what the plan removed, ``b += E[x] . W (dense) - E[x]_kept . W (small)``, so that the consumer's mean output
  is kept. Exact in expectation for plain pruning; for a fused plan the kept neurons' dense means stand in for
  the fused neurons' means (an approximation);
- :func:`least_squares_merge`: each removed neuron's consumer weights go to the kept neurons by the least-squares
  regression of its input on theirs (ThiNet / CP-style reconstruction, as a fusion map of its own);
- :func:`refit_consumers`: the same least squares on the consumers' input features, for any consumer (attention
  heads too), applied to the pruned variables;
- :meth:`Statistics.features`: per neuron, its sampled consumer inputs, (n, d): an activation-space OT cost for
  Intra-Fusion (``ifjax.plan(..., features=stats.features(variables))``).

All of these need data; the weight-magnitude importances and ``paper`` / ``barycentric`` fusion do not.
Consumers must be ``flax.linen`` ``Dense``, ``DenseGeneral`` or ``Conv`` layers: their inputs are read with
``flax.linen.intercept_methods``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ifjax._errors import IfjaxError
from ifjax._fuse import Plan, apply_plan
from ifjax._importance import group_size
from ifjax._spec import AnyArray, FlatMember, Group, Member, Spec, Variables, flatten, member_rows, unflatten


class CalibrationError(IfjaxError, ValueError):
  """Calibration data or a consumer layer that activation-aware pruning cannot use."""


class ConsumerStatistics(NamedTuple):
  """What one consumer layer read on the calibration data.

  Attributes:
    axes: the kernel axes the layer contracts with its input (a Dense: (0,); a conv: (ndim - 2,)).
    mean: the contracted shape (``kernel.shape[axes]``): E[x] per input feature, over every batch, token and
      pixel.
    square: same shape: E[x^2].
    samples: (*mean.shape, s): the input at ``s`` sampled positions.
    count: how many positions the means are over.
    gram: (F, F) E[x x^T] over the F = mean.size input features (flattened), or None (``gram=False``).
  """

  axes: tuple[int, ...]
  mean: np.ndarray
  square: np.ndarray
  samples: np.ndarray
  count: int
  gram: np.ndarray | None = None

  def laid_out(self, values: np.ndarray, kernel_ndim: int) -> np.ndarray:
    """``values`` (contracted shape, *extra) with size-1 axes where the kernel has axes it does not contract,
    so that it broadcasts against the kernel (and ``member_rows`` reads a member's neurons from it)."""
    shape = [1] * kernel_ndim
    for a, size in zip(self.axes, values.shape):
      shape[a] = size
    return values.reshape(*shape, *values.shape[len(self.axes):])


class Statistics(dict):
  """``{consumer kernel path: ConsumerStatistics}`` for the groups of :attr:`spec` (:func:`consumer_statistics`)."""

  def __init__(self, entries: Mapping[str, ConsumerStatistics], spec: Spec):
    """``entries`` by kernel path; ``spec``: the spec whose consumers they are."""
    super().__init__(entries)
    self.spec = spec

  def features(self, variables: Variables) -> dict[str, np.ndarray]:
    """``{group: (n, d)}``: per neuron, its consumers' sampled inputs, concatenated (``plan(features=)``)."""
    flat = flatten(variables)
    out = {}
    for g in self.spec.groups:
      n = group_size(flat, g)
      rows = [member_rows({m.path: self[m.path].laid_out(self[m.path].samples, np.ndim(flat[m.path]))}, m, n)
              for m in _read_members(flat, g, self)]
      if rows:
        out[g.name] = np.concatenate(rows, axis=1)
    return out


def _read_members(flat, g: Group, stats: Mapping[str, Any]) -> list[Member | FlatMember]:
  """The group's consumer kernel members whose layer's input was recorded."""
  return [m for m in g.consumers if m.path in stats and np.ndim(flat[m.path]) >= 2]


def _contracted(module: nn.Module, kernel_ndim: int) -> tuple[int, ...]:
  """The kernel axes a layer contracts with its input's last axes."""
  if isinstance(module, nn.Dense):
    return (0,)
  if isinstance(module, nn.DenseGeneral):
    axis = module.axis if isinstance(module.axis, tuple) else (module.axis,)
    return tuple(range(len(axis)))
  if isinstance(module, nn.Conv):
    return (kernel_ndim - 2,)
  raise CalibrationError(f"consumer {'/'.join(module.path)!r} is a {type(module).__name__}; activation-aware "
                         "pruning reads the inputs of nn.Dense, nn.DenseGeneral and nn.Conv consumers")


def consumer_statistics(apply_fn: Callable[..., Any], variables: Variables, spec: Spec, batches: Iterable[Any], *,
                        samples: int = 256, seed: int = 0, gram: bool = False, **apply_kwargs) -> Statistics:
  """Records what every consumer layer of ``spec``'s groups reads on ``batches``.

  Args:
    apply_fn: a ``flax.linen`` module's ``apply`` (its consumers are Dense, DenseGeneral or Conv layers).
    variables: the dense model's variables.
    spec: the group spec; consumer members ``params/<layer path>/kernel`` name the layers to read.
    batches: the calibration inputs: each item is the positional argument of ``apply_fn`` after the variables,
      or a tuple of them (e.g. ``(token_ids, attention_mask)``).
    samples: positions sampled per consumer for :meth:`Statistics.features` (uniformly, without replacement,
      from the first batch's positions).
    seed: the sampling seed.
    gram: also record each consumer's (F, F) second-moment matrix (for :func:`least_squares_merge` and
      :func:`refit_consumers`).
    **apply_kwargs: passed to ``apply_fn`` (static: ``train=False``).

  Returns:
    :class:`Statistics` by consumer kernel path.

  Each batch runs one compiled program (one per batch shape) that returns the sums, not the activations.
  """
  flat = flatten(variables)
  wanted = {}
  for g in spec.groups:
    for m in g.consumers:
      if m.path.startswith("params/") and m.path.endswith("/kernel") and m.path in flat \
         and np.ndim(flat[m.path]) >= 2:
        wanted[tuple(m.path[len("params/"):-len("/kernel")].split("/"))] = m.path
  if not wanted:
    raise CalibrationError("the spec has no consumer kernels 'params/<layer>/kernel' whose inputs could be read")
  batches = list(batches)
  if not batches:
    raise CalibrationError("batches is empty: activation-aware pruning needs at least one calibration batch")
  rng = np.random.default_rng(seed)
  axes_of: dict[str, tuple[int, ...]] = {}  # filled while tracing (static)
  picks: dict[str, np.ndarray] = {}  # the first batch's sampled positions, chosen while tracing it

  def moments(variables, *args, first: bool):
    seen: dict[str, jax.Array] = {}

    def record(next_fun, call_args, call_kwargs, context):
      module = context.module
      if context.method_name == "__call__" and tuple(module.path) in wanted:
        path = wanted[tuple(module.path)]
        axes_of[path] = _contracted(module, np.ndim(flat[path]))
        seen[path] = call_args[0]
      return next_fun(*call_args, **call_kwargs)

    with nn.intercept_methods(record):
      apply_fn(variables, *args, **apply_kwargs)
    out = {}
    for path, x in seen.items():
      k = len(axes_of[path])
      x = jnp.asarray(x, jnp.float32)
      x = x.reshape(-1, *x.shape[x.ndim - k:])  # (positions, contracted shape)
      entry = {"sum": x.sum(0), "square": jnp.square(x).sum(0), "count": jnp.asarray(x.shape[0])}
      if gram:
        fx = x.reshape(x.shape[0], -1)
        entry["gram"] = jnp.matmul(fx.T, fx, precision=jax.lax.Precision.HIGHEST)
      if first:
        if path not in picks:
          picks[path] = np.sort(rng.choice(x.shape[0], size=min(samples, x.shape[0]), replace=False))
        entry["samples"] = jnp.moveaxis(x[picks[path]], 0, -1)
      out[path] = entry
    return out

  compiled = {first: jax.jit(lambda v, *a, first=first: moments(v, *a, first=first)) for first in (True, False)}
  totals: dict[str, dict[str, Any]] = {}
  for i, batch in enumerate(batches):
    args = batch if isinstance(batch, tuple) else (batch,)
    got = compiled[i == 0](variables, *args)
    missing = sorted(p for p in wanted.values() if p not in got)
    if missing:
      raise CalibrationError(f"no call of the consumer layers {missing} was seen: is apply_fn a flax.linen "
                             "module's apply, and are these layers called on this input?")
    for path, entry in got.items():
      acc = totals.setdefault(path, {"samples": np.asarray(entry.get("samples"))})
      for key in ("sum", "square", "gram", "count"):
        if key in entry:
          acc[key] = acc.get(key, 0) + np.asarray(entry[key], np.float64)
  out = {}
  for path, acc in totals.items():
    c = float(acc["count"])
    out[path] = ConsumerStatistics(axes_of[path], (acc["sum"] / c).astype(np.float32),
                                   (acc["square"] / c).astype(np.float32), acc["samples"].astype(np.float32),
                                   int(c), acc["gram"] / c if gram else None)
  return Statistics(out, spec)


def _score(stats: Statistics, per_entry: Callable[[AnyArray, ConsumerStatistics, int], AnyArray]):
  """An importance: per consumer, ``per_entry(kernel, stats, ndim)`` laid out like the kernel, summed over each
  neuron's entries; averaged over the consumers and divided by the mean (as the built-in importances)."""

  def fn(variables: Variables, group: Group) -> AnyArray:
    flat = flatten(variables)
    members = _read_members(flat, group, stats)
    if not members:
      raise CalibrationError(f"group {group.name!r}: none of its consumers was recorded by consumer_statistics")
    n = group_size(flat, group)
    scores = []
    for m in members:
      kernel = np.asarray(flat[m.path], np.float32)
      values = per_entry(kernel, stats[m.path], kernel.ndim)
      scores.append(member_rows({m.path: np.broadcast_to(values, kernel.shape)}, m, n).sum(axis=1))
    s = np.mean(scores, axis=0)
    mean = s.mean()
    return (s / mean if mean > 0 else s).astype(np.float32)

  return fn


def wanda(stats: Statistics):
  """Wanda-sp importance: per neuron, ``sum |W| * sqrt(E[x^2])`` over its consumers' weights (needs data)."""
  return _score(stats, lambda w, st, nd: np.abs(w) * st.laid_out(np.sqrt(st.square), nd))


def flap(stats: Statistics):
  """FLAP's fluctuation importance: per neuron, ``sum Var[x] * W^2`` over its consumers' weights (needs data)."""
  return _score(stats, lambda w, st, nd: np.square(w) * st.laid_out(np.maximum(st.square - st.mean ** 2, 0), nd))


def _cut(flat: Mapping[str, Any], spec: Spec, plan: Plan, arrays: Mapping[str, Any],
         keep: Callable[[Any], Any]) -> dict[str, Any]:
  """Kernel-shaped ``arrays`` (by kernel path, at the dense shapes) cut as the plan cuts the kernels, to the
  entries ``keep(group plan)`` names, without fusing: flat, by path."""
  selection = Plan({name: gp._replace(keep=keep(gp), transport=None, producer_map=None, consumer_map=None,
                                      producer_shift=None) for name, gp in plan.items()}, plan.source_spec, None)
  return flatten(apply_plan(unflatten({**flat, **arrays}), spec, selection))


def _ridge_solve(gram: np.ndarray, rows: np.ndarray, rhs: np.ndarray, ridge: float) -> np.ndarray:
  """``(G[rows, rows] + lam I)^-1 rhs`` with ``lam = ridge * mean(diag G[rows, rows])``: the least-squares fit on
  the input features ``rows`` from their second moments ``gram``."""
  g = gram[np.ix_(rows, rows)]
  lam = ridge * max(float(np.mean(np.diag(g))), 1e-12)
  return np.linalg.solve(g + lam * np.eye(len(rows)), rhs)


def compensate_bias(small: Variables, variables: Variables, spec: Spec, plan: Plan, stats: Statistics,
                    small_stats: Statistics | None = None) -> dict:
  """``small`` with every recorded consumer's bias corrected by what the plan removed (FLAP's compensation).

  For a consumer kernel ``W`` (dense) / ``W'`` (after the plan) with contracted input means ``E[x]`` (dense) and
  ``E[x']`` (small): ``b' = b + sum(E[x] * W) - sum(E[x'] * W')``, summed over the contracted axes, so the
  consumer's mean output on the calibration data is the dense one's. ``E[x']`` comes from ``small_stats`` where
  given (exact for any method): :func:`consumer_statistics` of the small model, or of the dense module run on
  ``apply_plan(..., keep_shapes=True)`` variables (the m neurons in the first m slots; read back from there).
  Without it, ``E[x']`` is the dense ``E[x]`` cut by the plan's keep sets: exact for plain pruning (the kept
  neurons are unchanged), an approximation for fused ones (refused for the ``cluster_centroid`` target, which
  keeps no neuron). A consumer without a bias raises :class:`CalibrationError` naming it.
  """
  flat, small_flat = flatten(variables), dict(flatten(small))
  paths = sorted({m.path for name in plan for m in _read_members(flat, spec[name], stats)})

  def laid_out(st: Statistics, at: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {p: np.broadcast_to(st[p].laid_out(st[p].mean, np.ndim(at[p])), np.shape(at[p])) for p in paths}

  means = laid_out(stats, flat)
  if small_stats is not None:
    missing = [p for p in paths if p not in small_stats]
    if missing:
      raise CalibrationError(f"small_stats has no statistics for the consumers {missing}")
    full = [p for p in paths if small_stats[p].mean.shape == stats[p].mean.shape != tuple(
        np.shape(small_flat[p])[a] for a in stats[p].axes)]
    small_means = {p: small_stats[p].laid_out(small_stats[p].mean, np.ndim(small_flat[p])) for p in paths}
    if full:  # measured on keep_shapes variables: the m neurons sit in the first m slots
      first = _cut(flat, spec, plan, laid_out(small_stats, flat), lambda gp: np.arange(gp.m, dtype=np.int32))
      small_means.update({p: first[p] for p in full})
  else:
    for name, gp in plan.items():
      if gp.keep is None:
        raise CalibrationError(f"group {name!r}: without small_stats, compensate_bias needs the plan's kept "
                               "neurons; the cluster_centroid target has none")
    small_means = _cut(flat, spec, plan, means, lambda gp: gp.keep)
  for p in paths:
    bias = p[:-len("kernel")] + "bias"
    if bias not in small_flat:
      layer = p[len("params/"):-len("/kernel")]
      raise CalibrationError(f"consumer {layer!r} has no bias to compensate into (build the layer with "
                             "use_bias=True, a zero bias, to use compensate_bias)")
    axes = stats[p].axes
    dense = np.sum(means[p] * np.asarray(flat[p], np.float32), axis=axes)
    kept = np.sum(np.asarray(small_means[p]) * np.asarray(small_flat[p], np.float32), axis=axes)
    if dense.shape != kept.shape:
      raise CalibrationError(f"consumer {p!r}: the plan changes its output width ({dense.shape} -> {kept.shape}); "
                             "compensate_bias corrects consumers whose outputs the plan leaves alone")
    small_flat[bias] = jnp.asarray(np.asarray(small_flat[bias], np.float32) + dense - kept,
                                   jnp.asarray(small_flat[bias]).dtype)
  return unflatten(small_flat)


def least_squares_merge(plan: Plan, variables: Variables, spec: Spec, stats: Statistics, *, ridge: float = 1e-3,
                        centered: bool | None = None) -> Plan:
  """A plain-pruning ``plan`` whose consumers also take the removed neurons, by least squares on calibration data.

  For a group read as single input features by one recorded consumer (an MLP's hidden neurons), removed
  neuron j's input ``x_j`` is regressed on the kept neurons' inputs ``X_k``: ``x_j ~ X_k t_j``, with ridge
  ``ridge * mean(diag)`` (and with an intercept when ``centered``: the covariance instead of the second moment).
  The consumer map becomes ``T = [t_j]`` (kept columns the identity), so the consumer computes ``X_k T W``, the
  best linear stand-in for ``X W`` on the calibration data; the producers are pruned as the plan says. With
  ``centered``, follow it with :func:`compensate_bias` (no ``small_stats`` needed: the kept neurons are the
  dense ones) for the intercept. Default ``centered``: True where the consumer has a bias.

  Needs ``stats`` from :func:`consumer_statistics` with ``gram=True``. Groups the plan fuses
  (``producer_map`` set), or whose consumer reads several features per neuron (attention heads), raise
  :class:`CalibrationError`.
  """
  flat = flatten(variables)
  out = {}
  for name, gp in plan.items():
    members = _read_members(flat, spec[name], stats)
    if gp.producer_map is not None or gp.keep is None:
      raise CalibrationError(f"group {name!r}: least_squares_merge takes a plain-pruning plan (method='default')")
    if len(members) != 1 or members[0].inner != 1 or members[0].outer != 1 or len(stats[members[0].path].axes) != 1:
      raise CalibrationError(f"group {name!r}: least_squares_merge needs one recorded consumer that reads each "
                             "neuron as one input feature (an MLP's hidden layer)")
    m = members[0]
    st = stats[m.path]
    if st.gram is None:
      raise CalibrationError("least_squares_merge needs consumer_statistics(..., gram=True)")
    n, keep = gp.n, np.asarray(gp.keep)
    idx = m.offset + np.arange(n)
    g = st.gram[np.ix_(idx, idx)].astype(np.float64)
    has_bias = m.path[:-len("kernel")] + "bias" in flat
    if centered if centered is not None else has_bias:
      mu = st.mean[idx].astype(np.float64)
      g = g - np.outer(mu, mu)
    t = _ridge_solve(g, keep, g[keep], ridge)  # (m, n): column j regresses x_j on X_k
    t[:, keep] = np.eye(len(keep))
    select = np.zeros((len(keep), n), np.float32)
    select[np.arange(len(keep)), keep] = 1.0
    out[name] = gp._replace(producer_map=select, consumer_map=t.astype(np.float32), transport=None)
  return Plan(out, plan.source_spec, plan._sizes, plan._ndims)


def refit_consumers(small: Variables, variables: Variables, spec: Spec, plan: Plan, stats: Statistics, *,
                    ridge: float = 1e-3, centered: bool | None = None) -> dict:
  """``small`` with each recorded consumer of a plain-pruning ``plan`` refitted by least squares.

  The consumer's kept input features ``X_k`` (every feature of the kept neurons: a head's dims included) take
  over the removed ones: ``W' = argmin ||X W - X_k W'||^2 + ridge * mean(diag) ||W'||^2`` on the calibration
  data, i.e. ``W' = (G_kk + lam)^-1 G_k: W`` with ``G`` the inputs' second moments (covariance when
  ``centered``, which also sets the bias to the intercept; default: where the consumer has a bias). For an
  MLP this is :func:`least_squares_merge` applied; for attention heads it merges the removed heads' dims into
  the kept heads' dims, which no (m, n) neuron map can express. Needs ``gram=True`` statistics and a plan whose
  producers are only cut (``method="default"``); the kept neurons then read what they read in the dense model.
  """
  flat, small_flat = flatten(variables), dict(flatten(small))
  for name, gp in plan.items():
    if gp.producer_map is not None or gp.keep is None:
      raise CalibrationError(f"group {name!r}: refit_consumers takes a plain-pruning plan (method='default')")
  paths = sorted({m.path for name in plan for m in _read_members(flat, spec[name], stats)})
  # each contracted input feature's flat index, laid out like the kernel and cut by the plan as the kernel is
  index = {}
  for p in paths:
    st = stats[p]
    if st.gram is None:
      raise CalibrationError("refit_consumers needs consumer_statistics(..., gram=True)")
    ids = np.arange(st.mean.size, dtype=np.float32).reshape(st.mean.shape)
    index[p] = np.broadcast_to(st.laid_out(ids, np.ndim(flat[p])), np.shape(flat[p]))
  cut = _cut(flat, spec, plan, index, lambda gp: gp.keep)
  for p in paths:
    st = stats[p]
    axes = st.axes
    kernel = np.asarray(flat[p], np.float32)
    dense_w = np.moveaxis(kernel, axes, range(len(axes))).reshape(st.mean.size, -1)  # (F, outputs)
    small_kernel = np.asarray(small_flat[p], np.float32)
    small_shape = np.moveaxis(small_kernel, axes, range(len(axes))).shape
    kept = np.moveaxis(np.asarray(cut[p]), axes, range(len(axes)))
    kept = kept.reshape(int(np.prod(small_shape[:len(axes)])), -1)[:, 0].round().astype(np.int64)
    if kept.size and dense_w.shape[1] != int(np.prod(small_shape[len(axes):])):
      raise CalibrationError(f"consumer {p!r}: the plan changes its outputs; refit_consumers refits consumers "
                             "whose outputs the plan leaves alone")
    g = st.gram.astype(np.float64)
    bias_path = p[:-len("kernel")] + "bias"
    use_center = centered if centered is not None else bias_path in small_flat
    mu = st.mean.reshape(-1).astype(np.float64)
    if use_center:
      g = g - np.outer(mu, mu)
    w_new = _ridge_solve(g, kept, g[kept] @ dense_w, ridge)  # (F_kept, outputs)
    refit = np.moveaxis(w_new.reshape(small_shape), range(len(axes)), axes)
    small_flat[p] = jnp.asarray(refit.astype(np.float32), jnp.asarray(small_flat[p]).dtype)
    if use_center:
      if bias_path not in small_flat:
        raise CalibrationError(f"consumer {p[len('params/'):-len('/kernel')]!r} has no bias for the intercept "
                               "(centered=True)")
      delta = mu @ dense_w - mu[kept] @ w_new
      shape = np.shape(small_flat[bias_path])
      small_flat[bias_path] = jnp.asarray(np.asarray(small_flat[bias_path], np.float32)
                                          + delta.reshape(shape).astype(np.float32))
  return unflatten(small_flat)
