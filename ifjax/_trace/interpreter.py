"""The jaxpr interpreter that follows channel classes through a program (used by :func:`ifjax.trace_spec`).

Every value of the program carries, per axis, the *channel classes* it holds:
a list of segments ``(start, length, class, class_offset)``. A producer (a
parameter contracted into a conv / dot_general output axis) opens a new class;
element-wise ops between activations merge classes (residual adds); a parameter
contracted over a labelled axis becomes a consumer of that class; per-channel
parameters added to a class's activations are biases, and BatchNorm statistics
that touch a layer's output are reported as BN pairs. Classes that reach the
program's outputs, or pass through an op that mixes channels in a way a group
cannot express, are *frozen* (not prunable) and left out of the spec.

Beyond convs and dense layers it follows:

* attention: a DenseGeneral to (heads, head dim) gives a group per axis; a reshape
  of channels into (heads, head dim) makes *head* groups of blocks (FlatMember);
  the batch axes of query-key and weights-value products join the q, k and v
  heads (and the output projection's rows) into one group;
* norms: a reduction over channels (LayerNorm, RMSNorm, GroupNorm statistics)
  keeps the group but marks it pruning-only (``Group.exact`` False), with the
  norm's scale and bias as members; GroupNorm channels are grouped by the norm's
  groups (whole norm groups are exact: each has its own statistics);
* a BatchNorm folds into its layer when it directly follows one layer whose
  output nothing else reads; any other BN (after a concatenation or an
  activation) keeps its arrays as per-channel members of each group it covers,
  like biases and other per-channel parameters after a concatenation;
* embedding lookups (gather of a parameter table), class tokens concatenated to
  the tokens, tied weights (pruning-only), slices and splits of channels (the
  cut groups become groups of their own), ``lax.scan`` over stacked layers (a
  group takes the same neurons in every layer);
* channels added element-wise to the input data itself (the token axis of an
  MLP-Mixer) stay in place (frozen); a module applied twice (shared weights) is
  an :class:`UnsupportedPrimitiveError` naming it.

Primitives are dispatched through the table of :mod:`~ifjax._trace.primitives`,
shared with :func:`ifjax.resize`. A primitive without a rule that touches a
labelled axis raises :class:`UnsupportedPrimitiveError`: the tracer never guesses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax.extend as jex
import numpy as np

from ifjax._spec import Member
from ifjax._trace.contraction_rules import _ContractionRules
from ifjax._trace.primitives import CALL, ELEMENTWISE, IDENTITY, NOT_TRACED, ORDERED, PRIMITIVES, order_axes
from ifjax._trace.shape_rules import _ShapeRules
from ifjax._trace.unionfind import UnionFind
from ifjax._trace.values import Seg, UnsupportedPrimitiveError, _Class, _layout, _module, _plain, _Value


class _Tracer(_ShapeRules, _ContractionRules, UnionFind):
  """Follows channel classes (the nodes of its :class:`UnionFind`) through a jaxpr."""

  def __init__(self, shapes: dict[str, tuple[int, ...]]):
    UnionFind.__init__(self)
    self.shapes = shapes
    self.classes: list[_Class] = []
    self.bn: dict[str, str] = {}  # bn module -> layer module
    self.eps: dict[str, float] = {}  # bn module -> epsilon seen in var + eps
    self.bn_modules = {p.split("/", 1)[1].rsplit("/", 1)[0] for p in shapes if p.startswith("batch_stats/")
                       and p.endswith("/var")}
    self.eqn_counter = 0
    self.bn_uses: dict[str, list] = {}  # bn module -> [(path, param axis, segments, origin, eqn index)]
    self.escaped: set[str] = set()  # layers whose output is read before (or without) its BatchNorm

  # -- classes: the union-find's sets, with what they carry -------------------------
  def new_class(self, size):
    self.classes.append(_Class(size))
    return self.add()

  def union(self, a, b, where):
    a, b = self.find(a), self.find(b)
    if a == b:
      return
    ca, cb = self.classes[a], self.classes[b]
    if ca.size != cb.size:
      raise UnsupportedPrimitiveError(f"{where}: couples channel groups of sizes {ca.size} and {cb.size} "
                                      "element-wise; a group has one size")
    self.link(a, b)
    ca.producers += cb.producers
    ca.consumers += cb.consumers
    ca.frozen = ca.frozen or cb.frozen
    ca.inexact = ca.inexact or cb.inexact
    ca.padded = ca.padded or cb.padded
    if ca.blocks and cb.blocks:
      if ca.blocks[1] != cb.blocks[1]:
        raise UnsupportedPrimitiveError(f"{where}: couples channels split into heads of {ca.blocks[1]} and of "
                                        f"{cb.blocks[1]}")
      self.union(ca.blocks[0], cb.blocks[0], where)
      self.union(ca.blocks[2], cb.blocks[2], where)
    ca.blocks = ca.blocks or cb.blocks

  def split(self, c, cuts):
    """Splits class ``c`` at positions ``cuts`` (inside it) into pieces that are classes of their own:
    each member covers the piece at its offset plus the piece's start."""
    c = self.find(c)
    cls = self.classes[c]
    if cls.pieces is not None:  # already split: split the pieces the cuts fall into
      for start, length, piece in cls.pieces:
        inner = {x - start for x in cuts if start < x < start + length}
        if inner:
          self.split(piece, inner)
      return
    if cls.blocks:
      raise UnsupportedPrimitiveError(f"channels already split into heads of {cls.blocks[1]} are cut at {sorted(cuts)}")
    bounds = sorted({0, cls.size, *map(int, cuts)})
    cls.pieces = []
    for lo, hi in zip(bounds, bounds[1:]):
      piece = self.new_class(hi - lo)
      p = self.classes[piece]
      p.producers = [(i, m._replace(offset=m.offset + lo)) for i, m in cls.producers]
      p.consumers = [(i, m._replace(offset=m.offset + lo)) for i, m in cls.consumers]
      p.frozen, p.inexact, p.kind, p.padded = cls.frozen, cls.inexact, cls.kind, cls.padded
      cls.pieces.append((lo, hi - lo, piece))

  def whole(self, segs, what) -> list:
    """``segs`` with classes split so that each segment covers one whole class."""
    out = []
    for seg in (x for part in segs for x in self.resolve(part)):
      if seg[0] == "flat":
        raise UnsupportedPrimitiveError(f"{what} on a flattened channel axis")
      s, l, c, o = seg
      if o or l != self.classes[c].size:
        self.split(c, {o, o + l} - {0, self.classes[c].size})
      out += self.resolve(seg)
    return out

  def mark_inexact(self, segs, why):
    for s in (x for seg in segs for x in self.resolve(seg)):
      c = self.classes[self.find(_plain(s)[2])]
      c.inexact = c.inexact or why

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
    for v in jaxpr.constvars:  # the example inputs (closed over) and constants
      env[v] = _Value(data=frozenset(i for i, n in enumerate(getattr(v.aval, "shape", ())) if n > 1))
    read = lambda v: _Value() if isinstance(v, jex.core.Literal) else self.resolved(env.get(v, _Value()))
    for eqn in jaxpr.eqns:
      self.eqn_counter += 1
      ins = [read(v) for v in eqn.invars]
      outs = self.eqn(eqn, ins)
      for v in ins:  # a layer's output read before its BatchNorm: that BN cannot be folded into the layer
        if v.origin and not v.bn and all(o.origin != v.origin for o in outs):
          self.escaped.add(v.origin)
      for v, o in zip(eqn.outvars, outs):
        env[v] = o
    return [read(v) for v in jaxpr.outvars]

  def eqn(self, eqn, ins: list[_Value]) -> list[_Value]:
    name = eqn.primitive.name
    shapes = [tuple(getattr(v.aval, "shape", ())) for v in eqn.invars]
    out_shapes = [tuple(getattr(v.aval, "shape", ())) for v in eqn.outvars]
    rule, sub = self.handler(name), _subjaxpr(eqn)
    if rule == self.call and sub is None:
      rule = None
    elif rule is None and sub is not None:  # a call-like primitive the table does not name
      rule = self.call
    if rule is not None:
      return rule(eqn, ins, shapes, out_shapes)
    touched = [i for i, v in enumerate(ins) if v.labels or v.param]
    if not touched:
      return [_Value() for _ in out_shapes]
    what = self.describe(ins[touched[0]])
    why = f" ({NOT_TRACED[name]})" if name in NOT_TRACED else ""
    raise UnsupportedPrimitiveError(
        f"no rule for primitive {name!r}{why}, which touches {what}. Hint: write the spec by hand for this part, or "
        "keep the op out of the traced function; ifjax does not guess how a primitive moves channels.")

  def handler(self, name: str):
    """The rule ``(eqn, ins, shapes, out_shapes) -> outs`` for primitive ``name`` (see
    :mod:`~ifjax._trace.primitives`), or None."""
    kind = PRIMITIVES.get(name)
    if kind is None or name in NOT_TRACED:
      return None
    generic = {ELEMENTWISE: self.kind_elementwise, IDENTITY: self.kind_identity, ORDERED: self.kind_ordered,
               CALL: self.call}
    return generic.get(kind) or getattr(self, "p_" + name, None)

  def kind_elementwise(self, eqn, ins, shapes, out_shapes):
    name = eqn.primitive.name
    if name == "add":
      self.note_eps(eqn, ins)
    return [self.elementwise(name, ins, shapes, out_shapes[0])]

  def kind_identity(self, eqn, ins, shapes, out_shapes):
    return [ins[0]]

  def kind_ordered(self, eqn, ins, shapes, out_shapes):
    """Cumulative ops, sort and rev: element-wise along the axes they do not run along; refused on a
    parameter or along a channel axis (they reorder or mix its channels)."""
    name = eqn.primitive.name
    for ax, what, _ in order_axes(name, eqn.params, len(out_shapes[0])):
      for v in ins:
        if ax in v.labels or v.param or v.params:
          raise UnsupportedPrimitiveError(
              f"no rule for primitive {name!r} that {what} axis {ax} of {self.describe(v)}: ifjax follows it only "
              "along axes without channels. Hint: write the spec by hand for this part.")
    out = self.elementwise(name, ins, shapes, out_shapes[0])
    return [out] + [dataclasses.replace(out) for _ in out_shapes[1:]]

  def call(self, eqn, ins, shapes, out_shapes):
    jaxpr, ins_used = _subjaxpr(eqn)
    return self.run(jaxpr, ins[len(ins) - len(jaxpr.invars):] if ins_used is None else ins_used)

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
    derived = self.derived(ins)
    if derived is not None:
      return derived
    out = _Value()
    ndim = len(out_shape)
    acts = [(v, s) for v, s in zip(ins, shapes) if v.labels]
    prms = [(v, s) for v, s in zip(ins, shapes) if (v.params or v.param) and not v.labels]
    for ax in range(ndim):
      segs = [v.labels[ax] for v, s in acts if ax in v.labels]
      if segs:
        out.labels[ax] = self.merge_axis(segs, name)
        if any(ax in v.data for v in ins):
          self.freeze(out.labels[ax], f"{name!r} combines them with input data along the same axis")
    out.data = frozenset().union(*(v.data for v in ins)) - out.labels.keys()
    if name in ("add", "sub", "add_any"):
      self.note_padded(ins, out)
    # per-channel parameters meeting labelled activations
    out.bn = next((v.bn for v, _ in acts if v.bn), None)
    for v, s in zip(ins, shapes):  # params on a broadcast axis wait for the channels they will meet (LayerNorm)
      pmap = v.params or (self.param_channels(v, s) if v.param and not v.labels else {})
      for ax, members in pmap.items():
        if ax in out.labels and not self.per_head(out.labels[ax]):
          for path, pax in members:
            out.bn = self.per_channel(path, pax, out.labels[ax], name, acts) or out.bn
        elif ax in out.labels or ax not in out.data:
          out.params[ax] = out.params.get(ax, frozenset()) | members
    origins = {v.origin for v, _ in acts}
    if acts and len(origins) == 1 and None not in origins and name in _AFFINE:  # still that layer's output
      out.origin = origins.pop()
    else:
      out.bn = None
    kernels = [v.param[0] for v, _ in prms if v.param and v.param[0].endswith("/kernel")]
    if name == "mul" and acts and out.labels and kernels:  # a per-channel (depthwise) kernel tap
      out.origin, out.bn = _module(kernels[0]), None
    return out

  def note_padded(self, ins, out: _Value):
    """A parameter broadcast along a channel axis and added to it (a token-mixing bias of an MLP-Mixer) reaches
    every channel, the zero-padded ones of ``keep_shapes`` too: marks the channels' classes."""
    for v in ins:
      if v.labels or not (v.param or v.params):
        continue
      covered = set(v.param[1]) if v.param else set(v.params)
      path = v.param[0] if v.param else min(p for ms in v.params.values() for p, _ in ms)
      for ax, segs in out.labels.items():
        if ax not in covered:
          for s in (x for seg in segs for x in self.resolve(seg)):
            c = self.classes[self.find(_plain(s)[2])]
            c.padded = c.padded or f"parameter {path!r} is added to every channel, the dropped ones too"

  @staticmethod
  def derived(ins) -> _Value | None:
    """An element-wise function of one parameter and constants (``(w - mean(w)) / std(w)``, ``var + eps``) is
    still that parameter for the ops that read it (a conv's kernel); its ``reduced`` axes say which statistics
    it carries. None if another operand varies with the input or is another parameter."""
    prms = [v for v in ins if v.param]
    if not prms or len({v.param[0] for v in prms}) != 1:
      return None
    if any(v.labels or v.data or v.params for v in ins) or any(not v.param and v.reduced for v in ins):
      return None
    axes: dict[int, int] = {}
    for v in prms:
      for a, pa in v.param[1].items():
        if axes.setdefault(a, pa) != pa:
          return None
    return _Value(param=(prms[0].param[0], axes), reduced=frozenset().union(*(v.reduced for v in prms)))

  def merge_axis(self, segs: list, name: str) -> tuple:
    """The labels of one axis of an op that combines its operands element-wise along it."""
    first = segs[0]
    if all([_layout(g) for g in other] == [_layout(g) for g in first] for other in segs[1:]):
      for other in segs[1:]:
        for g0, g1 in zip(first, other):
          self.union(_plain(g0)[2], _plain(g1)[2], f"{name!r}")
      return tuple(self.canonical(g) for g in first)
    if any(g[0] == "flat" for x in segs for g in x):
      fine = [x for x in segs if not any(g[0] == "flat" for g in x)]
      flats = [x for x in segs if any(g[0] == "flat" for g in x)]
      if fine:  # channels meet per-head values (GroupNorm's statistics): the heads of those channels
        out = self.merge_axis(fine, name)
        coarse = tuple(self.coarse(g) for g in out)
        if all([_layout(g) for g in x] == [_layout(g) for g in coarse] for x in flats):
          self.merge_axis([coarse, *flats], name)
          return out
      raise UnsupportedPrimitiveError(f"{name!r} combines flattened channel axes laid out differently")
    return self.overlay(segs, name)

  def per_head(self, segs) -> bool:
    """Whether ``segs`` label per-head values spread over the head's channels (GroupNorm's statistics):
    per-channel parameters meeting them wait for the channels themselves."""
    return all(g[0] == "flat" and g[1] == 1 and self.classes[self.find(g[3][2])].kind == "heads" for g in segs)

  def coarse(self, seg):
    """A segment of channels split into heads, as the flat label of its heads (``seg`` if not split)."""
    s, l, c, o = seg
    blocks = self.classes[self.find(c)].blocks
    if blocks is None or s % blocks[1] or l % blocks[1] or o % blocks[1]:
      return seg
    b = blocks[1]
    return ("flat", 1, b, (s // b, l // b, self.find(blocks[0]), o // b))

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

  def per_channel(self, path, pax, segs, name, acts) -> str | None:
    """A per-channel parameter (bias, scale, norm or BN array) meets channels ``segs``: it becomes a producer
    member of each group there, at the group's offset. BatchNorm arrays are set aside: whether the BN folds
    into its layer is decided once the whole program is seen (:meth:`settle_batchnorms`). Returns the BN
    module ``path`` belongs to, if any."""
    module = path.split("/", 1)[1].rsplit("/", 1)[0]
    if module in self.bn_modules:
      origin = acts[0][0].origin if len(acts) == 1 and acts[0][0].bn in (None, module) else None
      self.bn_uses.setdefault(module, []).append((path, pax, segs, origin, self.eqn_counter))
      return module
    if name not in ("add", "sub", "mul", "concatenate"):
      raise UnsupportedPrimitiveError(f"per-channel parameter {path!r} enters channels through {name!r}; only "
                                      "biases (add), per-channel scales (mul) and BatchNorm are supported")
    self.add_per_channel(path, pax, segs, self.eqn_counter)
    return None

  def add_per_channel(self, path, pax, segs, eqn_index):
    for s, _l, c, _o in self.whole(segs, f"per-channel parameter {path!r}"):
      cls = self.classes[self.find(c)]
      m = Member(path, pax, s)
      if m not in [x for _, x in cls.producers]:
        cls.producers.append((eqn_index, m))

  def settle_batchnorms(self):
    """A BN folds into its layer when it directly follows one layer whose output nothing else reads; any
    other BN (after a concatenation, an activation, a shared output) keeps its arrays as per-channel
    producer members of each group it covers."""
    for module, uses in self.bn_uses.items():
      origins = {u[3] for u in uses}
      layer = origins.pop() if len(origins) == 1 else None
      if layer is not None and layer not in self.escaped:
        self.bn[module] = layer
      else:
        for path, pax, segs, _, i in uses:
          self.add_per_channel(path, pax, segs, i)


_AFFINE = {"add", "sub", "mul", "div", "convert_element_type"}  # keep the "output of layer X" origin


def _subjaxpr(eqn):
  """(jaxpr, None) for call-like primitives whose operands map one-to-one onto the sub-jaxpr's inputs."""
  p = eqn.params
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    if key in p and eqn.primitive.name not in ("cond", "while", "scan"):
      j = p[key]
      return (j.jaxpr if hasattr(j, "jaxpr") else j), None
  return None
