"""Deriving a group spec by tracing a model's jaxpr: :func:`trace_spec`."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from ifjax._spec import BatchNormPair, FlatMember, Group, Spec, flatten, unflatten
from ifjax._trace.interpreter import _Tracer
from ifjax._trace.values import PaddedChannelsWarning, UnsupportedPrimitiveError, _Class, _module, _Value


def trace_spec(apply_fn: Callable[..., Any], variables, *example_args, **example_kwargs) -> Spec:
  """Derives the group spec of ``apply_fn(variables, *example_args, **example_kwargs)``.

  Works for any function of a variables dict: a Flax linen ``module.apply``, a
  plain-JAX function of a params dict, or an NNX model seen through
  ``nnx.split`` / ``nnx.merge`` (see :func:`nnx_apply`). Groups come in network
  order (by their last producer); names are the module path of their first
  producer (``:heads`` / ``:head_dim`` for attention heads and the dims inside
  them, ``[a:b]`` for a segment of a shared axis). Groups whose neurons a norm
  normalises over, or that tied weights or a query-key product couple, are
  pruning-only (``Group.exact`` False; see :func:`check_spec`). Raises
  :class:`UnsupportedPrimitiveError` on an op it cannot follow.

  >>> import flax.linen as nn, jax, jax.numpy as jnp, ifjax
  >>> class Net(nn.Module):
  ...   @nn.compact
  ...   def __call__(self, x):
  ...     return nn.Dense(2, name="out")(nn.relu(nn.Dense(8, name="hidden")(x)))
  >>> v = Net().init(jax.random.key(0), jnp.ones((1, 3)))
  >>> spec = ifjax.trace_spec(Net().apply, v, jnp.ones((1, 3)))
  >>> [(g.name, [m.path for m in g.members]) for g in spec.groups]
  [('hidden', ['params/hidden/kernel', 'params/hidden/bias', 'params/out/kernel'])]
  """
  flat = flatten(variables)
  paths = list(flat)
  shapes = {p: tuple(np.shape(a)) for p, a in flat.items()}

  def fn(*leaves):
    return apply_fn(unflatten(dict(zip(paths, leaves))), *example_args, **example_kwargs)

  closed = jax.make_jaxpr(fn)(*[flat[p] for p in paths])
  tracer = _Tracer(shapes)
  inputs = [_Value(param=(p, {i: i for i in range(len(shapes[p]))})) for p in paths]
  outs = tracer.run(closed.jaxpr, inputs)
  for o in outs:
    for segs in o.labels.values():
      tracer.freeze(segs, "reaches the function's output")

  tracer.settle_batchnorms()
  tracer.settle_blocks()
  roots: dict[int, _Class] = {}
  for c in range(len(tracer.classes)):
    root = tracer.find(c)
    if tracer.classes[root].pieces is None and tracer.classes[root].blocks is None:
      roots.setdefault(root, tracer.classes[root])
  _check_shared(roots, shapes)
  groups = []
  for cls in roots.values():
    kernels = [(i, m) for i, m in cls.producers if len(shapes[m.path]) >= 2]
    if cls.frozen or not kernels:
      continue
    producers = _dedupe(sorted(cls.producers, key=lambda t: t[0]))
    consumers = _dedupe(sorted(cls.consumers, key=lambda t: t[0]))
    tied = [m for m in consumers if m in producers]  # tied weights: one axis read and written by the group
    consumers = [m for m in consumers if m not in tied]
    last = max(i for i, _ in kernels)
    first_eqn, first = min(kernels, key=lambda t: t[0])
    shared = any(m.offset or _axis_len(shapes, m) != cls.size for m in producers + consumers)
    group = Group(_group_name(first, cls, shapes), producers, consumers, cls.size if shared else None,
                  exact=not (cls.inexact or tied))
    if not group.exact and cls.padded:
      warnings.warn(PaddedChannelsWarning(
          f"group {group.name!r}: {cls.padded}, and a norm runs over its channels: its zero-padded model "
          "(apply_plan(..., keep_shapes=True)) is not its pruned model; evaluate the pruned group with ifjax.resize"),
          stacklevel=2)
    groups.append(((last, first_eqn, first.offset), group))
  groups.sort(key=lambda t: t[0])
  bns = [BatchNormPair(layer, bn, *([tracer.eps[bn]] if bn in tracer.eps else [])) for bn, layer in tracer.bn.items()]
  return Spec(tuple(g for _, g in groups), tuple(bns))


def _group_name(first, cls: _Class, shapes) -> str:
  """The module path of the group's first producer kernel; ``:heads`` / ``:head_dim`` for attention heads and
  the dims inside them, ``:axis{a}`` for another kernel axis but the last, ``[a:b]`` for a segment of a
  shared axis."""
  name = _module(first.path)
  if cls.kind:
    return f"{name}:{cls.kind}" + (f"[{first.offset}:{first.offset + cls.size}]" if first.offset else "")
  if first.axis % len(shapes[first.path]) != len(shapes[first.path]) - 1:
    name += f":axis{first.axis % len(shapes[first.path])}"
  return name + (f"[{first.offset}:{first.offset + cls.size}]" if cls.size != _axis_len(shapes, first) else "")


def _check_shared(roots: dict[int, _Class], shapes) -> None:
  """UnsupportedPrimitiveError if one parameter axis holds the channels of two groups: a module applied
  twice (in sequence, or to two inputs) has one set of weights for two sets of channels."""
  owners: dict[tuple, int] = {}
  for root, cls in roots.items():
    for _, m in cls.producers + cls.consumers:
      key = (m.path, m.axis % len(shapes[m.path]), m.offset, m.outer, m.inner)
      if owners.setdefault(key, root) != root:
        raise UnsupportedPrimitiveError(
            f"{m.path!r} axis {key[1]} holds the channels of two different groups: module {_module(m.path)!r} is "
            "applied more than once (shared weights: a layer called twice in sequence, or on two inputs), and "
            "pruning one use would change the other. Hint: write the spec by hand, or give each call its own module")


def _axis_len(shapes, m) -> int:
  n = shapes[m.path][m.axis]
  return n // (m.outer * m.inner) if isinstance(m, FlatMember) else n


def _dedupe(items):
  seen, out = set(), []
  for _, m in items:
    if m not in seen:
      seen.add(m)
      out.append(m)
  return out
