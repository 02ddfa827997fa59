"""Deriving a group spec by tracing a model's jaxpr: :func:`trace_spec`.

Every value of the program carries, per axis, the *channel classes* it holds:
a list of segments ``(start, length, class, class_offset)``. A producer (a
parameter contracted into a conv / dot_general output axis) opens a new class;
element-wise ops between activations merge classes (residual adds); a parameter
contracted over a labelled axis becomes a consumer of that class; per-channel
parameters added to a class's activations are biases, and BatchNorm statistics
that touch a layer's output are reported as BN pairs. Classes that reach the
program's outputs, or pass through an op that mixes channels in a way a group
cannot express, are *frozen* (not prunable) and left out of the spec.

A primitive without a rule that touches a labelled axis raises
:class:`UnsupportedPrimitiveError`: the tracer never guesses.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend as jex
import numpy as np

from ifjax._batchnorm import fold_batchnorm
from ifjax._fuse import derived_bn
from ifjax._spec import BatchNormPair, FlatMember, Group, Member, Spec, flatten, unflatten

Seg = tuple[int, int, int, int]  # (start on the axis, length, class id, offset inside the class)


class UnsupportedPrimitiveError(NotImplementedError):
  """A primitive the tracer has no rule for touches a channel axis of some parameter."""


@dataclasses.dataclass
class _Class:
  size: int
  producers: list = dataclasses.field(default_factory=list)  # (eqn index, member)
  consumers: list = dataclasses.field(default_factory=list)
  frozen: str = ""
  pieces: list | None = None  # after a split: [(start, length, class)] that replace this class


@dataclasses.dataclass
class _Value:
  """What the tracer knows about one jaxpr value.

  ``labels``: axis -> segments of channel classes (activations).
  ``params``: axis -> set of (path, param axis) for values that are per-channel
  functions of parameters only (biases, BN statistics after broadcasting).
  ``origin``: module path of the layer whose output this value still is (conv /
  dense output, plus biases and BN arithmetic), used to pair BNs with layers.
  ``param``: for a parameter seen through shape-only ops: (path, value axis -> param axis).
  """

  labels: dict[int, tuple[Seg, ...]] = dataclasses.field(default_factory=dict)
  params: dict[int, frozenset] = dataclasses.field(default_factory=dict)
  origin: str | None = None
  param: tuple[str, dict[int, int]] | None = None


class _Tracer:

  def __init__(self, shapes: dict[str, tuple[int, ...]]):
    self.shapes = shapes
    self.parent: list[int] = []
    self.classes: list[_Class] = []
    self.bn: dict[str, str] = {}  # bn module -> layer module
    self.eps: dict[str, float] = {}  # bn module -> epsilon seen in var + eps
    self.bn_modules = {p.split("/", 1)[1].rsplit("/", 1)[0] for p in shapes if p.startswith("batch_stats/")
                       and p.endswith("/var")}
    self.eqn_counter = 0

  # -- union-find over classes ----------------------------------------------------
  def new_class(self, size):
    self.parent.append(len(self.parent))
    self.classes.append(_Class(size))
    return len(self.parent) - 1

  def find(self, c):
    while self.parent[c] != c:
      self.parent[c] = self.parent[self.parent[c]]
      c = self.parent[c]
    return c

  def union(self, a, b, where):
    a, b = self.find(a), self.find(b)
    if a == b:
      return
    ca, cb = self.classes[a], self.classes[b]
    if ca.size != cb.size:
      raise UnsupportedPrimitiveError(f"{where}: couples channel groups of sizes {ca.size} and {cb.size} "
                                      "element-wise; a group has one size")
    self.parent[b] = a
    ca.producers += cb.producers
    ca.consumers += cb.consumers
    ca.frozen = ca.frozen or cb.frozen

  def split(self, c, cuts):
    """Splits class ``c`` at positions ``cuts`` (inside it) into pieces that are classes of their own:
    each member covers the piece at its offset plus the piece's start."""
    c = self.find(c)
    cls = self.classes[c]
    bounds = sorted({0, cls.size, *cuts})
    cls.pieces = []
    for lo, hi in zip(bounds, bounds[1:]):
      piece = self.new_class(hi - lo)
      p = self.classes[piece]
      p.producers = [(i, m._replace(offset=m.offset + lo)) for i, m in cls.producers]
      p.consumers = [(i, m._replace(offset=m.offset + lo)) for i, m in cls.consumers]
      p.frozen = cls.frozen
      cls.pieces.append((lo, hi - lo, piece))

  def resolve(self, seg) -> list:
    """A segment as segments of current (unsplit, root) classes."""
    if seg[0] == "flat":
      return [("flat", seg[1], seg[2], x) for x in self.resolve(seg[3])]
    s, l, c, o = seg
    c = self.find(c)
    pieces = self.classes[c].pieces
    if pieces is None:
      return [(s, l, c, o)]
    out = []
    for ps, pl, pc in pieces:
      lo, hi = max(o, ps), min(o + l, ps + pl)
      if lo < hi:
        out += self.resolve((s + lo - o, hi - lo, pc, lo - ps))
    return out

  def resolved(self, v: _Value) -> _Value:
    if not v.labels:
      return v
    return dataclasses.replace(v, labels={ax: tuple(x for seg in segs for x in self.resolve(seg))
                                          for ax, segs in v.labels.items()})

  def freeze(self, segs, why):
    for s in (x for seg in segs for x in self.resolve(seg)):
      c = self.classes[self.find(_plain(s)[2])]
      c.frozen = c.frozen or why

  # -- the interpreter --------------------------------------------------------------
  def run(self, jaxpr, inputs: Sequence[_Value]) -> list[_Value]:
    env: dict[Any, _Value] = {}
    for v, val in zip(jaxpr.invars, inputs):
      env[v] = val
    for v in jaxpr.constvars:
      env[v] = _Value()
    read = lambda v: _Value() if isinstance(v, jex.core.Literal) else self.resolved(env.get(v, _Value()))
    for eqn in jaxpr.eqns:
      self.eqn_counter += 1
      ins = [read(v) for v in eqn.invars]
      outs = self.eqn(eqn, ins)
      for v, o in zip(eqn.outvars, outs):
        env[v] = o
    return [read(v) for v in jaxpr.outvars]

  def eqn(self, eqn, ins: list[_Value]) -> list[_Value]:
    name = eqn.primitive.name
    shapes = [tuple(getattr(v.aval, "shape", ())) for v in eqn.invars]
    out_shapes = [tuple(getattr(v.aval, "shape", ())) for v in eqn.outvars]
    if name in _ELEMENTWISE:
      if name == "add":
        self.note_eps(eqn, ins)
      return [self.elementwise(name, ins, shapes, out_shapes[0])]
    if name in _IDENTITY:
      return [ins[0]] + [_Value() for _ in out_shapes[1:]]
    sub = _subjaxpr(eqn)
    if sub is not None:
      jaxpr, ins_used = sub
      return self.run(jaxpr, ins[len(ins) - len(jaxpr.invars):] if ins_used is None else ins_used)
    rule = getattr(self, "p_" + name, None)
    if rule is not None:
      return rule(eqn, ins, shapes, out_shapes)
    touched = [i for i, v in enumerate(ins) if v.labels or v.param]
    if not touched:
      return [_Value() for _ in out_shapes]
    what = self.describe(ins[touched[0]])
    raise UnsupportedPrimitiveError(
        f"no rule for primitive {name!r}, which touches {what}. Hint: write the spec by hand for this part, or "
        "keep the op out of the traced function; ifjax does not guess how a primitive moves channels.")

  def note_eps(self, eqn, ins):
    """``var + eps`` of a BatchNorm: remember its epsilon (folding needs the model's own)."""
    for v, other in ((ins[0], eqn.invars[1]), (ins[1], eqn.invars[0])):
      if (v.param and v.param[0].startswith("batch_stats/") and v.param[0].endswith("/var")
          and isinstance(other, jex.core.Literal) and np.ndim(other.val) == 0):
        self.eps[_module(v.param[0])] = float(str(np.float32(other.val)))  # 1e-3, not 0.0010000000474974513

  def describe(self, v: _Value) -> str:
    if v.param:
      return f"parameter {v.param[0]!r}"
    c = next(iter(v.labels.values()))[0][2]
    cls = self.classes[self.find(c)]
    src = cls.producers[0][1].path if cls.producers else "?"
    return f"the channels of the group produced by {src!r}"

  # -- element-wise ops ----------------------------------------------------------------
  def elementwise(self, name, ins, shapes, out_shape) -> _Value:
    out = _Value()
    ndim = len(out_shape)
    acts = [(v, s) for v, s in zip(ins, shapes) if v.labels]
    prms = [(v, s) for v, s in zip(ins, shapes) if (v.params or v.param) and not v.labels]
    for ax in range(ndim):
      segs = [v.labels[ax] for v, s in acts if ax in v.labels]
      if not segs:
        continue
      first = segs[0]
      if all([_layout(g) for g in other] == [_layout(g) for g in first] for other in segs[1:]):
        for other in segs[1:]:
          for g0, g1 in zip(first, other):
            self.union(_plain(g0)[2], _plain(g1)[2], f"{name!r}")
        out.labels[ax] = tuple(self.canonical(g) for g in first)
      elif any(g[0] == "flat" for x in segs for g in x):
        raise UnsupportedPrimitiveError(f"{name!r} combines flattened channel axes laid out differently")
      else:
        out.labels[ax] = self.overlay(segs, name)
    # per-channel parameters meeting labelled activations
    for v, s in prms:
      pmap = v.params or self.param_channels(v, s)
      for ax, members in pmap.items():
        if ax in out.labels:
          for path, pax in members:
            self.per_channel(path, pax, out.labels[ax], name, acts)
        elif not acts:
          out.params[ax] = out.params.get(ax, frozenset()) | members
    origins = {v.origin for v, _ in acts}
    if acts and len(origins) == 1 and None not in origins and name in _AFFINE:  # still that layer's output
      out.origin = origins.pop()
    kernels = [v.param[0] for v, _ in prms if v.param and v.param[0].endswith("/kernel")]
    if name == "mul" and acts and out.labels and kernels:  # a per-channel (depthwise) kernel tap
      out.origin = _module(kernels[0])
    return out

  def overlay(self, operands, name) -> tuple[Seg, ...]:
    """Labels of an element-wise op whose operands carry classes at different positions of an axis
    (e.g. a residual add of a zero-padded stream, the option-A shortcut).

    Classes are split until every class lies whole inside one region between
    segment boundaries; classes covering the same region are merged, and a
    region labelled in only one operand (the others hold zero padding or
    unlabelled data there) keeps that operand's class.
    """
    while True:
      bounds = sorted({b for segs in operands for s, l, _, _ in segs for b in (s, s + l)})
      cut = False
      for segs in operands:
        for s, l, c, o in segs:
          size = self.classes[self.find(c)].size
          cuts = {b - s + o for b in bounds if s < b < s + l} | ({o} - {0}) | ({o + l} - {size})
          if cuts:
            self.split(c, cuts)
            cut = True
      if not cut:
        break
      operands = [tuple(x for seg in segs for x in self.resolve(seg)) for segs in operands]
    regions: dict[int, list[Seg]] = {}
    for segs in operands:
      for seg in segs:
        regions.setdefault(seg[0], []).append(seg)
    out = []
    for start in sorted(regions):
      segs = regions[start]
      for other in segs[1:]:
        self.union(segs[0][2], other[2], f"{name!r}")
      out.append(self.canonical(segs[0]))
    return tuple(out)

  def canonical(self, seg):
    if seg[0] == "flat":
      return ("flat", seg[1], seg[2], self.canonical(seg[3]))
    s, l, c, o = seg
    return (s, l, self.find(c), o)

  def param_channels(self, v: _Value, shape) -> dict[int, frozenset]:
    path, axes = v.param
    return {ax: frozenset({(path, pax)}) for ax, pax in axes.items() if shape[ax] > 1}

  def per_channel(self, path, pax, segs, name, acts):
    module = path.split("/", 1)[1].rsplit("/", 1)[0]
    origin = acts[0][0].origin if len(acts) == 1 else None
    if module in self.bn_modules:
      if origin is None:
        raise UnsupportedPrimitiveError(f"BatchNorm {module!r} does not directly follow a conv / dense layer, so it "
                                        "cannot be folded; ifjax only folds BNs placed right after a layer")
      prev = self.bn.setdefault(module, origin)
      if prev != origin:
        raise UnsupportedPrimitiveError(f"BatchNorm {module!r} follows both {prev!r} and {origin!r}")
      return
    if name not in ("add", "sub", "mul"):
      raise UnsupportedPrimitiveError(f"per-channel parameter {path!r} enters channels through {name!r}; only "
                                      "biases (add), per-channel scales (mul) and BatchNorm are supported")
    if len(segs) != 1 or segs[0][0] == "flat":
      raise UnsupportedPrimitiveError(f"per-channel parameter {path!r} spans several groups or a flattened axis")
    start, length, c, off = segs[0]
    if off != 0 or length != self.classes[self.find(c)].size:
      raise UnsupportedPrimitiveError(f"bias {path!r} covers part of a group")
    cls = self.classes[self.find(c)]
    m = Member(path, pax, 0)
    if m not in [x for _, x in cls.producers]:
      cls.producers.append((self.eqn_counter, m))

  # -- shape ops -----------------------------------------------------------------------
  def p_broadcast_in_dim(self, eqn, ins, shapes, out_shapes):
    v, dims = ins[0], eqn.params["broadcast_dimensions"]
    return [_moved(v, {i: d for i, d in enumerate(dims) if shapes[0][i] == out_shapes[0][d]})]

  def p_transpose(self, eqn, ins, shapes, out_shapes):
    perm = eqn.params["permutation"]
    return [_moved(ins[0], {src: dst for dst, src in enumerate(perm)})]

  def p_squeeze(self, eqn, ins, shapes, out_shapes):
    keep = [i for i in range(len(shapes[0])) if i not in eqn.params["dimensions"]]
    return [_moved(ins[0], {src: dst for dst, src in enumerate(keep)})]

  def p_reshape(self, eqn, ins, shapes, out_shapes):
    v = ins[0]
    where = _reshape_map(shapes[0], out_shapes[0])
    out = _moved(v, {k: j for k, (j, outer, inner) in where.items() if outer == inner == 1})
    for ax, segs in v.labels.items():
      if ax not in where:
        raise UnsupportedPrimitiveError(f"reshape {shapes[0]} -> {out_shapes[0]} splits the channel axis {ax} of "
                                        f"{self.describe(v)}")
      j, outer, inner = where[ax]
      if (outer, inner) != (1, 1):
        if any(seg[0] == "flat" for seg in segs):
          raise UnsupportedPrimitiveError("a flattened channel axis is flattened again")
        out.labels[j] = tuple(("flat", outer, inner, seg) for seg in segs)
    for ax in v.params:
      if ax not in where or where[ax][1:] != (1, 1):
        raise UnsupportedPrimitiveError(f"reshape merges a channel axis of {self.describe(v)} with other axes")
    out.origin = v.origin
    return [out]

  def p_reduce_sum(self, eqn, ins, shapes, out_shapes):
    axes = eqn.params["axes"]
    v = ins[0]
    for ax in axes:
      if ax in v.labels:
        self.freeze(v.labels[ax], f"reduced over by {eqn.primitive.name}")
    keep = [i for i in range(len(shapes[0])) if i not in axes]
    out = _moved(v, {src: dst for dst, src in enumerate(keep)})
    out.origin = None
    return [out]

  p_reduce_max = p_reduce_min = p_reduce_prod = p_argmax = p_argmin = p_reduce_sum

  def p_reduce_window_sum(self, eqn, ins, shapes, out_shapes):
    dims = eqn.params["window_dimensions"]
    strides = eqn.params["window_strides"]
    v = ins[0]
    for ax in v.labels:
      if dims[ax] != 1 or strides[ax] != 1:
        raise UnsupportedPrimitiveError(f"{eqn.primitive.name} pools across the channel axis {ax}")
    out = _moved(v, {i: i for i in range(len(shapes[0]))})
    out.origin = None
    return [out]

  p_reduce_window_max = p_reduce_window_min = p_reduce_window_sum

  def p_reduce_window(self, eqn, ins, shapes, out_shapes):
    n = len(ins) // 2
    return [self.p_reduce_window_sum(eqn, [ins[i]], [shapes[i]], out_shapes)[0] for i in range(n)]

  def p_pad(self, eqn, ins, shapes, out_shapes):
    v, cfg = ins[0], eqn.params["padding_config"]
    out = _moved(v, {i: i for i in range(len(shapes[0]))})
    for ax, segs in v.labels.items():
      lo, hi, interior = cfg[ax]
      if interior:
        raise UnsupportedPrimitiveError("pad with interior padding on a channel axis")
      if lo < 0 or hi < 0:
        raise UnsupportedPrimitiveError("negative padding (cropping) on a channel axis")
      out.labels[ax] = tuple((s + lo, l, c, o) for s, l, c, o in segs)
    out.origin = None
    return [out]

  def p_slice(self, eqn, ins, shapes, out_shapes):
    v = ins[0]
    start, limit = eqn.params["start_indices"], eqn.params["limit_indices"]
    strides = eqn.params["strides"] or (1,) * len(start)
    out = _moved(v, {i: i for i in range(len(shapes[0]))})
    for ax, segs in v.labels.items():
      if (start[ax], limit[ax], strides[ax]) == (0, shapes[0][ax], 1):
        continue
      kept = []
      for s, l, c, o in segs:
        if start[ax] <= s and s + l <= limit[ax] and strides[ax] == 1:
          kept.append((s - start[ax], l, c, o))
        elif s + l <= start[ax] or s >= limit[ax]:
          continue
        else:
          raise UnsupportedPrimitiveError(f"slice [{start[ax]}:{limit[ax]}:{strides[ax]}] cuts through a channel group")
      out.labels[ax] = tuple(kept)
      if not kept:
        del out.labels[ax]
    for ax in list(out.params):
      if (start[ax], limit[ax], strides[ax]) != (0, shapes[0][ax], 1):
        raise UnsupportedPrimitiveError("slice of a per-channel parameter")
    return [out]

  def p_concatenate(self, eqn, ins, shapes, out_shapes):
    dim = eqn.params["dimension"]
    out = self.elementwise_except(ins, shapes, out_shapes[0], dim)
    segs, pos = [], 0
    for v, s in zip(ins, shapes):
      segs += [(st + pos, l, c, o) for st, l, c, o in v.labels.get(dim, ())]
      if v.param or v.params:
        raise UnsupportedPrimitiveError("concatenate of parameters with channel axes")
      pos += s[dim]
    if segs:
      out.labels[dim] = tuple(segs)
    return [out]

  def elementwise_except(self, ins, shapes, out_shape, dim) -> _Value:
    """Merges labels of all axes but ``dim`` like an element-wise op."""
    stripped = []
    for v in ins:
      w = _Value({a: s for a, s in v.labels.items() if a != dim})
      stripped.append(w)
    out = self.elementwise("concatenate", stripped, shapes, out_shape)
    out.origin = None
    return out

  # -- contractions --------------------------------------------------------------------
  def p_conv_general_dilated(self, eqn, ins, shapes, out_shapes):
    lhs, rhs = ins
    dn = eqn.params["dimension_numbers"]
    groups, bgroups = eqn.params["feature_group_count"], eqn.params["batch_group_count"]
    if bgroups != 1:
      raise UnsupportedPrimitiveError("conv_general_dilated with batch_group_count > 1")
    if rhs.labels or not rhs.param:
      raise UnsupportedPrimitiveError("conv_general_dilated whose kernel is not a parameter")
    path, axes = rhs.param
    pax = {vax: pa for vax, pa in axes.items()}
    k_out, k_in = pax[dn.rhs_spec[0]], pax[dn.rhs_spec[1]]
    c_in, c_out = shapes[0][dn.lhs_spec[1]], out_shapes[0][dn.out_spec[1]]
    in_segs = lhs.labels.get(dn.lhs_spec[1], ())
    for ax, segs in lhs.labels.items():
      if ax != dn.lhs_spec[1]:
        self.freeze(segs, "a conv window runs over its axis")
    out = _Value(origin=_module(path))
    fax = dn.out_spec[1]
    if groups == 1:
      for s, l, c, o in in_segs:
        self.consumer(c, o, l, path, k_in, s)
      cls = self.new_class(c_out)
      self.classes[cls].producers.append((self.eqn_counter, Member(path, k_out, 0)))
      out.labels[fax] = ((0, c_out, cls, 0),)
    elif groups == c_in == c_out:  # depthwise: output channel i is input channel i
      for s, l, c, o in in_segs:
        cls = self.classes[self.find(c)]
        if o != 0 or l != cls.size:
          raise UnsupportedPrimitiveError("depthwise conv over part of a group")
        cls.producers.append((self.eqn_counter, Member(path, k_out, s)))
      if in_segs:
        out.labels[fax] = tuple((s, l, self.find(c), o) for s, l, c, o in in_segs)
      else:
        cls = self.new_class(c_out)
        self.classes[cls].producers.append((self.eqn_counter, Member(path, k_out, 0)))
        out.labels[fax] = ((0, c_out, cls, 0),)
    else:  # grouped conv: channels may only move within their conv group, which a Group cannot express
      self.freeze(in_segs, f"read by the grouped conv {path!r} (feature_group_count={groups})")
      cls = self.new_class(c_out)
      self.classes[cls].frozen = f"written by the grouped conv {path!r} (feature_group_count={groups})"
      self.classes[cls].producers.append((self.eqn_counter, Member(path, k_out, 0)))
      out.labels[fax] = ((0, c_out, cls, 0),)
    return [out]

  def consumer(self, c, o, l, path, pax, start, outer=1, inner=1):
    cls = self.classes[self.find(c)]
    if o != 0 or l != cls.size:
      raise UnsupportedPrimitiveError(f"{path!r} reads part of a channel group ({l} of {cls.size})")
    m = Member(path, pax, start) if (outer, inner) == (1, 1) else FlatMember(path, pax, start, outer, inner)
    cls.consumers.append((self.eqn_counter, m))

  def p_dot_general(self, eqn, ins, shapes, out_shapes):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = ins
    if (lhs.param and rhs.param) or (lhs.labels and rhs.labels):
      raise UnsupportedPrimitiveError("dot_general between two parameters or two activations with channel axes")
    act_first = not lhs.param
    act, prm = (lhs, rhs) if act_first else (rhs, lhs)
    ac, pc = (lc, rc) if act_first else (rc, lc)
    ab, pb = (lb, rb) if act_first else (rb, lb)
    ashape, pshape = (shapes[0], shapes[1]) if act_first else (shapes[1], shapes[0])
    if not prm.param:
      if act.labels:
        raise UnsupportedPrimitiveError("dot_general of channels with a non-parameter operand")
      return [_Value()]
    path, axes = prm.param
    for a_ax, p_ax in zip(ac, pc):
      for seg in act.labels.get(a_ax, ()):
        if seg[0] == "flat":
          _, outer, inner, (s, l, c, o) = seg
          self.consumer(c, o, l, path, axes[p_ax], s, outer, inner)
        else:
          s, l, c, o = seg
          self.consumer(c, o, l, path, axes[p_ax], s)
    a_free = [i for i in range(len(ashape)) if i not in ac and i not in ab]
    p_free = [i for i in range(len(pshape)) if i not in pc and i not in pb]
    nb = len(ab)
    l_free, r_free = (a_free, p_free) if act_first else (p_free, a_free)
    pos = {}  # operand axis -> output axis
    for k, i in enumerate(l_free):
      pos[("l", i)] = nb + k
    for k, i in enumerate(r_free):
      pos[("r", i)] = nb + len(l_free) + k
    aside, pside = ("l", "r") if act_first else ("r", "l")
    out = _Value(origin=_module(path))
    for i in a_free:
      if i in act.labels:
        out.labels[pos[(aside, i)]] = act.labels[i]
    for ax in ab:
      if ax in act.labels:
        self.freeze(act.labels[ax], "used as a batch axis of dot_general")
    if len(p_free) > 1:
      raise UnsupportedPrimitiveError(f"dot_general with {path!r} producing several output axes")
    for i in p_free:
      cls = self.new_class(pshape[i])
      self.classes[cls].producers.append((self.eqn_counter, Member(path, axes[i], 0)))
      out.labels[pos[(pside, i)]] = ((0, pshape[i], cls, 0),)
    return [out]

  def p_cond(self, eqn, ins, shapes, out_shapes):
    branches = [self.run(b.jaxpr, ins[1:]) for b in eqn.params["branches"]]
    return [self.elementwise("cond", list(outs), [o] * len(outs), o) for outs, o in zip(zip(*branches), out_shapes)]

  # -- misc ----------------------------------------------------------------------------
  def p_select_n(self, eqn, ins, shapes, out_shapes):
    return [self.elementwise("select_n", ins, shapes, out_shapes[0])]


