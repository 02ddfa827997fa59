"""Tracer rules for shape ops: broadcast, transpose, squeeze, reshape (heads), reductions, pooling, pad,
slice, split and concatenate. Mixed into :class:`ifjax._trace.interpreter._Tracer`."""

from __future__ import annotations

import math

from ifjax._spec import FlatMember
from ifjax._trace.values import UnsupportedPrimitiveError, _moved, _Value


class _ShapeRules:
  """The ``p_<primitive>`` rules of shape ops; ``self`` is the :class:`~ifjax._trace.interpreter._Tracer`."""

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
                                          f"{self.describe(v)} other than into ([stacked,] heads, head dim)")
        what = f"reshape {old} -> {new}"
        if len(split) == 2:
          out.labels[split[0]], out.labels[split[1]] = self.split_blocks(segs, new[split[1]], what)
        else:  # a fused qkv (3, heads, head dim): each stacked third split into heads, all thirds one group
          stacked = self.stacked(segs, old[ax], math.prod(new[j] for j in split[:-2]), what)
          labels = [self.split_blocks(part, new[split[-1]], what) for part in stacked]
          out.labels[split[-2]] = self.merge_axis([h for h, _ in labels], what)
          out.labels[split[-1]] = self.merge_axis([d for _, d in labels], what)
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

  def stacked(self, segs, size, f, what) -> list[tuple]:
    """The labels of an axis of ``size`` channels cut into ``f`` equal stacked parts (the q, k and v thirds of a
    fused qkv projection), each relative to its part's start; a class across a cut is split there. Every part
    must hold its channels in the same layout (it is one group per position across the parts)."""
    part = size // f
    for s, l, c, o in self.whole(segs, what):
      cuts = {b - s + o for b in range(part, size, part) if s < b < s + l}
      if cuts:
        self.split(c, cuts)
    parts: list[list] = [[] for _ in range(f)]
    for seg in segs:
      for s, l, c, o in self.resolve(seg):
        parts[s // part].append((s % part, l, c, o))
    if any([(s, l) for s, l, _, _ in p] != [(s, l) for s, l, _, _ in parts[0]] for p in parts):
      raise UnsupportedPrimitiveError(f"{what}: the {f} stacked parts of the channel axis hold channel groups in "
                                      "different layouts")
    return [tuple(p) for p in parts]

  def split_blocks(self, segs, b, what) -> tuple[tuple, tuple]:
    """Channels split into (heads, head dim = ``b``), e.g. attention heads or GroupNorm's groups: each class
    becomes blocks of ``b`` channels, one per neuron of a new *head* class, and a *head-dim* class holds the
    position inside a block (the same position in every block). A head-dim class spanning several classes
    cannot be a group and is frozen. Returns the labels of the two new axes."""
    heads, segs = [], self.whole(segs, what)
    d = None
    for s, l, c, _o in segs:
      cls = self.classes[c]
      if s % b or l % b:
        raise UnsupportedPrimitiveError(f"{what}: heads of {b} channels cut through a channel group at [{s}, {s + l})")
      if cls.blocks is None:
        h, dc = self.new_class(l // b), self.new_class(b)
        # a head dim split into blocks (rotary pairs) stays the head-dim group, at block granularity
        self.classes[h].kind = "head_dim" if cls.kind == "head_dim" else "heads"
        self.classes[dc].kind = "head_dim_inner" if cls.kind == "head_dim" else "head_dim"
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
      target.padded = target.padded or cls.padded
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
    if v.param:  # statistics of a parameter (a weight-standardised kernel's mean and variance)
      out.reduced = v.reduced | {v.param[1][a] for a in axes if a in v.param[1] and shapes[0][a] > 1}
    out.origin = None
    return [out]

  p_reduce_max = p_reduce_min = p_reduce_prod = p_reduce_and = p_reduce_or = p_reduce_xor = p_reduce_sum

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

  def p_dynamic_slice(self, eqn, ins, shapes, out_shapes):
    """``lax.dynamic_slice``: whole axes keep their channels; part of a channel axis at a position known only
    at run time is refused."""
    v, shape, sizes = ins[0], shapes[0], eqn.params["slice_sizes"]
    for ax in v.labels:
      if sizes[ax] != shape[ax]:
        raise UnsupportedPrimitiveError(f"dynamic_slice of part of the channel axis {ax} of {self.describe(v)}")
    return [self.sliced(v, shape, [0] * len(shape), sizes, (1,) * len(shape))]

  def p_tile(self, eqn, ins, shapes, out_shapes):
    """``jnp.tile`` (CLIP's class embedding tiled over the batch): an axis repeated once keeps its channels; a
    size-1 axis repeated is a broadcast; repeating the channels of a channel axis is refused."""
    v, reps = ins[0], eqn.params["reps"]
    for ax, r in enumerate(reps):
      if r != 1 and (ax in v.labels or ax in v.params):
        raise UnsupportedPrimitiveError(f"tile repeats the channel axis {ax} of {self.describe(v)} {r} times")
    out = _moved(v, {ax: ax for ax, r in enumerate(reps) if r == 1 or ax in v.data})
    if v.param:  # a parameter axis repeated holds no channels (a size-1 axis repeated is a broadcast)
      path, axes = v.param
      out.param = (path, {a: pa for a, pa in axes.items() if reps[a] == 1})
    return [out]

  def p_iota(self, eqn, ins, shapes, out_shapes):
    return [_Value()]

  def p_optimization_barrier(self, eqn, ins, shapes, out_shapes):
    return list(ins)

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


def _reshape_split(old, new, k) -> tuple[int, ...] | None:
  """The new axes (outer to inner, at least two) that old axis ``k`` is split into by a row-major reshape, or None:
  (heads, head dim), or (stacked..., heads, head dim) for a fused qkv projection."""
  lo = math.prod(old[k + 1:])
  hi = lo * old[k]
  inner_new = [math.prod(new[j + 1:]) for j in range(len(new))]
  js = [j for j in range(len(new)) if new[j] > 1 and inner_new[j] >= lo and inner_new[j] * new[j] <= hi]
  if len(js) >= 2 and inner_new[js[-1]] == lo and inner_new[js[0]] * new[js[0]] == hi:
    return tuple(js)
  return None
