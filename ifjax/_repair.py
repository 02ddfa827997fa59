"""BatchNorms after pruning: statistics for fine-tuning (data-free) and re-estimation (data-light).

:func:`unfold_batchnorm` gives the folded BNs of a pruned model estimated statistics without changing its
function, so that training mode (batch statistics) starts close to evaluation mode. :func:`recalibrate_batchnorm`
re-estimates them on data: not part of Intra-Fusion, which is data-free, and kept separate so that results with
and without data are never mixed up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ifjax._batchnorm import derived_bn, input_statistics, train_mode_statistics, with_statistics
from ifjax._fuse import GroupPlan, Plan, edit_members
from ifjax._spec import Spec, Variables, flatten, on_host, to_jax, unflatten


def recalibrate_batchnorm(apply_fn: Callable[..., Any], pruned: Variables, variables: Variables, spec: Spec,
                          plan: Plan, batches: Iterable[Any]) -> dict:
  """Resets every BN of ``pruned`` to its original affine output and re-estimates its statistics.

  After :func:`ifjax.apply_plan` the BNs are folded (identity). Here each BN
  channel gets back the scale ``|gamma|`` and bias ``beta`` that the original
  BN had for the neuron it stands for (a kept neuron, or the one a fused
  neuron was fused into), and its mean / var become the statistics of its
  input on ``batches`` (unlabelled inputs), measured in train mode so every BN
  sees its upstream already re-estimated. This is the usual BN reset of
  pruning and model-fusion work, not Intra-Fusion.

  Args:
    apply_fn: a Flax linen ``module.apply`` (called as ``apply_fn(v, x,
      train=True, mutable=["batch_stats"])``) for the *pruned* widths.
    pruned: variables returned by ``apply_plan(variables, spec, plan)``.
    variables: the original (unfolded) variables.
    spec: as given to ``apply_plan``.
    plan: as given to ``apply_plan``; it must keep neurons
      (``target="most_important"`` or plain pruning).
    batches: iterable of input batches (no labels).

  Returns:
    New variables for the pruned model; the inputs are not modified.
  """
  new = flatten(reset_batchnorm_affine(pruned, variables, spec, plan))
  stats = _batch_statistics(apply_fn, unflatten(new), batches)
  return unflatten({**new, **{p: a.astype(new[p].dtype) for p, a in stats.items()}})


def reset_batchnorm_affine(pruned: Variables, variables: Variables, spec: Spec, plan: Plan) -> dict:
  """``pruned`` with every BN's scale and bias back to ``|gamma|`` and ``beta`` of the original neuron each
  channel stands for (its kept neuron), the first half of :func:`recalibrate_batchnorm`; the statistics are
  left as they are (folded) for the caller to re-estimate."""
  if any(gp.keep is None for gp in plan.values()):
    raise ValueError("recalibrate_batchnorm needs the kept neurons of every group; the cluster_centroid target has "
                     "none")
  orig, new = flatten(variables), dict(flatten(pruned))
  targets = {}
  for pair in spec.batchnorms:
    scale, bias = f"params/{pair.bn}/scale", f"params/{pair.bn}/bias"
    n = np.shape(orig[f"batch_stats/{pair.bn}/mean"])[0]
    targets[scale] = jnp.abs(jnp.asarray(orig[scale], jnp.float32)) if scale in orig else jnp.ones(n)
    targets[bias] = jnp.asarray(orig[bias], jnp.float32) if bias in orig else jnp.zeros(n)
  targets = _select_kept(targets, spec, plan)
  for pair in spec.batchnorms:
    for k in ("scale", "bias"):
      path = f"params/{pair.bn}/{k}"
      if path in new:
        new[path] = targets[path].astype(new[path].dtype)
  return unflatten(new)


def unfold_batchnorm(pruned: Variables, variables: Variables, spec: Spec, plan: Plan) -> dict:
  """``pruned`` with every folded BN given estimated statistics, computing the same function in eval mode.

  :func:`ifjax.apply_plan` folds each BN into its layer: mean 0, var 1 - eps, scale 1, so in eval mode the BN
  only adds its bias. In *training* mode a BN normalises by batch statistics instead, which for a folded BN
  is a different function: fine-tuning would start from a model it does not evaluate. Here each BN input
  channel w gets an estimate of its mean and standard deviation, and scale and bias that undo the
  normalisation: ``(w - mean) / sqrt(var + eps) * sqrt(var + eps) + (mean + bias) = w + bias``. So the eval-mode
  function is unchanged (to float rounding), and training mode, which divides by the batch statistics, starts
  near it when the estimates are right.

  The estimates need no data: the original BN statistics give each channel's mean and deviation in the
  folded model (:func:`ifjax._batchnorm.input_statistics`). A fused channel is the producer map P applied to
  these channels, so its mean is ``P @ mean`` (exact if the inputs of the layer are unchanged) and its
  deviation is estimated as ``P @ sd`` (exact for perfectly correlated neurons, which is what OT fuses).
  BNs without a scale or bias parameter stay folded.

  Args:
    pruned: ``apply_plan(variables, spec, plan)`` (BN-folded).
    variables: as given to :func:`ifjax.apply_plan` (the original variables).
    spec: as given to :func:`ifjax.apply_plan`.
    plan: as given to :func:`ifjax.apply_plan`.

  Returns:
    New variables at the pruned shapes; the inputs are not modified.
  """
  statistics = mapped_statistics(input_statistics(variables, spec), spec, plan)
  return to_jax(unflatten(with_statistics(on_host(flatten(pruned)), spec, statistics)))


def mapped_statistics(statistics: Mapping[str, Any], spec: Spec,
                      plan: Mapping[str, GroupPlan]) -> dict[str, np.ndarray]:
  """:func:`ifjax._batchnorm.input_statistics` of the original channels -> those of the planned channels: each
  group's producer map applied to the BN arrays of its producer layers (means and deviations map linearly)."""
  def roles(g):
    return [(m, "producer") for m, _ in derived_bn(spec, g) if m.path in statistics]

  return on_host(edit_members(statistics, spec, on_host(plan), roles))