_ELEMENTWISE = {
    "add", "sub", "mul", "div", "max", "min", "neg", "exp", "exp2", "log", "log1p", "tanh", "logistic", "abs",
    "sqrt", "rsqrt", "integer_pow", "pow", "square", "erf", "sign", "sin", "cos", "expm1", "clamp", "ge", "gt",
    "le", "lt", "eq", "ne", "and", "or", "not", "nextafter", "is_finite", "erf_inv", "cbrt", "floor", "ceil",
    "round", "atan2", "rem", "add_any",
}
_AFFINE = {"add", "sub", "mul", "div", "convert_element_type"}  # keep the "output of layer X" origin
_IDENTITY = {"convert_element_type", "copy", "copy_p", "reduce_precision", "optimization_barrier",
             "sharding_constraint", "stop_gradient"}


def _plain(seg):
  return seg[3] if seg[0] == "flat" else seg


def _layout(seg):
  """A segment without its class: what must agree for two operands to be combined."""
  if seg[0] == "flat":
    return ("flat", seg[1], seg[2], _layout(seg[3]))
  return (seg[0], seg[1], seg[3])


def _subjaxpr(eqn):
  """(jaxpr, None) for call-like primitives whose operands map one-to-one onto the sub-jaxpr's inputs."""
  p = eqn.params
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    if key in p and eqn.primitive.name not in ("cond", "while", "scan"):
      j = p[key]
      return (j.jaxpr if hasattr(j, "jaxpr") else j), None
  return None


