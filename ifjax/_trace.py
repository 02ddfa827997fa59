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
from ifjax._batchnorm import derived_bn
from ifjax._spec import BatchNormPair, FlatMember, Group, Member, Spec, flatten, on_host, unflatten

Seg = tuple[int, int, int, int]  # (start on the axis, length, class id, offset inside the class)


class UnsupportedPrimitiveError(NotImplementedError):
  """A primitive the tracer has no rule for touches a channel axis of some parameter."""


@dataclasses.dataclass
class _Class:
  size: int
  producers: list = dataclasses.field(default_factory=list)  # (eqn index, member)
  consumers: list = dataclasses.field(default_factory=list)
  frozen: str = ""
  inexact: str = ""  # why merging duplicates does not keep the function: the group is pruning-only
  pieces: list | None = None  # after a split: [(start, length, class)] that replace this class
  blocks: tuple[int, int, int] | None = None  # (head class, block length, head-dim class): split into heads
  kind: str = ""  # "heads" / "head_dim": the axes of a split into heads (a reshape, or DenseGeneral)


@dataclasses.dataclass
class _Value:
  """What the tracer knows about one jaxpr value.

  ``labels``: axis -> segments of channel classes (activations).
  ``params``: axis -> set of (path, param axis) for values that are per-channel
  functions of parameters only (biases, BN statistics after broadcasting).
  ``origin``: module path of the layer whose output this value still is (conv /
  dense output, plus biases and BN arithmetic), used to pair BNs with layers.
  ``param``: for a parameter seen through shape-only ops: (path, value axis -> param axis).
  ``data``: axes without channel groups along which the values still vary with the input (tokens of an
  MLP-Mixer); channels added element-wise to such an axis are pinned in place (frozen).
  """

  labels: dict[int, tuple[Seg, ...]] = dataclasses.field(default_factory=dict)
  params: dict[int, frozenset] = dataclasses.field(default_factory=dict)
  origin: str | None = None
  param: tuple[str, dict[int, int]] | None = None
  bn: str | None = None  # the BatchNorm applied since ``origin``'s layer
  data: frozenset = frozenset()  # unlabelled axes that carry the function's input data (not a broadcast)


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
    self.bn_uses: dict[str, list] = {}  # bn module -> [(path, param axis, segments, origin, eqn index)]
    self.escaped: set[str] = set()  # layers whose output is read before (or without) its BatchNorm

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
    ca.inexact = ca.inexact or cb.inexact
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
      p.frozen, p.inexact, p.kind = cls.frozen, cls.inexact, cls.kind
      cls.pieces.append((lo, hi - lo, piece))

  def whole(self, segs, what) -> list:
    """``segs`` with classes split so that each segment covers one whole class."""
    out = []
    for seg in (x for seg in segs for x in self.resolve(seg)):
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
      if segs:
        out.labels[ax] = self.merge_axis(segs, name)
        if any(ax in v.data for v in ins):
          self.freeze(out.labels[ax], f"{name!r} combines them with input data along the same axis")
    out.data = frozenset().union(*(v.data for v in ins)) - out.labels.keys()
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
    for s, l, c, o in self.whole(segs, f"per-channel parameter {path!r}"):
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
    v, old, new = ins[0], shapes[0], out_shapes[0]
    where = _reshape_map(old, new)
    out = _moved(v, {k: j for k, (j, outer, inner) in where.items() if outer == inner == 1})
    taken: dict[int, int] = {}  # new axis -> the channel axis flattened into it
    for ax in sorted(v.labels):
      segs = v.labels[ax]
      if ax not in where:
        split = _reshape_split(old, new, ax)
        if split is None:
          raise UnsupportedPrimitiveError(f"reshape {old} -> {new} splits the channel axis {ax} of "
                                          f"{self.describe(v)} other than into (heads, head dim)")
        out.labels[split[0]], out.labels[split[1]] = self.split_blocks(segs, new[split[1]], f"reshape {old} -> {new}")
        continue
      j, outer, inner = where[ax]
      if (outer, inner) == (1, 1):
        continue
      if j in taken:  # (heads, head dim) -> features: the heads stay a group, the head dims do not
        self.freeze(segs, f"merged by a reshape {old} -> {new} with channel axis {taken[j]} into one axis")
        continue
      if any(seg[0] == "flat" for seg in segs):
        raise UnsupportedPrimitiveError("a flattened channel axis is flattened again")
      taken[j] = ax
      out.labels[j] = tuple(("flat", outer, inner, seg) for seg in segs)
    data = set(out.data)
    for ax in v.data:  # an input-data axis merged with others or split: the axes it lands in carry data
      lo, hi = math.prod(old[ax + 1:]), math.prod(old[ax:])
      data |= {j for j in range(len(new)) if new[j] > 1 and math.prod(new[j + 1:]) < hi and math.prod(new[j:]) > lo}
    out.data = frozenset(data - out.labels.keys())
    for ax in v.params:
      if ax not in where or where[ax][1:] != (1, 1):
        raise UnsupportedPrimitiveError(f"reshape merges a channel axis of {self.describe(v)} with other axes")
    out.origin = v.origin
    return [out]

  def split_blocks(self, segs, b, what) -> tuple[tuple, tuple]:
    """Channels split into (heads, head dim = ``b``), e.g. attention heads or GroupNorm's groups: each class
    becomes blocks of ``b`` channels, one per neuron of a new *head* class, and a *head-dim* class holds the
    position inside a block (the same position in every block). A head-dim class spanning several classes
    cannot be a group and is frozen. Returns the labels of the two new axes."""
    heads, segs = [], self.whole(segs, what)
    d = None
    for s, l, c, o in segs:
      cls = self.classes[c]
      if s % b or l % b:
        raise UnsupportedPrimitiveError(f"{what}: heads of {b} channels cut through a channel group at [{s}, {s + l})")
      if cls.blocks is None:
        h, dc = self.new_class(l // b), self.new_class(b)
        self.classes[h].kind, self.classes[dc].kind = "heads", "head_dim"
        cls.blocks = (h, b, dc)
      elif cls.blocks[1] != b:
        raise UnsupportedPrimitiveError(f"{what}: channels already split into heads of {cls.blocks[1]} are split "
                                        f"into heads of {b}")
      heads.append((s // b, l // b, self.find(cls.blocks[0]), 0))
      if d is None:
        d = cls.blocks[2]
      elif self.find(d) != self.find(cls.blocks[2]):
        self.classes[self.find(cls.blocks[2])].frozen = f"a head dimension shared by several groups ({what})"
        self.classes[self.find(d)].frozen = f"a head dimension shared by several groups ({what})"
    return tuple(heads), ((0, b, self.find(d), 0),)

  def settle_blocks(self):
    """Moves the members of classes split into heads to their head classes, as blocks of ``b`` entries."""
    split = [c for c in range(len(self.classes))
             if self.find(c) == c and self.classes[c].blocks is not None and self.classes[c].pieces is None]
    for c in split:
      self.deposit(c)
    for c in split:  # two views of one axis cannot be pruned in one plan: whole heads win
      heads, dims = (self.classes[self.find(x)] for x in self.classes[c].blocks[::2])
      if not heads.frozen:
        dims.frozen = dims.frozen or "positions inside the heads (ifjax prunes whole heads)"

  def deposit(self, c):
    """Class ``c``'s members as members of its head class (blocks of ``b`` entries) and of its head-dim class
    (entry i of every block: only for members whose axis holds ``c`` alone, else the head dims are frozen)."""
    cls = self.classes[c]
    h, b, d = cls.blocks
    heads, dims = self.classes[self.find(h)], self.classes[self.find(d)]
    for role in ("producers", "consumers"):
      for i, m in getattr(cls, role):
        if m.offset % b:  # blocks of b entries that do not tile the axis: no FlatMember expresses them
          heads.frozen = heads.frozen or f"heads of {b} channels that do not align with {m.path!r} axis {m.axis}"
        else:
          getattr(heads, role).append((i, FlatMember(m.path, m.axis, m.offset // b, m.outer, m.inner * b)))
        n = self.shapes[m.path][m.axis] // (m.outer * m.inner)
        if m.offset == 0 and n == cls.size:
          getattr(dims, role).append((i, FlatMember(m.path, m.axis, 0, m.outer * (cls.size // b), m.inner)))
        else:
          dims.frozen = dims.frozen or f"head dims of {m.path!r}, whose axis holds other channels too"
    for target in (heads, dims):
      target.frozen = target.frozen or cls.frozen
      target.inexact = target.inexact or cls.inexact
    cls.producers, cls.consumers = [], []
    for x in (h, d):
      if self.classes[self.find(x)].blocks is not None:
        self.deposit(self.find(x))

  def p_reduce_sum(self, eqn, ins, shapes, out_shapes):
    axes = eqn.params["axes"]
    v = ins[0]
    for ax in axes:
      if ax in v.labels:  # permuting the channels keeps the result; removing or merging some does not
        self.mark_inexact(v.labels[ax], f"{eqn.primitive.name} runs over these channels (e.g. a LayerNorm's "
                                        "statistics), so merging neurons changes the result")
    keep = [i for i in range(len(shapes[0])) if i not in axes]
    out = _moved(v, {src: dst for dst, src in enumerate(keep)})
    out.origin = None
    return [out]

  p_reduce_max = p_reduce_min = p_reduce_prod = p_reduce_sum

  def p_argmax(self, eqn, ins, shapes, out_shapes):
    axes = eqn.params["axes"]
    v = ins[0]
    for ax in axes:
      if ax in v.labels:  # the result is a channel index
        self.freeze(v.labels[ax], f"reduced over by {eqn.primitive.name}")
    keep = [i for i in range(len(shapes[0])) if i not in axes]
    out = _moved(v, {src: dst for dst, src in enumerate(keep)})
    out.origin = None
    return [out]

  p_argmin = p_argmax

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
    start, limit = eqn.params["start_indices"], eqn.params["limit_indices"]
    strides = eqn.params["strides"] or (1,) * len(start)
    return [self.sliced(ins[0], shapes[0], start, limit, strides)]

  def p_split(self, eqn, ins, shapes, out_shapes):
    ax, outs, pos = eqn.params["axis"], [], 0
    for size in eqn.params["sizes"]:
      start, limit = [0] * len(shapes[0]), list(shapes[0])
      start[ax], limit[ax] = pos, pos + size
      outs.append(self.sliced(ins[0], shapes[0], start, limit, (1,) * len(start)))
      pos += size
    return outs

  def sliced(self, v, shape, start, limit, strides) -> _Value:
    """``v[start:limit:strides]``; a cut through a channel group splits it into groups of its own."""
    out = _moved(v, {i: i for i in range(len(shape))})
    for ax, segs in v.labels.items():
      lo, hi, st = start[ax], limit[ax], strides[ax]
      if (lo, hi, st) == (0, shape[ax], 1):
        continue
      if st != 1 and any(seg[0] == "flat" or seg[0] < hi and lo < seg[0] + seg[1] for seg in segs):
        raise UnsupportedPrimitiveError(f"strided slice [{lo}:{hi}:{st}] of a channel axis")
      inside = [seg for seg in segs if seg[0] != "flat" and seg[0] < hi and lo < seg[0] + seg[1]]
      if any(seg[0] == "flat" for seg in segs):
        raise UnsupportedPrimitiveError(f"slice [{lo}:{hi}] of a flattened channel axis")
      for s, l, c, o in inside:
        cuts = {o + b - s for b in (lo, hi) if s < b < s + l}
        if cuts:
          self.split(c, cuts)
      kept = [(s - lo, l, c, o) for seg in inside for s, l, c, o in self.resolve(seg) if lo <= s and s + l <= hi]
      out.labels[ax] = tuple(kept)
      if not kept:
        del out.labels[ax]
    for ax in list(out.params):
      if (start[ax], limit[ax], strides[ax]) != (0, shape[ax], 1):
        raise UnsupportedPrimitiveError("slice of a per-channel parameter")
    if v.param and any((start[a], limit[a], strides[a]) != (0, shape[a], 1) for a in v.param[1]):
      path, axes = v.param  # e.g. position embeddings cut to the sequence length: sliced axes are no channels
      out.param = (path, {a: pa for a, pa in axes.items() if (start[a], limit[a], strides[a]) == (0, shape[a], 1)})
    return out

  def p_concatenate(self, eqn, ins, shapes, out_shapes):
    dim = eqn.params["dimension"]
    out = self.elementwise_except(ins, shapes, out_shapes[0], dim)
    segs, pos = [], 0
    acts = [(v, s) for v, s in zip(ins, shapes) if v.labels]
    for v, s in zip(ins, shapes):
      segs += [(st + pos, l, c, o) for st, l, c, o in v.labels.get(dim, ())]
      if v.param or v.params:  # e.g. a class token prepended to the patch tokens: a producer of their channels
        pmap = v.params or self.param_channels(v, s)
        if dim in pmap:
          raise UnsupportedPrimitiveError(f"concatenate of parameter {sorted(pmap[dim])[0][0]!r} along its "
                                          "channel axis")
        for ax, members in pmap.items():
          for path, pax in members if ax in out.labels else ():
            self.per_channel(path, pax, out.labels[ax], "concatenate", acts)
      pos += s[dim]
    if segs:
      out.labels[dim] = tuple(segs)
    return [out]

  def elementwise_except(self, ins, shapes, out_shape, dim) -> _Value:
    """Merges labels of all axes but ``dim`` like an element-wise op."""
    stripped = []
    for v in ins:
      w = _Value({a: s for a, s in v.labels.items() if a != dim}, data=v.data - {dim})
      stripped.append(w)
    out = self.elementwise("concatenate", stripped, shapes, out_shape)
    out.origin = None
    if any(dim in v.data for v in ins):
      out.data |= {dim}
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
    if lhs.data:  # a window over input data gives input data on the spatial axes
      out.data = frozenset(dn.out_spec[2:])
    in_segs = tuple(self.whole(in_segs, f"conv {path!r}"))
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
    if lhs.param and rhs.param:
      raise UnsupportedPrimitiveError(f"dot_general between two parameters, {lhs.param[0]!r} and {rhs.param[0]!r}")
    if not lhs.param and not rhs.param:
      return [self.activation_product(eqn, ins, shapes)]
    act_first = not lhs.param
    act, prm = (lhs, rhs) if act_first else (rhs, lhs)
    ac, pc = (lc, rc) if act_first else (rc, lc)
    ab, pb = (lb, rb) if act_first else (rb, lb)
    ashape, pshape = (shapes[0], shapes[1]) if act_first else (shapes[1], shapes[0])
    path, axes = prm.param
    if any(i not in axes for i in range(len(pshape)) if pshape[i] > 1):
      raise UnsupportedPrimitiveError(f"dot_general with a slice of parameter {path!r}")
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
    out = _Value(origin=_module(path), data=frozenset(pos[(aside, i)] for i in a_free if i in act.data))
    for i in a_free:
      if i in act.labels:
        out.labels[pos[(aside, i)]] = act.labels[i]
    for ax in ab:
      if ax in act.labels:
        self.freeze(act.labels[ax], "used as a batch axis of dot_general")
    several = [i for i in p_free if pshape[i] > 1]
    for i in p_free:  # several output axes (DenseGeneral to (heads, head dim)): a group per axis
      if pshape[i] > 1 or len(p_free) == 1:
        cls = self.new_class(pshape[i])
        if len(several) > 1:
          self.classes[cls].kind = "head_dim" if i == several[-1] else "heads"
        self.classes[cls].producers.append((self.eqn_counter, Member(path, axes[i], 0)))
        out.labels[pos[(pside, i)]] = ((0, pshape[i], cls, 0),)
    return [out]

  def activation_product(self, eqn, ins, shapes) -> _Value:
    """dot_general of two activations (attention: query-key logits, weights-value). Batch axes are
    element-wise (the heads of q, k and v become one group); an axis contracted between two channel groups
    couples them as a pruning-only group (merging two query dims does not keep q.k); an axis contracted
    against unlabelled data is frozen."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = ins
    out = _Value()
    for k, (a, b) in enumerate(zip(lb, rb)):
      segs = [x for x in (lhs.labels.get(a), rhs.labels.get(b)) if x]
      if segs:
        out.labels[k] = self.merge_axis(segs, "dot_general (batch axes)")
    for a, b in zip(lc, rc):
      la, lr = lhs.labels.get(a), rhs.labels.get(b)
      if la and lr:
        self.mark_inexact(self.merge_axis([la, lr], "dot_general (contraction)"),
                          "contracted between two activations (a query-key product), so merging neurons changes it")
      elif la or lr:
        self.freeze(la or lr, "contracted against an activation that carries no channel group")
    l_free = [i for i in range(len(shapes[0])) if i not in lc and i not in lb]
    r_free = [i for i in range(len(shapes[1])) if i not in rc and i not in rb]
    data = {k for k, (a, b) in enumerate(zip(lb, rb)) if a in lhs.data or b in rhs.data}
    for k, i in enumerate(l_free):
      if i in lhs.labels:
        out.labels[len(lb) + k] = lhs.labels[i]
      elif i in lhs.data:
        data.add(len(lb) + k)
    for k, i in enumerate(r_free):
      if i in rhs.labels:
        out.labels[len(lb) + len(l_free) + k] = rhs.labels[i]
      elif i in rhs.data:
        data.add(len(lb) + len(l_free) + k)
    out.data = frozenset(data - out.labels.keys())
    return out

  def p_gather(self, eqn, ins, shapes, out_shapes):
    """An embedding lookup (``jnp.take`` of a parameter table): the table's uncut axes are produced
    channels; gathering from an activation keeps the labels of its uncut axes."""
    dn, sizes = eqn.params["dimension_numbers"], eqn.params["slice_sizes"]
    v, shape = ins[0], shapes[0]
    if getattr(dn, "operand_batching_dims", ()):
      if v.labels or v.param:
        raise UnsupportedPrimitiveError("gather with batching dims on a parameter or channel axis")
      return [_Value()]
    kept = [a for a in range(len(shape)) if a not in dn.collapsed_slice_dims]
    out_axis = dict(zip(kept, dn.offset_dims))
    out = _Value()
    if ins[1].data or v.data:  # looked-up rows of input ids (tokens)
      out.data = frozenset(i for i in range(len(out_shapes[0])) if i not in dn.offset_dims and out_shapes[0][i] > 1)
    if v.param:
      path, axes = v.param
      out.origin = _module(path)
      for a in kept:
        if sizes[a] == shape[a] > 1 and a in axes and a not in dn.start_index_map:
          cls = self.new_class(shape[a])
          self.classes[cls].producers.append((self.eqn_counter, Member(path, axes[a], 0)))
          out.labels[out_axis[a]] = ((0, shape[a], cls, 0),)
    for a, segs in v.labels.items():
      if a in out_axis and sizes[a] == shape[a] and a not in dn.start_index_map:
        out.labels[out_axis[a]] = segs
      else:
        self.freeze(segs, "indexed by a gather")
    return [out]

  def p_cond(self, eqn, ins, shapes, out_shapes):
    branches = [self.run(b.jaxpr, ins[1:]) for b in eqn.params["branches"]]
    return [self.elementwise("cond", list(outs), [o] * len(outs), o) for outs, o in zip(zip(*branches), out_shapes)]

  def p_scan(self, eqn, ins, shapes, out_shapes):
    """``lax.scan`` (``nn.scan`` over stacked layers): the body is followed once. Parameters scanned over
    (stacked on axis 0) give members on their stacked arrays, so a group takes the same neurons in every
    layer; the carry's channels in and out of the body are one group."""
    p = eqn.params
    nc, ncar = p["num_consts"], p["num_carry"]
    consts, carry, xs = ins[:nc], ins[nc:nc + ncar], ins[nc + ncar:]
    outs = self.run(p["jaxpr"].jaxpr, consts + carry + [self.unstacked(v) for v in xs])
    result = []
    for k, (a, b) in enumerate(zip(carry, outs[:ncar])):
      out = _Value()
      for ax in set(a.labels) | set(b.labels):
        if ax in a.labels and ax in b.labels:
          out.labels[ax] = self.merge_axis([a.labels[ax], b.labels[ax]], "scan carry")
        else:  # the loop moves channels in or out of this axis from one step to the next
          for segs in (a.labels.get(ax), b.labels.get(ax)):
            if segs:
              self.freeze(segs, f"the scan carry {k} changes its channel layout between steps")
      result.append(out)
    for v in outs[ncar:]:  # stacked outputs: a new axis 0
      result.append(_moved(v, {ax: ax + 1 for ax in v.labels.keys() | v.params.keys()}))
    return result

  def unstacked(self, v: _Value) -> _Value:
    """One step's slice of a scanned-over operand (axis 0 removed)."""
    if 0 in v.labels:
      self.freeze(v.labels[0], "scanned over")
    out = _moved(v, {ax: ax - 1 for ax in v.labels.keys() | v.params.keys() if ax > 0})
    if v.param:
      path, axes = v.param
      out.param = (path, {a - 1: pa for a, pa in axes.items() if a > 0})
    out.origin = None
    return out

  # -- misc ----------------------------------------------------------------------------
  def p_select_n(self, eqn, ins, shapes, out_shapes):
    return [self.elementwise("select_n", ins, shapes, out_shapes[0])]


_ELEMENTWISE = {
    "add", "sub", "mul", "div", "max", "min", "neg", "exp", "exp2", "log", "log1p", "tanh", "logistic", "abs",
    "sqrt", "rsqrt", "integer_pow", "pow", "square", "erf", "sign", "sin", "cos", "expm1", "clamp", "ge", "gt",
    "le", "lt", "eq", "ne", "and", "or", "not", "nextafter", "is_finite", "erf_inv", "cbrt", "floor", "ceil",
    "round", "atan2", "rem", "add_any", "tan", "atan", "asin", "acos", "sinh", "cosh", "asinh", "acosh", "atanh",
    "erfc", "lgamma", "digamma",
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
  out = _Value(origin=v.origin, bn=v.bn, data=frozenset(mapping[a] for a in v.data if a in mapping))
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


def _reshape_split(old, new, k) -> tuple[int, int] | None:
  """The two new axes (outer, inner) that old axis ``k`` is split into by a row-major reshape, or None."""
  lo = math.prod(old[k + 1:])
  hi = lo * old[k]
  inner_new = [math.prod(new[j + 1:]) for j in range(len(new))]
  js = [j for j in range(len(new)) if new[j] > 1 and inner_new[j] >= lo and inner_new[j] * new[j] <= hi]
  if len(js) == 2 and inner_new[js[1]] == lo and inner_new[js[0]] * new[js[0]] == hi:
    return js[0], js[1]
  return None


def _module(path: str) -> str:
  return path.split("/", 1)[1].rsplit("/", 1)[0]


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
  for root, cls in roots.items():
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


class SpecCheckError(ValueError):
  """A group of the spec is not a set of interchangeable neurons of the model."""


def check_spec(apply_fn: Callable[..., Any], variables, spec: Spec, *example_args, scaling: bool = False,
               rtol: float = 1e-4, atol: float = 1e-5, seed: int = 0, **example_kwargs) -> dict[str, float]:
  """Perturbation check of a spec against the model; returns ``{group: max output change}``.

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
  forward = jax.jit(lambda v: jax.tree.leaves(apply_fn(v, *example_args, **example_kwargs))[0])
  run = lambda v: np.asarray(forward(v), np.float64)
  ref = run(variables)
  tol = atol + rtol * np.max(np.abs(ref))
  rng = np.random.default_rng(seed)
  report, folded = {}, None
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
    if scaling and g.exact and not any(m.path.startswith("batch_stats/") for m in g.members):
      folded = fold_batchnorm(variables, spec) if folded is None else folded
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
