"""Building :func:`ifjax.resize`'s constraint system (:mod:`~ifjax._trace.constraints`) from a jaxpr.

:class:`_Builder` walks the jaxpr (and its sub-jaxprs, one :class:`_Frame` per
instance) and gives each axis of each value a node; each primitive's rule, found
through the shared table of :mod:`~ifjax._trace.primitives`, equates axes or adds
constraints. A primitive without a rule keeps every axis it touches at its
original size, and fails if the pruned variables change one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.extend as jex
import numpy as np

from ifjax._trace.constraints import ResizeError, _Dims, _Pad, _Reshape, _reshape_groups, _Scale, _Sum
from ifjax._trace.primitives import (
  CALL,
  ELEMENTWISE,
  IDENTITY,
  NOT_RESIZED,
  ORDERED,
  PRIMITIVES,
  REDUCTION,
  WINDOW,
  order_axes,
)


@dataclasses.dataclass
class _Frame:
  """One instance of a (sub-)jaxpr: its axes' nodes and the sub-frames and constraints its eqns need."""
  jaxpr: Any
  consts: list
  dims: dict = dataclasses.field(default_factory=dict)  # var -> [node per axis]
  subs: dict = dataclasses.field(default_factory=dict)  # eqn index -> [frames]
  cons: dict = dataclasses.field(default_factory=dict)  # eqn index -> constraints that rewrite its params


def _shape(v) -> tuple[int, ...]:
  return tuple(getattr(v.aval, "shape", ()))


def _where(eqn) -> str:
  try:
    from jax._src import source_info_util
    where = source_info_util.summarize(eqn.source_info)
  except (ImportError, AttributeError):
    return ""
  return f" (at {where})" if where else ""


