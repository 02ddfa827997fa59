"""What a network costs (parameters, FLOPs read from XLA's cost analysis) and per-group ratios that meet a budget."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from ifjax._fuse import apply_plan, kept_count, plan, relative_ratios
from ifjax._spec import Spec, Variables


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
             target_flops: float | None = None, method: str = "uniform", rebuild: Callable[[dict], Callable] | None = None,
             example_args: tuple = (), example_kwargs: Mapping[str, Any] | None = None, importance: Any = "l1",
             protect: Iterable[str | int] = (), groups: Any = None) -> Allocation:
  """Per-group ratios whose pruned network costs at most the target, for ``plan(variables, spec, ratios)``.

  Args:
    target_params: parameters to keep at most (an int), or a fraction of the dense count if < 1.
    target_flops: FLOPs of one call at most, or a fraction of the dense FLOPs if < 1; needs ``rebuild``
      (``widths -> apply_fn`` of the network at those widths, e.g. ``lambda w: models.get(name, widths=w)[0].apply``)
      and ``example_args`` / ``example_kwargs`` for the call (``train=False``).
    method: ``"uniform"``, one ratio for every selected group (the largest-kept one that meets the budget);
      ``"global"``, the neurons of all selected groups ranked together by importance (each group's scores
      divided by their mean, as the built-in importances are), the least important removed first
      (Torch-Pruning's global pruning).
    protect: groups (names or paper indices) that keep every neuron.
    groups: the groups that may be pruned (default all); ``protect`` is taken out of them.

  Every group keeps at least one neuron. The budget is met to within one neuron per group: the next step,
  one more neuron in every group (uniform) or the last neuron removed (global), would exceed it. A budget
  below what the network costs with one neuron per group raises ``ValueError`` with that minimum.
  """
  if (target_params is None) == (target_flops is None):
    raise ValueError("allocate needs exactly one of target_params= or target_flops=")
  if method not in ("uniform", "global"):
    raise ValueError(f"method must be 'uniform' or 'global', got {method!r}")
  if target_flops is not None and rebuild is None:
    raise ValueError("target_flops needs rebuild=widths -> apply_fn and the example inputs of one call")
  protected = {spec[p].name for p in protect}
  selected = [g.name for g in spec.select(groups) if g.name not in protected]
  if not selected:
    raise ValueError("allocate: every selected group is protected; nothing to prune")
  full = plan(variables, spec, 0.0, groups=selected, importance=importance, fuse=False)
  sizes = {g: int(np.shape(p.importance)[0]) for g, p in full.items()}
  dense_widths = spec.validate(variables)
  kwargs = dict(example_kwargs or {})

  def ratios_of(kept: Mapping[str, int]) -> dict[str, float]:
    return {**{g: 0.0 for g in kept}, **relative_ratios(sizes, kept)}

  def cost(kept: Mapping[str, int]) -> float:
    pl = plan(variables, spec, ratios_of(kept), importance={g: full[g].importance for g in kept}, fuse=False)
    shapes = jax.eval_shape(lambda v: apply_plan(v, spec, pl), variables)
    if target_params is not None:
      return float(param_count(shapes))
    return flops(rebuild({**dense_widths, **kept}), shapes, *example_args, **kwargs)

  dense = cost(sizes)
  target = float(target_params if target_params is not None else target_flops)
  if target < 1:
    target *= dense
  smallest = cost({g: 1 for g in sizes})
  if smallest > target:
    raise ValueError(f"the budget {target:.6g} is below what the network costs with one neuron per selected group "
                     f"({smallest:.6g}; dense {dense:.6g}): protect fewer groups, select more, or raise the target")

  if method == "uniform":
    candidates = lambda t: {g: max(1, kept_count(n, t)) for g, n in sizes.items()}  # t = the common ratio
  else:
    scores = {g: np.asarray(full[g].importance, np.float64) / max(float(np.mean(full[g].importance)), 1e-30)
              for g in sizes}
    pooled = np.sort(np.concatenate(list(scores.values())))

    def candidates(t):  # t in [0, 1): the fraction of all pooled neurons removed, least important first
      cut = pooled[min(len(pooled) - 1, int(t * len(pooled)))] if t > 0 else -np.inf
      return {g: max(1, int(np.sum(s > cut)) if t > 0 else len(s)) for g, s in scores.items()}

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
  kept = candidates(hi)
  reached = cost(kept)
  return Allocation(ratios_of(kept), kept, reached, dense, target)
