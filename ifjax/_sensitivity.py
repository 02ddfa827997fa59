"""Measured sensitivity: how much the network's predictions change when one group is pruned, at several ratios.

:func:`ifjax.bn_sensitivity` predicts the damage of removing a neuron from the BN statistics alone, neuron by
neuron, taking neurons independent and ignoring what follows the next layer. This module measures it instead:
each group is pruned alone at each of a few ratios (with the pruning method that will be used, so fusion's
repair counts) and the network's predictions on some inputs are compared with the dense network's. With
:func:`ifjax.synthesize_inputs` as the inputs nothing but the weights is used (data-free); with unlabelled
images it is a data-light measurement. ``allocate(method="measured", curves=...)`` turns the curves into a
budget: the layer-wise sensitivity analysis of Li et al. (ICLR 2017), on KL divergence and per unit of cost.

Every probe network is evaluated at the dense shapes: a pruned group is padded back to its full width with
dead neurons (zero weights in every member, zero BN scale and bias), which compute exactly the pruned
network's function. So the whole sweep compiles one forward pass (and one statistics pass), not one per probe.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ifjax._batchnorm import derived_bn
from ifjax._fuse import apply_plan, kept_count, plan
from ifjax._importance import group_size
from ifjax._repair import batch_statistics_pass, reset_batchnorm_affine
from ifjax._scalars import python_scalar
from ifjax._spec import Spec, Variables, flatten, unflatten


class SensitivityCurves(NamedTuple):
  """What :func:`measure_sensitivity` measured.

  Attributes:
    ratios: ``(r,)`` the ratios probed, increasing.
    kept: ``{group name: (r,) int}`` neurons kept at each ratio (:func:`ifjax.kept_count`).
    size: ``{group name: int}`` the group's dense width.
    loss: ``{group name: (r,) float}`` mean KL divergence (nats) of the probe network's predictions from the
      reference's on the inputs, with only that group pruned. The reference is the dense network after the
      same BN treatment (with ``recalibrate``, its BNs re-estimated on the same inputs), so the loss is 0
      when nothing is removed and the statistics' own sampling error mostly cancels.
  """
  ratios: np.ndarray
  kept: dict[str, np.ndarray]
  size: dict[str, int]
  loss: dict[str, np.ndarray]


def pad_group(flat: dict, spec: Spec, name: str, n: int, kept: int) -> dict:
  """``flat`` (a network whose group ``name`` has ``kept`` of its ``n`` neurons) with that group padded back
  to ``n`` by dead neurons: zeros inserted after the kept ones in every member and in the producers' BN
  arrays. A dead neuron's producer output is 0, its BN (scale 0, bias 0) gives 0 and its consumer rows are 0,
  so the padded network computes the pruned one's function at the dense shapes."""
  out = dict(flat)
  g = spec[name]
  for m in list(g.members) + [bn for bn, _ in derived_bn(spec, g) if bn.path in flat]:
    x = m.neurons_first(out[m.path])
    zeros = jnp.zeros((n - kept, *x.shape[1:]), x.dtype)
    out[m.path] = m.restore(jnp.concatenate([x[:m.offset + kept], zeros, x[m.offset + kept:]], axis=0))
  return out


def _kl(dense_logits: jax.Array, logits: jax.Array) -> jax.Array:
  p = jax.nn.log_softmax(dense_logits.astype(jnp.float32))
  q = jax.nn.log_softmax(logits.astype(jnp.float32))
  return jnp.sum(jnp.exp(p) * (p - q), axis=-1)


