"""Running a pruned model at its smaller shapes without rewriting it: :func:`resize` and :func:`resize_nnx`.

``resize`` traces ``apply_fn`` to a jaxpr at the *original* variable shapes and
re-evaluates it equation by equation on the pruned variables. Every axis of every
value of the program is a node of a small constraint system: the pruned
variables fix their axes, element-wise ops, contractions and convolutions equate
axes, concatenations and zero pads add them up, reshapes multiply them. Solving
it gives each value's new shape, and from it the new parameters of the
shape-carrying primitives (``reshape`` sizes, ``broadcast_in_dim`` and ``iota``
shapes, ``pad`` amounts, the ``feature_group_count`` of depthwise convs, full
slices). Axes that nothing constrains keep their original size.

Choices the shapes alone leave open, made by documented rules:

- a reshape that splits a shrunk axis (``heads * head_dim``): the outermost
  factor shrinks (whole heads are pruned), if it divides; else the next one;
- a zero pad on both sides of a shrunk axis (the option-A shortcut) and the free
  parts of a concatenation keep their original proportions (as a uniform ratio
  prunes them); if that is not an integer split, :class:`ResizeError`.

A shrunk axis holds the kept channels first (the zero-padded model has zeros
after them), so a program that reorders it (a reversal, a sort or argsort, a
gather or slice of part of it, a backwards cumulative product / max / min)
cannot be followed and raises :class:`ResizeError`. Anything else that cannot be
followed raises it too, naming the primitive and the shapes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.extend as jex
import numpy as np

from ifjax._errors import IfjaxError


class ResizeError(IfjaxError, ValueError):
  """The program cannot be re-evaluated at the pruned shapes (or the pruned variables do not fit it)."""


# -- the constraint system over axis sizes ------------------------------------------------------------
class _Dims:
  """Union-find over axes. Each node has its original size and its new size (``None`` while unknown)."""

  def __init__(self):
    self.parent: list[int] = []
    self.orig: list[int] = []
    self.new: list[int | None] = []
    self.pin: dict[int, str] = {}  # root -> why this axis must keep its size
    self.progress = False

  def node(self, orig: int, new: int | None = None) -> int:
    self.parent.append(len(self.parent))
    self.orig.append(int(orig))
    self.new.append(1 if orig == 1 else new)
    return len(self.parent) - 1

  def find(self, n: int) -> int:
    while self.parent[n] != n:
      self.parent[n] = self.parent[self.parent[n]]
      n = self.parent[n]
    return n

  def value(self, n: int) -> int | None:
    return self.new[self.find(n)]

  def _conflict(self, root, a, b, ctx):
    why = self.pin.get(root)
    if why:
      raise ResizeError(f"{why} (size {self.orig[root]} -> {b if a == self.orig[root] else a})")
    raise ResizeError(f"{ctx}: an axis of original size {self.orig[root]} would have to be {a} and {b} at once "
                      "(the pruned variables shrink coupled axes differently)")

  def set(self, n: int, v: int, ctx: str):
    r = self.find(n)
    if v < 1:
      raise ResizeError(f"{ctx}: an axis of original size {self.orig[r]} would get size {v}")
    if self.new[r] is None:
      self.new[r] = int(v)
      self.progress = True
    elif self.new[r] != v:
      self._conflict(r, self.new[r], v, ctx)

  def pin_orig(self, n: int, why: str):
    """The axis must keep its original size; ``why`` is the error message otherwise."""
    r = self.find(n)
    self.pin.setdefault(r, why)
    self.set(r, self.orig[r], why)

  def union(self, a: int, b: int, ctx: str):
    a, b = self.find(a), self.find(b)
    if a == b:
      return
    if self.orig[a] != self.orig[b]:
      raise ResizeError(f"{ctx}: internal error, equating axes of sizes {self.orig[a]} and {self.orig[b]}")
    va, vb = self.new[a], self.new[b]
    if va is not None and vb is not None and va != vb:
      self._conflict(a if a in self.pin else b, va, vb, ctx)
    self.parent[b] = a
    if va is None and vb is not None:
      self.new[a] = vb
      self.progress = True
    if b in self.pin:
      self.pin.setdefault(a, self.pin[b])


class _Sum:
  """``out = sum(parts)`` (concatenate, split). Free parts of a known total keep their proportions."""

  def __init__(self, out, parts, ctx):
    self.out, self.parts, self.ctx = out, parts, ctx

  def propagate(self, d: _Dims):
    vals = [d.value(p) for p in self.parts]
    unknown = [p for p, v in zip(self.parts, vals) if v is None]
    total = d.value(self.out)
    if not unknown:
      d.set(self.out, sum(vals), self.ctx)
    elif total is not None and len(unknown) == 1:
      d.set(unknown[0], total - sum(v for v in vals if v is not None), self.ctx)

  def default(self, d: _Dims) -> bool:
    unknown = [p for p in self.parts if d.value(p) is None]
    total = d.value(self.out)
    if total is None or len(unknown) < 2:
      return False
    rest = total - sum(d.value(p) for p in self.parts if d.value(p) is not None)
    origs = [d.orig[d.find(p)] for p in unknown]
    shares = [rest * o / sum(origs) for o in origs]
    if any(s != int(s) for s in shares):
      raise ResizeError(f"{self.ctx}: the free parts of sizes {origs} must share {rest} entries, which their original "
                        "proportions do not split into integers")
    for p, s in zip(unknown, shares):
      d.set(p, int(s), self.ctx)
    return True


class _Pad:
  """``out = lo + in + hi`` (``pad`` on one axis). A shrunk axis keeps the lo : hi proportion of the padding."""

  def __init__(self, out, inp, lo, hi, interior, ctx):
    self.out, self.inp, self.lo, self.hi, self.interior, self.ctx = out, inp, lo, hi, interior, ctx

  def propagate(self, d: _Dims):
    n = d.value(self.inp)
    if n is None:
      return
    if n != d.orig[d.find(self.inp)] and self.interior:
      raise ResizeError(f"{self.ctx}: interior padding of an axis the pruned variables shrink")
    if n == d.orig[d.find(self.inp)]:
      d.set(self.out, d.orig[d.find(self.out)], self.ctx)

  def default(self, d: _Dims) -> bool:
    n = d.value(self.inp)
    if n is None or d.value(self.out) is not None:
      return False
    d.set(self.out, self.lo + n + self.hi, self.ctx)
    return True

  def config(self, d: _Dims) -> tuple[int, int, int]:
    n, out = d.value(self.inp), d.value(self.out)
    if n == d.orig[d.find(self.inp)]:
      return self.lo, self.hi, self.interior
    slack = out - n
    if self.lo == 0 or self.hi == 0:
      return (0, slack, 0) if self.lo == 0 else (slack, 0, 0)
    lo = slack * self.lo / (self.lo + self.hi)
    if lo != int(lo):
      raise ResizeError(f"{self.ctx}: padding ({self.lo}, {self.hi}) must become {slack} entries in total, which "
                        "the original proportion does not split into integers")
    return int(lo), slack - int(lo), 0


class _Scale:
  """``big = k * small`` (a depthwise conv's output channels per input channel; a grouped conv's groups)."""

  def __init__(self, big, small, k, ctx):
    self.big, self.small, self.k, self.ctx = big, small, k, ctx

  def propagate(self, d: _Dims):
    b, s = d.value(self.big), d.value(self.small)
    if s is not None:
      d.set(self.big, self.k * s, self.ctx)
    elif b is not None:
      if b % self.k:
        raise ResizeError(f"{self.ctx}: {b} channels are not a multiple of {self.k}")
      d.set(self.small, b // self.k, self.ctx)

  def default(self, d: _Dims) -> bool:
    return False


class _Reshape:
  """One group of a reshape: ``prod(ins) = prod(outs)``. A split shrinks the outermost factor that divides."""

  def __init__(self, ins, outs, ctx):
    self.ins, self.outs, self.ctx = ins, outs, ctx

  def propagate(self, d: _Dims):
    for a, b in ((self.ins, self.outs), (self.outs, self.ins)):
      va = [d.value(n) for n in a]
      if None in va:
        continue
      vb = [d.value(n) for n in b]
      unknown = [n for n, v in zip(b, vb) if v is None]
      known = math.prod(v for v in vb if v is not None)
      if not unknown and known != math.prod(va):
        raise ResizeError(f"{self.ctx}: {math.prod(va)} entries cannot be reshaped into {vb}")
      if len(unknown) == 1:
        if math.prod(va) % known:
          raise ResizeError(f"{self.ctx}: {math.prod(va)} entries are not divisible by the other factors {known}")
        d.set(unknown[0], math.prod(va) // known, self.ctx)

  def default(self, d: _Dims) -> bool:
    for a, b in ((self.ins, self.outs), (self.outs, self.ins)):
      if any(d.value(n) is None for n in a) or all(d.value(n) is not None for n in b):
        continue
      total = math.prod(d.value(n) for n in a)
      unknown = [n for n in b if d.value(n) is None]
      known = math.prod(d.value(n) for n in b if d.value(n) is not None)
      for n in unknown:  # outermost first
        rest = known * math.prod(d.orig[d.find(m)] for m in unknown if m != n)
        if total % rest == 0 and 1 <= total // rest <= d.orig[d.find(n)]:
          for m in unknown:
            d.set(m, total // rest if m == n else d.orig[d.find(m)], self.ctx)
          return True
      raise ResizeError(f"{self.ctx}: cannot split {total} entries into axes of original sizes "
                        f"{[d.orig[d.find(n)] for n in b]} by shrinking one of them")
    return False


def _reshape_groups(old, new):
  """Index groups ``(old axes, new axes)`` with equal products (row-major); size-1 axes join either side."""
  groups, i, j = [], 0, 0
  while i < len(old) or j < len(new):
    gi, gj, pi, pj = [], [], 1, 1
    while True:
      if i < len(old) and (pi < pj or (pi == pj and not gi)):
        gi.append(i)
        pi *= old[i]
        i += 1
      elif j < len(new) and (pj < pi or (pi == pj and not gj)):
        gj.append(j)
        pj *= new[j]
        j += 1
      else:
        break
    groups.append((gi, gj))
  return groups


# -- building the system: one frame per (sub-)jaxpr instance -------------------------------------------
@dataclasses.dataclass
class _Frame:
  jaxpr: Any
  consts: list
  dims: dict = dataclasses.field(default_factory=dict)  # var -> [node per axis]
  subs: dict = dataclasses.field(default_factory=dict)  # eqn index -> [frames]
  cons: dict = dataclasses.field(default_factory=dict)  # eqn index -> constraints that rewrite its params


_ELEMENTWISE = {
    "add", "sub", "mul", "div", "max", "min", "neg", "exp", "exp2", "log", "log1p", "tanh", "logistic", "abs",
    "sqrt", "rsqrt", "integer_pow", "pow", "square", "erf", "erfc", "sign", "sin", "cos", "tan", "expm1", "clamp",
    "ge", "gt", "le", "lt", "eq", "ne", "and", "or", "not", "xor", "nextafter", "is_finite", "erf_inv", "cbrt",
    "floor", "ceil", "round", "atan2", "rem", "add_any", "select_n", "convert_element_type", "copy", "copy_p",
    "reduce_precision", "cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp", "sort", "rev", "stop_gradient",
    "sharding_constraint", "real", "imag", "conj", "asin", "acos", "atan", "sinh", "cosh",
    "asinh", "acosh", "atanh", "lgamma", "digamma", "population_count", "shift_left", "shift_right_logical",
    "shift_right_arithmetic", "logaddexp",
}
_CALLS = {"jit", "pjit", "closed_call", "core_call", "remat", "checkpoint", "custom_jvp_call", "custom_vjp_call",
          "custom_vjp_call_jaxpr", "remat2"}
_REDUCE = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or", "reduce_xor",
           "argmax", "argmin"}
_WINDOW = {"reduce_window_sum", "reduce_window_max", "reduce_window_min"}


def _order_dependent(name: str, p, ndim: int) -> list[tuple[int, str]]:
  """``(axis, what the primitive does to it)`` for the axes of an element-wise-shaped primitive whose result depends
  on the order of the entries along them in a way a shrunk axis cannot follow: a reversal, a sort (argsort too: it
  is a sort of an iota along), a backwards cumulative product / max / min / log-sum-exp (zeros at the end of a
  shrunk axis then come first). A forwards one and any cumulative sum see the zeros last or add nothing."""
  if name == "rev":
    return [(k % ndim, "reverses") for k in p["dimensions"]]
  if name == "sort":
    return [(p["dimension"] % ndim, "sorts along")]
  if name in ("cumprod", "cummax", "cummin", "cumlogsumexp") and p.get("reverse"):
    return [(p["axis"] % ndim, f"accumulates ({name}) backwards along")]
  return []


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
    d, name, p = self.d, eqn.primitive.name, eqn.params
    ctx = (f"primitive {name!r} with operand shapes {[_shape(v) for v in eqn.invars]} and result shapes"
           f" {[_shape(v) for v in eqn.outvars]}{_where(eqn)}")
    u = lambda a, b: d.union(a, b, ctx)
    if name == "optimization_barrier":
      for a, b in zip(ins, outs):
        for x, y in zip(a, b):
          u(x, y)
    elif name in _ELEMENTWISE:  # equal shapes, up to scalars and size-1 axes that broadcast
      for nodes in ins + outs[1:]:
        if len(nodes) == len(outs[0]):
          for a, b in zip(nodes, outs[0]):
            if d.orig[a] == d.orig[b]:
              u(a, b)
      for k, what in _order_dependent(name, p, len(outs[0])):
        d.pin_orig(outs[0][k], f"{ctx}: {what} axis {k}, which resize can only keep at its original size (a pruned "
                   "axis holds the kept channels first and the zero-padded model zeros after them, so reordering "
                   "it no longer lines up with the next layer's weights)")
    elif name in _CALLS:
      sub = next(p[k] for k in ("jaxpr", "call_jaxpr", "fun_jaxpr") if k in p)
      inner = getattr(sub, "jaxpr", sub)
      if len(inner.invars) != len(ins):
        raise ResizeError(f"{ctx}: a call whose operands do not map onto its sub-jaxpr's inputs")
      sf = self.frame(sub, ins)
      f.subs[i] = [sf]
      self.tie(sf, inner.outvars, outs, ctx)
    elif name == "broadcast_in_dim":
      (x, *_), o = ins, outs[0]
      xs, os_ = _shape(eqn.invars[0]), _shape(eqn.outvars[0])
      for k, dim in enumerate(p["broadcast_dimensions"]):
        if xs[k] == os_[dim]:
          u(x[k], o[dim])
    elif name == "reshape":
      if p.get("dimensions") is not None:
        self.opaque(ins, outs, ctx, "a reshape with a transposing `dimensions`")
        return
      old, new = _shape(eqn.invars[0]), _shape(eqn.outvars[0])
      for gi, gj in _reshape_groups(old, new):
        a, b = [ins[0][k] for k in gi if old[k] > 1], [outs[0][k] for k in gj if new[k] > 1]
        if len(a) == len(b) == 1:
          u(a[0], b[0])
        elif a or b:
          self.add(_Reshape(a, b, ctx))
    elif name == "transpose":
      for k, src in enumerate(p["permutation"]):
        u(outs[0][k], ins[0][src])
    elif name == "squeeze":
      keep = [k for k in range(len(ins[0])) if k not in p["dimensions"]]
      for k, src in enumerate(keep):
        u(outs[0][k], ins[0][src])
    elif name in _REDUCE:
      keep = [k for k in range(len(ins[0])) if k not in p["axes"]]
      for k, src in enumerate(keep):
        u(outs[0][k], ins[0][src])
    elif name == "dot_general":
      (lc, rc), (lb, rb) = p["dimension_numbers"]
      lhs, rhs = ins[0], ins[1]
      for a, b in zip(lc + lb, rc + rb):
        u(lhs[a], rhs[b])
      free = [lhs[k] for k in lb] + [lhs[k] for k in range(len(lhs)) if k not in lc and k not in lb]
      free += [rhs[k] for k in range(len(rhs)) if k not in rc and k not in rb]
      for a, b in zip(free, outs[0]):
        u(a, b)
    elif name == "conv_general_dilated":
      self.conv(f, i, eqn, ins, outs, ctx)
    elif name in ("concatenate", "split"):  # the whole is the sum of its parts along ax, equal elsewhere
      whole, parts, ax = (outs[0], ins, p["dimension"]) if name == "concatenate" else (ins[0], outs, p["axis"])
      for nodes in parts:
        for k in range(len(nodes)):
          if k != ax:
            u(nodes[k], whole[k])
      self.add(_Sum(whole[ax], [nodes[ax] for nodes in parts], ctx))
    elif name == "pad":
      for k, (lo, hi, interior) in enumerate(p["padding_config"]):
        if (lo, hi, interior) == (0, 0, 0):
          u(ins[0][k], outs[0][k])
        else:
          self.add(_Pad(outs[0][k], ins[0][k], lo, hi, interior, ctx), f, i)
    elif name in ("slice", "dynamic_slice"):
      shape = _shape(eqn.invars[0])
      if name == "slice":
        full = [s == 0 and l == n and (not p["strides"] or p["strides"][k] == 1)
                for k, (s, l, n) in enumerate(zip(p["start_indices"], p["limit_indices"], shape))]
      else:
        full = [s == n for s, n in zip(p["slice_sizes"], shape)]
      for k, whole in enumerate(full):
        if whole:
          u(ins[0][k], outs[0][k])
        else:
          d.pin_orig(ins[0][k], f"{ctx}: slices part of axis {k}, which resize can only keep at its original size")
          d.set(outs[0][k], d.orig[outs[0][k]], ctx)
    elif name == "dynamic_update_slice":
      for k, (a, b) in enumerate(zip(ins[0], ins[1])):
        u(a, outs[0][k])
        if d.orig[a] == d.orig[b]:
          u(a, b)
        else:
          d.pin_orig(a, f"{ctx}: updates part of axis {k}, which resize can only keep at its original size")
          d.pin_orig(b, ctx)
    elif name in _WINDOW:
      ident = lambda k: (p["window_dimensions"][k] == 1 and p["window_strides"][k] == 1
                         and tuple(p["padding"][k]) == (0, 0) and p["base_dilation"][k] == 1
                         and p["window_dilation"][k] == 1)
      for k in range(len(ins[0])):
        if ident(k):
          u(ins[0][k], outs[0][k])
        else:
          d.pin_orig(ins[0][k], f"{ctx}: pools over axis {k}, which resize can only keep at its original size")
          d.set(outs[0][k], d.orig[outs[0][k]], ctx)
    elif name == "gather":
      self.gather(eqn, ins, outs, ctx)
    elif name == "iota":
      pass  # its axes are whatever its users need (else their original sizes)
    elif name == "scan":
      self.scan(f, i, eqn, ins, outs, ctx)
    elif name == "while":
      nc, nb = p["cond_nconsts"], p["body_nconsts"]
      carry = ins[nc + nb:]
      cf = self.frame(p["cond_jaxpr"], ins[:nc] + carry)
      bf = self.frame(p["body_jaxpr"], ins[nc:nc + nb] + carry)
      f.subs[i] = [cf, bf]
      self.tie(bf, bf.jaxpr.outvars, carry, ctx)
      for a, b in zip(carry, outs):
        for x, y in zip(a, b):
          u(x, y)
    elif name == "cond":
      f.subs[i] = []
      for br in p["branches"]:
        bf = self.frame(br, ins[1:])
        f.subs[i].append(bf)
        self.tie(bf, bf.jaxpr.outvars, outs, ctx)
    else:
      self.opaque(ins, outs, ctx)

  def tie(self, sub: _Frame, outvars, outs, ctx):
    for v, nodes in zip(outvars, outs):
      for a, b in zip(self.dims_of(sub, v), nodes):
        self.d.union(a, b, ctx)

  def conv(self, f, i, eqn, ins, outs, ctx):
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

  def gather(self, eqn, ins, outs, ctx):
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

  def scan(self, f, i, eqn, ins, outs, ctx):
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


def _solve(b: _Builder):
  d, start = b.d, 0
  while True:
    d.progress = True
    while d.progress:
      d.progress = False
      for c in b.cons:
        c.propagate(d)
    if any(c.default(d) for c in b.cons):
      continue
    while start < len(d.parent) and d.new[d.find(start)] is not None:  # known axes stay known
      start += 1
    if start == len(d.parent):
      return
    d.set(start, d.orig[start], "an unconstrained axis")


# -- evaluation at the new shapes ---------------------------------------------------------------------
def _new_shape(d: _Dims, nodes) -> tuple[int, ...]:
  return tuple(d.value(n) for n in nodes)


def _eval(d: _Dims, f: _Frame, invals: list) -> list:
  env = dict(zip(f.jaxpr.constvars, f.consts))
  env.update(zip(f.jaxpr.invars, invals))
  read = lambda v: v.val if isinstance(v, jex.core.Literal) else env[v]
  for i, eqn in enumerate(f.jaxpr.eqns):
    ins = [read(v) for v in eqn.invars]
    outs = _eval_eqn(d, f, i, eqn, ins)
    for v, x in zip(eqn.outvars, outs):
      want = _new_shape(d, f.dims[v])
      if np.shape(x) != want:
        raise ResizeError(f"primitive {eqn.primitive.name!r}{_where(eqn)} gave shape {np.shape(x)} where the resized "
                          f"program needs {want} (original {_shape(v)})")
      env[v] = x
  return [read(v) for v in f.jaxpr.outvars]


def _eval_eqn(d: _Dims, f: _Frame, i: int, eqn, ins: list) -> list:
  name, p = eqn.primitive.name, dict(eqn.params)
  out_shapes = [_new_shape(d, f.dims[v]) for v in eqn.outvars]
  if name in _CALLS:
    return _eval(d, f.subs[i][0], ins)
  if name == "scan":
    nc, nk = p["num_consts"], p["num_carry"]
    body = f.subs[i][0]

    def step(carry, x):
      out = _eval(d, body, [*ins[:nc], *carry, *x])
      return out[:nk], out[nk:]

    carry, ys = jax.lax.scan(step, list(ins[nc:nc + nk]), list(ins[nc + nk:]), length=p["length"],
                             reverse=p["reverse"], unroll=p["unroll"])
    return [*carry, *ys]
  if name == "while":
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    cf, bf = f.subs[i]
    return jax.lax.while_loop(lambda c: _eval(d, cf, [*ins[:nc], *c])[0],
                              lambda c: _eval(d, bf, [*ins[nc:nc + nb], *c]), list(ins[nc + nb:]))
  if name == "cond":
    branches = [lambda *ops, bf=bf: _eval(d, bf, list(ops)) for bf in f.subs[i]]
    return jax.lax.switch(ins[0], branches, *ins[1:])
  if name == "reshape":
    p["new_sizes"] = out_shapes[0]
  elif name in ("broadcast_in_dim", "iota"):
    p["shape"] = out_shapes[0]
  elif name == "pad":
    pads = {c.out: c.config(d) for c in f.cons.get(i, ())}
    p["padding_config"] = tuple(pads.get(n, cfg) for n, cfg in zip(f.dims[eqn.outvars[0]], p["padding_config"]))
  elif name == "conv_general_dilated" and i in f.cons:
    p["feature_group_count"] = d.value(f.dims[eqn.invars[0]][p["dimension_numbers"][0][1]])
  elif name == "slice":
    p["limit_indices"] = tuple(new if (s, l) == (0, old) else l for s, l, old, new in
                               zip(p["start_indices"], p["limit_indices"], _shape(eqn.invars[0]), np.shape(ins[0])))
  elif name in ("dynamic_slice", "gather"):  # whole axes follow the operand
    p["slice_sizes"] = tuple(new if s == old else s for s, old, new in
                             zip(p["slice_sizes"], _shape(eqn.invars[0]), np.shape(ins[0])))
  elif name == "split":
    p["sizes"] = tuple(s[p["axis"]] for s in out_shapes)
  out = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(p))
  return list(out) if eqn.primitive.multiple_results else [out]


# -- public API ---------------------------------------------------------------------------------------
def _key_path(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _check_small(variables_struct, small_variables):
  leaves, treedef = jax.tree_util.tree_flatten_with_path(small_variables)
  if treedef != variables_struct[1]:
    raise ResizeError(f"small_variables do not have the tree structure of the original variables:\n"
                      f"original {variables_struct[1]}\nsmall    {treedef}")
  for (path, x), ref in zip(leaves, variables_struct[0]):
    shape = np.shape(x)
    if len(shape) != len(ref.shape) or any(not 1 <= s <= r for s, r in zip(shape, ref.shape)):
      raise ResizeError(f"{_key_path(path)!r}: shape {shape} does not fit the original {ref.shape} (same rank, "
                        "every axis between 1 and its original size)")


def resize(apply_fn: Callable[..., Any], variables, small_variables, *args, **kwargs) -> Callable[..., Any]:
  """``small_apply(small_variables, *args, **kwargs)``: ``apply_fn`` re-evaluated at the pruned shapes.

  ``variables`` are the ones ``apply_fn`` was written for (only their shapes and
  dtypes are kept); ``small_variables`` have the same tree with every axis at most
  its original size, e.g. ``ifjax.apply_plan(variables, spec, plan)``. The example
  ``args`` / ``kwargs`` are checked once here; non-array keyword arguments
  (``train=False``) are static. ``small_apply`` is jit-able, accepts other
  argument shapes (each new shape is traced once) and computes what ``apply_fn``
  computes on the zero-padded ``apply_plan(..., keep_shapes=True)`` variables.
  Constants of the program keep their values, so a mean over a pruned axis (a
  LayerNorm's) still divides by the original length, as the zero-padded model
  does. Where the shapes leave a choice open (a split of ``heads * head_dim``, the
  two sides of a zero pad), the rules of this module's docstring decide: prune
  whole heads, and prune option-A padding segments at one ratio.
  Custom derivative rules of the program (``custom_jvp`` / ``custom_vjp``) are
  inlined: gradients go through their primal computation.

  Raises :class:`ResizeError` naming the primitive and shapes it cannot follow.

  >>> import flax.linen as nn, jax, jax.numpy as jnp, ifjax
  >>> net = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
  >>> x = jnp.ones((4, 3))
  >>> v = net.init(jax.random.key(0), x)
  >>> small = jax.tree.map(lambda a: a[..., :5] if a.shape[-1] == 8 else a, v)       # 5 of 8 hidden neurons
  >>> small["params"]["layers_2"]["kernel"] = v["params"]["layers_2"]["kernel"][:5]
  >>> ifjax.resize(net.apply, v, small, x)(small, x).shape
  (4, 2)
  """
  leaves, treedef = jax.tree_util.tree_flatten(variables)
  struct = ([jax.ShapeDtypeStruct(np.shape(x), jax.numpy.result_type(x)) for x in leaves], treedef)
  cache: dict = {}

  def program(small_leaves, arg_leaves, arg_tree, static):
    key = (tuple((np.shape(x), jax.numpy.result_type(x)) for x in small_leaves),
           tuple((np.shape(x), jax.numpy.result_type(x)) for x in arg_leaves), arg_tree, static)
    try:
      hit = cache.get(key)
    except TypeError:  # unhashable static keyword arguments: trace every call
      key, hit = None, None
    if hit is not None:
      return hit

    def fn(var_leaves, a_leaves):
      a, kw = jax.tree_util.tree_unflatten(arg_tree, a_leaves)
      return apply_fn(jax.tree_util.tree_unflatten(treedef, var_leaves), *a, **kw, **dict(static))

    orig = [jax.ShapeDtypeStruct(s.shape, jax.numpy.result_type(x)) for s, x in zip(struct[0], small_leaves)]
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(orig, list(arg_leaves))
    b = _Builder()
    in_nodes = [[b.d.node(o, n) for o, n in zip(s.shape, np.shape(x))] for s, x in zip(orig, small_leaves)]
    in_nodes += [[b.d.node(s, s) for s in np.shape(x)] for x in arg_leaves]
    top = b.frame(closed, in_nodes)
    _solve(b)
    hit = (b.d, top, jax.tree_util.tree_structure(out_shape))
    if key is not None:
      cache[key] = hit
    return hit

  def small_apply(small, *a, **kw):
    _check_small(struct, small)
    arrays = {k: v for k, v in kw.items() if isinstance(v, (jax.Array, np.ndarray))}
    static = tuple(sorted((k, v) for k, v in kw.items() if k not in arrays))
    arg_leaves, arg_tree = jax.tree_util.tree_flatten((a, arrays))
    small_leaves = jax.tree_util.tree_leaves(small)
    d, top, out_tree = program(small_leaves, arg_leaves, arg_tree, static)
    return jax.tree_util.tree_unflatten(out_tree, _eval(d, top, [*small_leaves, *arg_leaves]))

  jax.eval_shape(lambda s: small_apply(s, *args, **kwargs), small_variables)  # fail here, not at the first call
  return small_apply


def resize_nnx(model, small_variables):
  """A new NNX module like ``model`` at the pruned shapes of ``small_variables``.

  ``small_variables`` are in the layout of :func:`ifjax.nnx_apply` (``{"params": ..., "batch_stats": ...}``),
  e.g. ``ifjax.intra_fuse(variables, spec, 0.5)`` of ``apply_fn, variables = ifjax.nnx_apply(model)``.
  ``model`` is not modified. The size attributes of Flax's own layers (``nnx.Linear``, ``Conv`` incl.
  depthwise ``feature_group_count``, ``LinearGeneral``, ``Embed``, ``BatchNorm``, ``LayerNorm``,
  ``RMSNorm``, ``GroupNorm``, ``MultiHeadAttention``) are set from the new arrays. A custom module whose
  ``__call__`` reads its own width attributes (a reshape into ``self.heads``) is not rewritten: run it
  with :func:`resize` on ``nnx_apply(model)`` instead.
  """
  from flax import nnx

  from ifjax._trace.nnx import nnx_apply

  _, variables = nnx_apply(model)
  leaves, treedef = jax.tree_util.tree_flatten(variables)
  _check_small(([jax.ShapeDtypeStruct(np.shape(x), jax.numpy.result_type(x)) for x in leaves], treedef),
               small_variables)
  graphdef, params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  params, stats = jax.tree.map(lambda x: x, params), jax.tree.map(lambda x: x, stats)
  nnx.replace_by_pure_dict(params, small_variables["params"])
  if "batch_stats" in small_variables:
    nnx.replace_by_pure_dict(stats, small_variables["batch_stats"])
  new = nnx.merge(graphdef, params, stats, rest)
  for _, m in nnx.iter_modules(new):
    _fix_widths(nnx, m)
  return new


def _fix_widths(nnx, m):
  """Sets the size attributes of one of Flax's NNX layers from its (new) parameter shapes."""
  shape = lambda name: tuple(getattr(m, name)[...].shape)
  if isinstance(m, nnx.Linear):
    m.in_features, m.out_features = shape("kernel")
  elif isinstance(m, (nnx.Conv, nnx.ConvTranspose)):
    k = shape("kernel")
    if m.feature_group_count > 1 and m.kernel_shape[-2] == 1:  # depthwise: `mult` outputs per input channel
      m.feature_group_count = k[-1] // (m.kernel_shape[-1] // m.feature_group_count)
      m.in_features = m.feature_group_count
    else:
      m.in_features = k[-2] * m.feature_group_count
    m.kernel_shape, m.out_features = k, k[-1]
  elif isinstance(m, nnx.LinearGeneral):
    k = shape("kernel")
    m.in_features, m.out_features = k[:len(m.in_features)], k[len(m.in_features):]
  elif isinstance(m, nnx.Embed):
    m.num_embeddings, m.features = shape("embedding")
  elif isinstance(m, (nnx.BatchNorm, nnx.LayerNorm, nnx.RMSNorm, nnx.GroupNorm)):
    arrays = [name for name in ("scale", "bias", "mean") if getattr(m, name, None) is not None]
    if arrays:
      m.num_features = shape(arrays[0])[-1]
      if isinstance(m, nnx.GroupNorm):
        m.group_size = m.num_features // m.num_groups
  elif isinstance(m, nnx.MultiHeadAttention):
    q, k, o = m.query.kernel[...].shape, m.key.kernel[...].shape, m.out.kernel[...].shape
    m.in_features, m.num_heads, m.head_dim = q
    m.qkv_features, m.in_kv_features, m.num_kv_heads, m.out_features = q[1] * q[2], k[0], k[1], o[-1]
