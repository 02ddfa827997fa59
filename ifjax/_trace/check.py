"""Checking a spec against the model by permuting and scaling its neurons: :func:`check_spec`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from ifjax._batchnorm import derived_bn, fold_batchnorm
from ifjax._errors import IfjaxError
from ifjax._spec import Group, Member, Spec, flatten, on_host, unflatten


class SpecCheckError(IfjaxError, ValueError):
  """A group of the spec is not a set of interchangeable neurons of the model."""


def check_spec(apply_fn: Callable[..., Any], variables, spec: Spec, *example_args, scaling: bool = False,
               rtol: float = 1e-4, atol: float = 1e-5, seed: int = 0, **example_kwargs) -> dict[str, float]:
  """Perturbation check of a spec against the model; returns ``{group: max output change}``.

  Every leaf of the outputs is compared (a tuple or dict of outputs, e.g. BERT's last hidden state and its
  ``pooler_output``), each within ``atol + rtol * max |leaf|``; the change reported is the largest over them.

  For each group its neurons are permuted consistently across all members (and
  the BatchNorms folded into its producers): the outputs must not change. With
  ``scaling=True`` one neuron's producer rows are also scaled by 2 and its
  consumer columns by 1/2 (after BN folding), which must not change the outputs
  when the activations between them are positively homogeneous (ReLU). It is skipped for pruning-only
  groups (``Group.exact`` False: a LayerNorm / GroupNorm normalises over their channels, weights are tied,
  or a query-key product contracts them) and for groups holding an unfolded BatchNorm's statistics (a BN
  after a concatenation or an activation), which are not homogeneous in their producers.

  A permutation keeps the outputs of every traced group; what tells the groups apart is ``Group.exact``.
  For an exact group, fusing planted exact-duplicate neurons with ``normalization="barycentric"`` keeps
  the function. A pruning-only group can be pruned (:func:`ifjax.plan` prunes it even with ``fuse=True``),
  but removing channels changes what the norm over them computes (its mean and variance run over fewer
  channels), so the pruned model differs from the original even when the removed channels were duplicates.

  Raises :class:`SpecCheckError` naming the group and the member that breaks.
  """
  sizes = spec.validate(variables)
  variables = on_host(variables)
  forward = jax.jit(lambda v: jax.tree.leaves(apply_fn(v, *example_args, **example_kwargs)))
  ref = [np.asarray(x, np.float64) for x in forward(variables)]
  tols = [atol + rtol * (np.max(np.abs(r)) if r.size else 0.0) for r in ref]  # every output leaf its own

  def change(v) -> tuple[float, bool]:
    """(largest absolute change over every output leaf, whether some leaf changes beyond its tolerance)."""
    diffs = [np.max(np.abs(np.asarray(x, np.float64) - r)) if r.size else 0.0 for x, r in zip(forward(v), ref)]
    return max(diffs, default=0.0), any(d > t for d, t in zip(diffs, tols))

  rng = np.random.default_rng(seed)
  report, folded = {}, None
  for g in spec.groups:
    n = sizes[g.name]
    perm = np.roll(np.arange(n), 1) if n > 1 else np.arange(n)
    perm = perm[rng.permutation(n)] if n > 2 else perm
    members = list(g.members) + _bn_members(spec, g, variables)
    diff, broken = change(_permuted(variables, members, perm, n))
    if broken:
      culprits = [m for m in members if not change(_permuted(variables, [x for x in members if x != m], perm, n))[1]]
      where = (f"member {culprits[0]!r} does not belong to it" if culprits else
               "a member is missing (some array holding these neurons is not in the group)")
      raise SpecCheckError(f"group {g.name!r}: permuting its neurons changes the outputs by {diff:.3g}; {where}")
    report[g.name] = float(diff)
    if scaling and g.exact and not any(m.path.startswith("batch_stats/") for m in g.members):
      folded = fold_batchnorm(variables, spec) if folded is None else folded
      factors = [(m, 2.0) for m in g.producers if not _is_depthwise(folded, g, m)]
      factors += [(m, 0.5) for m in g.consumers]
      factors += [(m, 2.0) for m in _bn_members(spec, g, folded) if m.path.endswith("/bias")]
      d, broken = change(_scaled(folded, factors))
      if broken:
        raise SpecCheckError(f"group {g.name!r}: scaling neuron 0's producers by 2 and consumers by 1/2 changes the "
                             f"outputs by {d:.3g} (the members, or a non-homogeneous activation, break it)")
      report[g.name] = max(report[g.name], float(d))
  return report


def _bn_members(spec: Spec, g: Group, variables) -> list[Member]:
  flat = flatten(variables)
  return [m for m, _ in derived_bn(spec, g) if m.path in flat]


def _is_depthwise(variables, g: Group, m: Member) -> bool:
  """A (kh, kw, 1, C) kernel that follows another producer of the group (a conv with a
  single input channel, such as a grayscale stem, is not depthwise)."""
  flat = flatten(variables)
  one_in = lambda x: len(np.shape(flat[x.path])) == 4 and np.shape(flat[x.path])[2] == 1 and x.axis % 4 == 3
  others = [x for x in g.producers if x != m and np.ndim(flat[x.path]) >= 2 and not one_in(x)]
  return one_in(m) and bool(others)


def _permuted(variables, members, perm, n):
  """``variables`` with the n neurons of every member permuted (edited in NumPy: no per-op compilation)."""
  flat = dict(flatten(variables))
  for m in members:
    x = np.array(m.neurons_first(np.asarray(flat[m.path])))
    x[m.offset:m.offset + n] = x[m.offset:m.offset + n][perm]
    flat[m.path] = m.restore(x)
  return unflatten(flat)


def _scaled(variables, factors):
  flat = dict(flatten(variables))
  for m, f in factors:
    x = np.array(m.neurons_first(np.asarray(flat[m.path])))
    x[m.offset] *= f
    flat[m.path] = m.restore(x)
  return unflatten(flat)