class _Builder:
  """Builds the constraint system of a jaxpr: ``frame`` walks it, one rule per primitive (:meth:`handler`)."""

  def __init__(self):
    self.d = _Dims()
    self.cons: list = []

  def frame(self, closed_or_open, in_nodes) -> _Frame:
    jaxpr = getattr(closed_or_open, "jaxpr", closed_or_open)
    consts = list(getattr(closed_or_open, "consts", ()))
    f = _Frame(jaxpr, consts)
    for v in jaxpr.constvars:
      f.dims[v] = [self.d.node(s, s) for s in _shape(v)]
    for v, nodes in zip(jaxpr.invars, in_nodes):
      f.dims[v] = nodes
    for i, eqn in enumerate(jaxpr.eqns):
      ins = [self.dims_of(f, v) for v in eqn.invars]
      outs = [[self.d.node(s) for s in _shape(v)] for v in eqn.outvars]
      for v, nodes in zip(eqn.outvars, outs):
        f.dims[v] = nodes
      self.eqn(f, i, eqn, ins, outs)
    return f

  def dims_of(self, f, v):
    if isinstance(v, jex.core.Literal):
      return [self.d.node(s, s) for s in np.shape(v.val)]
    return f.dims[v]

  def add(self, c, f=None, i=None):
    self.cons.append(c)
    if f is not None:
      f.cons.setdefault(i, []).append(c)

  def opaque(self, ins, outs, ctx, what="resize has no rule for it"):
    for nodes in ins:
      for n in nodes:
        self.d.pin_orig(n, f"{ctx}: {what} and it touches an axis the pruned variables change")
    for nodes in outs:
      for n in nodes:
        self.d.set(n, self.d.orig[n], ctx)

  def eqn(self, f: _Frame, i: int, eqn, ins, outs):
    name = eqn.primitive.name
    ctx = (f"primitive {name!r} with operand shapes {[_shape(v) for v in eqn.invars]} and result shapes"
           f" {[_shape(v) for v in eqn.outvars]}{_where(eqn)}")
    rule = self.handler(name)
    if rule is None:
      self.opaque(ins, outs, ctx)
    else:
      rule(f, i, eqn, ins, outs, ctx)

  def handler(self, name: str):
    """The rule ``(frame, eqn index, eqn, in axes, out axes, ctx)`` for primitive ``name`` (see
    :mod:`~ifjax._trace.primitives`), or None."""
    kind = PRIMITIVES.get(name)
    if kind is None or name in NOT_RESIZED:
      return None
    generic = {ELEMENTWISE: self.elementwise, IDENTITY: self.elementwise, ORDERED: self.elementwise,
               CALL: self.call, REDUCTION: self.reduction, WINDOW: self.window}
    return generic.get(kind) or getattr(self, "r_" + name, None)

  def elementwise(self, f, i, eqn, ins, outs, ctx):
    """Equal shapes, up to scalars and size-1 axes that broadcast; an :data:`ORDERED` op keeps the axes it runs
    along at their original size unless a shrunk axis can follow it."""
    d = self.d
    for nodes in ins + outs[1:]:
      if len(nodes) == len(outs[0]):
        for a, b in zip(nodes, outs[0]):
          if d.orig[a] == d.orig[b]:
            d.union(a, b, ctx)
    if PRIMITIVES[eqn.primitive.name] == ORDERED:
      for k, what, follows in order_axes(eqn.primitive.name, eqn.params, len(outs[0])):
        if not follows:
          d.pin_orig(outs[0][k], f"{ctx}: {what} axis {k}, which resize can only keep at its original size (a "
                     "pruned axis holds the kept channels first and the zero-padded model zeros after them, so "
                     "reordering it no longer lines up with the next layer's weights)")

  def r_optimization_barrier(self, f, i, eqn, ins, outs, ctx):
    for a, b in zip(ins, outs):
      for x, y in zip(a, b):
        self.d.union(x, y, ctx)

  def call(self, f, i, eqn, ins, outs, ctx):
    p = eqn.params
    sub = next(p[k] for k in ("jaxpr", "call_jaxpr", "fun_jaxpr") if k in p)
    inner = getattr(sub, "jaxpr", sub)
    if len(inner.invars) != len(ins):
      raise ResizeError(f"{ctx}: a call whose operands do not map onto its sub-jaxpr's inputs")
    sf = self.frame(sub, ins)
    f.subs[i] = [sf]
    self.tie(sf, inner.outvars, outs, ctx)

  def r_broadcast_in_dim(self, f, i, eqn, ins, outs, ctx):
    xs, os_ = _shape(eqn.invars[0]), _shape(eqn.outvars[0])
    for k, dim in enumerate(eqn.params["broadcast_dimensions"]):
      if xs[k] == os_[dim]:
        self.d.union(ins[0][k], outs[0][dim], ctx)

  def r_reshape(self, f, i, eqn, ins, outs, ctx):
    if eqn.params.get("dimensions") is not None:
      self.opaque(ins, outs, ctx, "a reshape with a transposing `dimensions`")
      return
    old, new = _shape(eqn.invars[0]), _shape(eqn.outvars[0])
    for gi, gj in _reshape_groups(old, new):
      a, b = [ins[0][k] for k in gi if old[k] > 1], [outs[0][k] for k in gj if new[k] > 1]
      if len(a) == len(b) == 1:
        self.d.union(a[0], b[0], ctx)
      elif a or b:
        self.add(_Reshape(a, b, ctx))

  def r_transpose(self, f, i, eqn, ins, outs, ctx):
    for k, src in enumerate(eqn.params["permutation"]):
      self.d.union(outs[0][k], ins[0][src], ctx)

  def r_squeeze(self, f, i, eqn, ins, outs, ctx):
    self.keep(ins[0], outs[0], eqn.params["dimensions"], ctx)

  def reduction(self, f, i, eqn, ins, outs, ctx):
    self.keep(ins[0], outs[0], eqn.params["axes"], ctx)

  def keep(self, nodes, out, dropped, ctx):
    """``out`` is ``nodes`` without the axes ``dropped``."""
    kept = [n for k, n in enumerate(nodes) if k not in dropped]
    for a, b in zip(out, kept):
      self.d.union(a, b, ctx)

  def r_dot_general(self, f, i, eqn, ins, outs, ctx):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = ins[0], ins[1]
    for a, b in zip(lc + lb, rc + rb):
      self.d.union(lhs[a], rhs[b], ctx)
    free = [lhs[k] for k in lb] + [lhs[k] for k in range(len(lhs)) if k not in lc and k not in lb]
    free += [rhs[k] for k in range(len(rhs)) if k not in rc and k not in rb]
    for a, b in zip(free, outs[0]):
      self.d.union(a, b, ctx)

  def r_concatenate(self, f, i, eqn, ins, outs, ctx):
    self.sum(outs[0], ins, eqn.params["dimension"], ctx)

  def r_split(self, f, i, eqn, ins, outs, ctx):
    self.sum(ins[0], outs, eqn.params["axis"], ctx)

  def sum(self, whole, parts, ax, ctx):
    """The whole is the sum of its parts along ``ax``, equal to them elsewhere."""
    for nodes in parts:
      for k in range(len(nodes)):
        if k != ax:
          self.d.union(nodes[k], whole[k], ctx)
    self.add(_Sum(whole[ax], [nodes[ax] for nodes in parts], ctx))

  def r_tile(self, f, i, eqn, ins, outs, ctx):
    """``jnp.tile``: an axis repeated ``r`` times is ``r`` times its operand's axis (a shrunk one too)."""
    for k, r in enumerate(eqn.params["reps"]):
      if r == 1:
        self.d.union(ins[0][k], outs[0][k], ctx)
      else:
        self.add(_Scale(outs[0][k], ins[0][k], r, ctx))

  def r_pad(self, f, i, eqn, ins, outs, ctx):
    for k, (lo, hi, interior) in enumerate(eqn.params["padding_config"]):
      if (lo, hi, interior) == (0, 0, 0):
        self.d.union(ins[0][k], outs[0][k], ctx)
      else:
        self.add(_Pad(outs[0][k], ins[0][k], lo, hi, interior, ctx), f, i)

  def r_slice(self, f, i, eqn, ins, outs, ctx):
    p, shape = eqn.params, _shape(eqn.invars[0])
    self.sliced(ins, outs, ctx, [lo == 0 and hi == n and (not p["strides"] or p["strides"][k] == 1)
                                 for k, (lo, hi, n) in enumerate(zip(p["start_indices"], p["limit_indices"], shape))])

  def r_dynamic_slice(self, f, i, eqn, ins, outs, ctx):
    self.sliced(ins, outs, ctx, [s == n for s, n in zip(eqn.params["slice_sizes"], _shape(eqn.invars[0]))])

  def sliced(self, ins, outs, ctx, full):
    d = self.d
    for k, whole in enumerate(full):
      if whole:
        d.union(ins[0][k], outs[0][k], ctx)
      else:
        d.pin_orig(ins[0][k], f"{ctx}: slices part of axis {k}, which resize can only keep at its original size")
        d.set(outs[0][k], d.orig[outs[0][k]], ctx)

  def r_dynamic_update_slice(self, f, i, eqn, ins, outs, ctx):
    d = self.d
    for k, (a, b) in enumerate(zip(ins[0], ins[1])):
      d.union(a, outs[0][k], ctx)
      if d.orig[a] == d.orig[b]:
        d.union(a, b, ctx)
      else:
        d.pin_orig(a, f"{ctx}: updates part of axis {k}, which resize can only keep at its original size")
        d.pin_orig(b, ctx)

  def window(self, f, i, eqn, ins, outs, ctx):
    """Pooling (``reduce_window``: its operands, then as many scalar initial values)."""
    d, p = self.d, eqn.params
    ident = lambda k: (p["window_dimensions"][k] == 1 and p["window_strides"][k] == 1
                       and tuple(p["padding"][k]) == (0, 0) and p["base_dilation"][k] == 1
                       and p["window_dilation"][k] == 1)
    for x, o in zip(ins, outs):
      for k in range(len(x)):
        if ident(k):
          d.union(x[k], o[k], ctx)
        else:
          d.pin_orig(x[k], f"{ctx}: pools over axis {k}, which resize can only keep at its original size")
          d.set(o[k], d.orig[o[k]], ctx)

  def r_iota(self, f, i, eqn, ins, outs, ctx):
    pass  # its axes are whatever its users need (else their original sizes)

  def r_while(self, f, i, eqn, ins, outs, ctx):
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    carry = ins[nc + nb:]
    cf = self.frame(p["cond_jaxpr"], ins[:nc] + carry)
    bf = self.frame(p["body_jaxpr"], ins[nc:nc + nb] + carry)
    f.subs[i] = [cf, bf]
    self.tie(bf, bf.jaxpr.outvars, carry, ctx)
    for a, b in zip(carry, outs):
      for x, y in zip(a, b):
        self.d.union(x, y, ctx)

  def r_cond(self, f, i, eqn, ins, outs, ctx):
    f.subs[i] = []
    for br in eqn.params["branches"]:
      bf = self.frame(br, ins[1:])
      f.subs[i].append(bf)
      self.tie(bf, bf.jaxpr.outvars, outs, ctx)

  def tie(self, sub: _Frame, outvars, outs, ctx):
    for v, nodes in zip(outvars, outs):
      for a, b in zip(self.dims_of(sub, v), nodes):
        self.d.union(a, b, ctx)

  def r_conv_general_dilated(self, f, i, eqn, ins, outs, ctx):
    d, p = self.d, eqn.params
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    lhs, rhs, out = ins[0], ins[1], outs[0]
    u = lambda a, b: d.union(a, b, ctx)
    u(lhs[lhs_spec[0]], out[out_spec[0]])
    u(rhs[rhs_spec[0]], out[out_spec[1]])
    for k in lhs_spec[2:]:
      d.pin_orig(lhs[k], f"{ctx}: a spatial axis of the conv input changes size")
    for k in rhs_spec[2:]:
      d.pin_orig(rhs[k], f"{ctx}: a spatial axis of the conv kernel changes size")
    for k in out_spec[2:]:
      d.set(out[k], d.orig[out[k]], ctx)
    groups, c_in, k_in = p["feature_group_count"], lhs[lhs_spec[1]], rhs[rhs_spec[1]]
    if p["batch_group_count"] != 1:
      self.opaque(ins, outs, ctx, "batch_group_count > 1 is not supported")
    elif groups == 1:
      u(c_in, k_in)
    elif d.orig[k_in] == 1:  # depthwise: one group per input channel, `mult` output channels each
      self.add(_Scale(rhs[rhs_spec[0]], c_in, d.orig[rhs[rhs_spec[0]]] // groups, ctx), f, i)
    else:  # grouped: the number of groups stays, each group's width may shrink
      self.add(_Scale(c_in, k_in, groups, ctx))

  def r_gather(self, f, i, eqn, ins, outs, ctx):
    """Whole operand axes (an embedding's features) follow their operand; sliced or indexed axes keep their size."""
    d, p = self.d, eqn.params
    dn, sizes, (op, idx), out = p["dimension_numbers"], p["slice_sizes"], ins, outs[0]
    offset = [k for k in range(len(op)) if k not in dn.collapsed_slice_dims and k not in dn.operand_batching_dims]
    for k, pos in zip(offset, dn.offset_dims):
      if sizes[k] == d.orig[op[k]]:
        d.union(op[k], out[pos], ctx)
      else:
        d.pin_orig(op[k], f"{ctx}: gathers slices of part of axis {k}, which resize can only keep at its original size")
        d.set(out[pos], d.orig[out[pos]], ctx)
    for k in dn.collapsed_slice_dims:
      d.pin_orig(op[k], f"{ctx}: indexes axis {k}, which resize can only keep at its original size")
    for a, b in zip(dn.operand_batching_dims, dn.start_indices_batching_dims):
      d.union(op[a], idx[b], ctx)
    batch = [k for k in range(len(out)) if k not in dn.offset_dims]
    for a, b in zip(idx[:-1], batch):
      d.union(a, out[b], ctx)

  def r_scan(self, f, i, eqn, ins, outs, ctx):
    d, p = self.d, eqn.params
    nc, nk = p["num_consts"], p["num_carry"]
    consts, carry, xs = ins[:nc], ins[nc:nc + nk], ins[nc + nk:]
    for nodes in xs:
      d.pin_orig(nodes[0], f"{ctx}: the scanned axis changes length")
    bf = self.frame(p["jaxpr"], consts + carry + [nodes[1:] for nodes in xs])
    f.subs[i] = [bf]
    body_outs = [self.dims_of(bf, v) for v in bf.jaxpr.outvars]
    for a, b, c in zip(carry, body_outs[:nk], outs[:nk]):
      for x, y, z in zip(a, b, c):
        d.union(x, y, ctx)
        d.union(x, z, ctx)
    for b, o in zip(body_outs[nk:], outs[nk:]):
      d.set(o[0], d.orig[o[0]], ctx)
      for x, y in zip(b, o[1:]):
        d.union(x, y, ctx)
