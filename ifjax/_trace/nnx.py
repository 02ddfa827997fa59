"""An NNX model as a function of a variables dict: :func:`nnx_apply`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax


def nnx_apply(model) -> tuple[Callable[..., Any], dict]:
  """An NNX model as ``(apply_fn, variables)`` in the linen layout, for :func:`trace_spec` and friends.

  ``variables = {"params": ..., "batch_stats": ...}`` are pure dicts of the
  model's ``nnx.Param`` / ``nnx.BatchStat`` state; ``apply_fn(variables, *args)``
  merges them into a copy of the model and calls it. To run pruned variables,
  build the NNX model at the new widths (``ifjax.widths``) and load them with
  ``nnx.replace_by_pure_dict``: NNX keeps sizes as static attributes.
  """
  from flax import nnx

  graphdef, params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  variables = {"params": nnx.to_pure_dict(params)}
  if len(jax.tree.leaves(stats)):
    variables["batch_stats"] = nnx.to_pure_dict(stats)

  def apply_fn(v, *args, **kwargs):
    p, s = jax.tree.map(lambda x: x, params), jax.tree.map(lambda x: x, stats)
    nnx.replace_by_pure_dict(p, v["params"])
    if "batch_stats" in v:
      nnx.replace_by_pure_dict(s, v["batch_stats"])
    return nnx.merge(graphdef, p, s, rest)(*args, **kwargs)

  return apply_fn, variables
