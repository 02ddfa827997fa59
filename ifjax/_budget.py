"""What a network costs: parameters, and FLOPs read from XLA's cost analysis."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np


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
