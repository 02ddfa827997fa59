"""The constraint system of :func:`ifjax.resize`: the new size of every axis of a traced program.

Every axis of every value is a node of :class:`_Dims`; axes that must have one
size (an element-wise op's operands, a contraction's paired axes) are one set of
its union-find. The other relations are constraints between sets: ``out = sum(parts)``
(:class:`_Sum`: concatenate, split), ``out = lo + in + hi`` (:class:`_Pad`),
``big = k * small`` (:class:`_Scale`: depthwise and grouped convs) and
``prod(ins) = prod(outs)`` (:class:`_Reshape`). :func:`solve` propagates the sizes
the pruned variables fix; where the shapes leave a choice open, each constraint's
``default`` makes it (see :mod:`ifjax._trace.resize`); axes nothing constrains keep
their original size. :mod:`ifjax._trace.axis_rules` builds the system from a jaxpr.
"""

from __future__ import annotations

import math

from ifjax._errors import IfjaxError
from ifjax._trace.unionfind import UnionFind


class ResizeError(IfjaxError, ValueError):
  """The program cannot be re-evaluated at the pruned shapes (or the pruned variables do not fit it)."""


class _Dims(UnionFind):
  """The axes of a program as the nodes of a :class:`UnionFind`: axes of one set have one size. Each set has
  its original size and its new size (``None`` while unknown)."""

  def __init__(self):
    super().__init__()
    self.orig: list[int] = []
    self.new: list[int | None] = []
    self.pin: dict[int, str] = {}  # root -> why this axis must keep its size
    self.progress = False

  def node(self, orig: int, new: int | None = None) -> int:
    """A new axis of original size ``orig`` (``new``: its new size, if known)."""
    self.orig.append(int(orig))
    self.new.append(1 if orig == 1 else new)
    return self.add()

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
    self.link(a, b)
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


def solve(d: _Dims, cons: list) -> None:
  """Gives every axis of ``d`` its new size: propagates ``cons``, then takes their defaults, then keeps the
  original size of an axis nothing constrains, until every axis is known."""
  start = 0
  while True:
    d.progress = True
    while d.progress:
      d.progress = False
      for c in cons:
        c.propagate(d)
    if any(c.default(d) for c in cons):
      continue
    while start < len(d) and d.new[d.find(start)] is not None:  # known axes stay known
      start += 1
    if start == len(d):
      return
    d.set(start, d.orig[start], "an unconstrained axis")