def measure_sensitivity(apply_fn: Callable[..., Any], variables: Variables, spec: Spec, inputs: Any, *,
                        ratios: Sequence[float] = (0.2, 0.4, 0.6, 0.8, 0.9), groups: Any = None,
                        recalibrate: bool = True, batch_size: int = 128, progress: bool = True,
                        **plan_kwargs) -> SensitivityCurves:
  """Prune each group alone at each ratio and measure how far the predictions move from the dense network's.

  Args:
    apply_fn: the dense network's linen ``module.apply``, called as ``apply_fn(v, x, train=False)`` and, with
      ``recalibrate``, ``apply_fn(v, x, train=True, mutable=["batch_stats"])`` (wrap it for e.g. a dropout rng).
    variables: the dense variables (with ``batch_stats`` for ``recalibrate``).
    spec: the network's :class:`ifjax.Spec`.
    inputs: ``(N, *input_shape)`` inputs, e.g. :func:`ifjax.synthesize_inputs`' (data-free) or unlabelled
      images; split into batches of ``batch_size``.
    ratios: the ratios to probe, each in (0, 1).
    groups: the groups to probe (default all).
    recalibrate: re-estimate every BN's statistics on ``inputs`` before measuring, as
      :func:`ifjax.recalibrate_batchnorm` does (measure for a network whose BNs will be re-estimated);
      ``False`` measures the network as pruning or fusion leaves it (weights only).
    batch_size: inputs per forward pass (and per BN re-estimation batch).
    progress: show a progress bar over the probes.
    **plan_kwargs: for :func:`ifjax.plan` (e.g. ``method="default"`` for default pruning, ``normalization=``).

  Returns:
    :class:`SensitivityCurves` (losses in nats, averaged over the inputs).

  >>> import jax, ifjax
  >>> module, spec = ifjax.models.get("mlp")  # 20 -> 128 -> 64 -> 10, no BatchNorm
  >>> x = jax.random.normal(jax.random.key(0), (64, 20))
  >>> v = module.init(jax.random.key(1), x[:1])
  >>> curves = ifjax.measure_sensitivity(module.apply, v, spec, x, recalibrate=False, progress=False)
  >>> curves.kept["dense1"].tolist()  # 64 neurons at ratios 0.2 ... 0.9
  [51, 38, 25, 12, 6]
  >>> bool(all((curves.loss[g] >= 0).all() for g in curves.loss))
  True
  >>> alloc = ifjax.allocate(v, spec, target_params=0.5, method="measured", curves=curves)
  >>> alloc.cost <= 0.5 * alloc.dense_cost
  True
  """
  if isinstance(ratios, (str, bytes)) or not hasattr(ratios, "__iter__") or np.ndim(ratios) != 1:
    raise TypeError(f"measure_sensitivity: ratios must be a sequence of numbers in (0, 1), got "
                    f"{type(ratios).__name__} {ratios!r:.80}")
  given = [python_scalar(r, "iuf", "measure_sensitivity: ratios") for r in ratios]
  wrong = [r for r in given if isinstance(r, bool) or not isinstance(r, (int, float))]
  if wrong:
    raise TypeError(f"measure_sensitivity: ratios must be numbers in (0, 1), got {type(wrong[0]).__name__} "
                    f"{wrong[0]!r:.80} among them")
  rs = np.asarray(sorted(given), np.float64)
  if rs.size == 0 or not np.all(np.isfinite(rs)) or rs[0] <= 0 or rs[-1] >= 1:
    raise ValueError(f"measure_sensitivity: ratios must be non-empty and in (0, 1) (finite numbers), got {given}")
  x = np.asarray(inputs)
  if x.ndim < 2 or len(x) < 2:
    raise ValueError(f"inputs must be (N >= 2, *input_shape), got shape {x.shape}")
  if recalibrate and len(x) % batch_size == 1:
    raise ValueError(f"the last batch would hold one input (no BN variance): change batch_size ({batch_size}) "
                     f"or the number of inputs ({len(x)})")
  batches = [jnp.asarray(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
  flat = flatten(variables)
  stat_paths = [p for p in flat if p.startswith("batch_stats/")]
  if recalibrate and not stat_paths:
    raise ValueError("recalibrate=True needs batch_stats in the variables")
  if recalibrate and plan_kwargs.get("target") == "cluster_centroid":
    raise ValueError("recalibrate=True needs kept neurons; the cluster_centroid target has none")

  forward = jax.jit(lambda v, xb: apply_fn(v, xb, train=False))

  statistics = batch_statistics_pass(apply_fn, stat_paths)

  def recalibrated(f: dict) -> dict:
    if not recalibrate:
      return f
    stats = [statistics(unflatten(f), xb) for xb in batches]
    # (typeshed types a sum of arrays by its start value, 0)
    return {**f, **{p: (sum(s[p] for s in stats) / len(stats)).astype(f[p].dtype)  # pyright: ignore[reportAttributeAccessIssue]
                    for p in stat_paths}}

  def logits(f: dict) -> list[jax.Array]:
    v = unflatten(recalibrated(f))
    return [forward(v, xb) for xb in batches]

  selected = [g.name for g in spec.select(groups)]
  sizes = {g: group_size(flat, spec[g]) for g in selected}
  full = plan(variables, spec, 0.0, groups=selected, method="default")
  reference = logits(flatten(reset_batchnorm_affine(apply_plan(variables, spec, full), variables, spec, full))
                     if recalibrate else flatten(variables))
  from ifjax.train import _bar
  bar = _bar(progress, len(selected) * len(rs), "sensitivity")
  kept, loss = {}, {}
  for g in selected:
    kept[g] = np.asarray([kept_count(sizes[g], r) for r in rs])
    losses = []
    for r, k in zip(rs, kept[g]):
      pl = plan(variables, spec, {g: float(r)}, **plan_kwargs)
      small = apply_plan(variables, spec, pl)
      if recalibrate:
        small = reset_batchnorm_affine(small, variables, spec, pl)
      probe = logits(pad_group(flatten(small), spec, g, sizes[g], int(k)))
      losses.append(float(sum(jnp.sum(_kl(d, q)) for d, q in zip(reference, probe)) / len(x)))
      if bar:
        bar.update(1)
    loss[g] = np.asarray(losses)
  if bar:
    bar.close()
  return SensitivityCurves(rs, kept, sizes, loss)
