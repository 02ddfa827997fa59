"""Tracer rules for contractions (conv, dot_general, embedding gathers) and control flow (cond, scan).
Mixed into :class:`ifjax._trace.interpreter._Tracer`."""

from __future__ import annotations

from ifjax._spec import FlatMember, Member
from ifjax._trace.values import UnsupportedPrimitiveError, _module, _moved, _Value


class _ContractionRules:
  """The ``p_<primitive>`` rules of contractions and control flow; ``self`` is the
  :class:`~ifjax._trace.interpreter._Tracer`."""

  # -- contractions --------------------------------------------------------------------
  def p_conv_general_dilated(self, eqn, ins, shapes, out_shapes):
    lhs, rhs = ins
    dn = eqn.params["dimension_numbers"]
    groups, bgroups = eqn.params["feature_group_count"], eqn.params["batch_group_count"]
    if bgroups != 1:
      raise UnsupportedPrimitiveError("conv_general_dilated with batch_group_count > 1")
    if rhs.labels or not rhs.param:
      raise UnsupportedPrimitiveError("conv_general_dilated whose kernel is not a parameter (or an element-wise "
                                      "function of one parameter and its statistics)")
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
    self.standardised(rhs, path, {k_in: in_segs, k_out: out.labels.get(fax, ())})
    return [out]

  def standardised(self, kernel, path, segs_by_axis):
    """A kernel standardised over some of its axes (BiT's weight-standardised convs): the channel groups on
    those axes are pruning-only, since removing or merging channels changes the statistics."""
    for pax, segs in segs_by_axis.items():
      if pax in kernel.reduced and segs:
        self.mark_inexact(segs, f"the kernel {path!r} is standardised over these channels (its mean and variance "
                                "run over them), so merging neurons changes it")

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
        if len(several) > 1:  # (heads, [subheads (GQA: queries per KV head), ...] head dim)
          k = several.index(i) if i in several else 0
          self.classes[cls].kind = ("head_dim" if i == several[-1] else "heads" if k == 0
                                    else "subheads" + (str(k) if k > 1 else ""))
        self.classes[cls].producers.append((self.eqn_counter, Member(path, axes[i], 0)))
        out.labels[pos[(pside, i)]] = ((0, pshape[i], cls, 0),)
    if prm.reduced:  # a standardised / weight-normalised kernel
      by_axis = {axes[p_ax]: act.labels.get(a_ax, ()) for a_ax, p_ax in zip(ac, pc)}
      by_axis.update({axes[i]: out.labels.get(pos[(pside, i)], ()) for i in p_free if i in axes})
      self.standardised(prm, path, by_axis)
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