def _select_kept(arrays: Mapping[str, jax.Array], spec: Spec, plan: Plan) -> dict[str, jax.Array]:
  """Per-channel BN scale / bias ``arrays`` (original layout) cut to the pruned layout by each group's keep set."""
  def roles(g):
    return [(m, "identity") for m, _ in derived_bn(spec, g)
            if m.path in arrays and m.path.rsplit("/", 1)[1] in ("scale", "bias") and m.path.startswith("params/")]

  return edit_members(arrays, spec, plan, roles)


def batch_statistics_pass(apply_fn, stat_paths: list[str]):
  """Jitted ``(variables, x) -> {path: the BN statistic of batch x}`` for the ``batch_stats`` ``stat_paths``,
  whatever the BNs' momentum.

  A train-mode pass updates ``stat <- m * stat + (1 - m) * batch``; two passes
  starting from stat = 0 and stat = 1 give ``a = (1 - m) b`` and ``c = m + a``,
  hence ``b = a / (1 - c + a)``.
  """
  one = jax.jit(lambda v, x, fill: train_mode_statistics(apply_fn, flatten(v), stat_paths, x, fill))

  def pass_(variables, x):
    a, c = one(variables, x, 0.0), one(variables, x, 1.0)
    return {p: a[p] / (1.0 - c[p] + a[p]) for p in stat_paths}
  return pass_


def _batch_statistics(apply_fn, variables, batches) -> dict[str, jax.Array]:
  """Mean over ``batches`` of every BN's batch mean and variance (:func:`batch_statistics_pass`)."""
  stat_paths = [p for p in flatten(variables) if p.startswith("batch_stats/")]
  if not stat_paths:
    raise ValueError("the variables have no batch_stats to re-estimate")
  pass_ = batch_statistics_pass(apply_fn, stat_paths)
  total, count = None, 0
  for x in batches:
    b = pass_(variables, x)
    total = b if total is None else {p: total[p] + b[p] for p in stat_paths}
    count += 1
  if not count or total is None:  # (total is None exactly when count is 0)
    raise ValueError("recalibrate_batchnorm needs at least one batch")
  return {p: t / count for p, t in total.items()}