def _moved(v: _Value, mapping: dict[int, int]) -> _Value:
  """Relabels axes (src -> dst); axes not in ``mapping`` lose their labels."""
  out = _Value(origin=v.origin)
  for ax, segs in v.labels.items():
    if ax in mapping:
      out.labels[mapping[ax]] = segs
  for ax, ms in v.params.items():
    if ax in mapping:
      out.params[mapping[ax]] = ms
  if v.param:
    path, axes = v.param
    out.param = (path, {mapping[a]: pa for a, pa in axes.items() if a in mapping})
  return out


def _reshape_map(old, new) -> dict[int, tuple[int, int, int]]:
  """For each old axis (size > 1) that lands inside one new axis: old -> (new axis, outer, inner).

  Row-major: old axis k spans strides [inner_k, inner_k * old[k]); it sits inside
  new axis j when that axis's stride span contains it. ``outer == inner == 1``
  means the axis is kept whole.
  """
  inner_old = [math.prod(old[k + 1:]) for k in range(len(old))]
  inner_new = [math.prod(new[j + 1:]) for j in range(len(new))]
  out = {}
  for k, size in enumerate(old):
    if size == 1:
      continue
    lo, hi = inner_old[k], inner_old[k] * size
    for j, nsize in enumerate(new):
      if nsize > 1 and lo % inner_new[j] == 0 and (inner_new[j] * nsize) % hi == 0:
        out[k] = (j, (inner_new[j] * nsize) // hi, lo // inner_new[j])
        break
  return out


def _module(path: str) -> str:
  return path.split("/", 1)[1].rsplit("/", 1)[0]


def trace_spec(apply_fn: Callable[..., Any], variables, *example_args, **example_kwargs) -> Spec:
  """Derives the group spec of ``apply_fn(variables, *example_args, **example_kwargs)``.

  Works for any function of a variables dict: a Flax linen ``module.apply``, a
  plain-JAX function of a params dict, or an NNX model seen through
  ``nnx.split`` / ``nnx.merge`` (see :func:`nnx_apply`). Groups come in network
  order (by their last producer); names are the module path of their first
  producer. Raises :class:`UnsupportedPrimitiveError` on an op it cannot follow.

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

  roots: dict[int, _Class] = {}
  for c in range(len(tracer.classes)):
    roots.setdefault(tracer.find(c), tracer.classes[tracer.find(c)])
  groups = []
  for root, cls in roots.items():
    kernels = [(i, m) for i, m in cls.producers if len(shapes[m.path]) >= 2]
    if cls.frozen or not kernels or cls.pieces is not None:
      continue
    producers = _dedupe(sorted(cls.producers, key=lambda t: t[0]))
    consumers = _dedupe(sorted(cls.consumers, key=lambda t: t[0]))
    last = max(i for i, _ in kernels)
    first_eqn, first = min(kernels, key=lambda t: t[0])
    axis_len = shapes[first.path][first.axis]
    name = _module(first.path) + (f"[{first.offset}:{first.offset + cls.size}]" if cls.size != axis_len else "")
    shared = any(m.offset or _axis_len(shapes, m) != cls.size for m in producers + consumers)
    groups.append(((last, first_eqn, first.offset), Group(name, producers, consumers, cls.size if shared else None)))
  groups.sort(key=lambda t: t[0])
  bns = [BatchNormPair(layer, bn, *([tracer.eps[bn]] if bn in tracer.eps else [])) for bn, layer in tracer.bn.items()]
  return Spec(tuple(g for _, g in groups), tuple(bns))


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


class SpecCheckError(ValueError):
  """A group of the spec is not a set of interchangeable neurons of the model."""


def check_spec(apply_fn: Callable[..., Any], variables, spec: Spec, *example_args, scaling: bool = False,
               rtol: float = 1e-4, atol: float = 1e-5, seed: int = 0, **example_kwargs) -> dict[str, float]:
  """Perturbation check of a spec against the model; returns ``{group: max output change}``.

  For each group its neurons are permuted consistently across all members (and
  the BatchNorms folded into its producers): the outputs must not change. With
  ``scaling=True`` one neuron's producer rows are also scaled by 2 and its
  consumer columns by 1/2 (after BN folding), which must not change the outputs
  when the activations between them are positively homogeneous (ReLU).

  Raises :class:`SpecCheckError` naming the group and the member that breaks.
  """
  sizes = spec.validate(variables)
  forward = jax.jit(lambda v: jax.tree.leaves(apply_fn(v, *example_args, **example_kwargs))[0])
  run = lambda v: np.asarray(forward(v), np.float64)
  ref = run(variables)
  tol = atol + rtol * np.max(np.abs(ref))
  rng = np.random.default_rng(seed)
  report = {}
  for g in spec.groups:
    n = sizes[g.name]
    perm = np.roll(np.arange(n), 1) if n > 1 else np.arange(n)
    perm = perm[rng.permutation(n)] if n > 2 else perm
    members = list(g.members) + _bn_members(spec, g, variables)
    diff = np.max(np.abs(run(_permuted(variables, members, perm, n)) - ref))
    if diff > tol:
      culprits = [m for m in members
                  if np.max(np.abs(run(_permuted(variables, [x for x in members if x != m], perm, n)) - ref)) <= tol]
      where = (f"member {culprits[0]!r} does not belong to it" if culprits else
               "a member is missing (some array holding these neurons is not in the group)")
      raise SpecCheckError(f"group {g.name!r}: permuting its neurons changes the outputs by {diff:.3g}; {where}")
    report[g.name] = float(diff)
    if scaling:
      folded = fold_batchnorm(variables, spec)
      factors = [(m, 2.0) for m in g.producers if not _is_depthwise(folded, g, m)]
      factors += [(m, 0.5) for m in g.consumers]
      factors += [(m, 2.0) for m in _bn_members(spec, g, folded) if m.path.endswith("/bias")]
      d = np.max(np.abs(run(_scaled(folded, factors)) - ref))
      if d > tol:
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
  flat = dict(flatten(variables))
  for m in members:
    x = m.neurons_first(flat[m.path])
    seg = x[m.offset:m.offset + n][perm]
    flat[m.path] = m.restore(x.at[m.offset:m.offset + n].set(seg))
  return unflatten(flat)


def _scaled(variables, factors):
  flat = dict(flatten(variables))
  for m, f in factors:
    x = m.neurons_first(flat[m.path])
    flat[m.path] = m.restore(x.at[m.offset].multiply(f))
  return unflatten(flat)


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
