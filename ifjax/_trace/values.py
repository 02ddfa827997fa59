"""What the tracer knows about a program's values: channel-class segments, classes and values.

A segment ``(start, length, class, class_offset)`` labels part of an axis with a
channel class; ``("flat", outer, inner, segment)`` labels a channel axis
flattened with others, ``outer`` and ``inner`` as in :class:`ifjax.FlatMember`.
"""

from __future__ import annotations

import dataclasses

from ifjax._errors import IfjaxError

Seg = tuple[int, int, int, int]  # (start on the axis, length, class id, offset inside the class)


class UnsupportedPrimitiveError(IfjaxError, NotImplementedError):
  """A primitive the tracer has no rule for touches a channel axis of some parameter."""


class PaddedChannelsWarning(UserWarning):
  """A pruning-only group whose zero-padded model (``apply_plan(..., keep_shapes=True)``) is not its pruned model
  (:func:`ifjax.resize`): a parameter is added to every channel of the group, the dropped ones too, so they do not
  stay zero, and a norm over the channels counts them (an MLP-Mixer's token-mixing biases)."""


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
  padded: str = ""  # a parameter added to every channel: zero-padded (keep_shapes) channels do not stay zero


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
  ``reduced``: for a function of one parameter (``param``: ``(w - mean(w)) / std(w)``, a weight-standardised
  kernel), the parameter's axes its statistics run over.
  """

  labels: dict[int, tuple[Seg, ...]] = dataclasses.field(default_factory=dict)
  params: dict[int, frozenset] = dataclasses.field(default_factory=dict)
  origin: str | None = None
  param: tuple[str, dict[int, int]] | None = None
  bn: str | None = None  # the BatchNorm applied since ``origin``'s layer
  data: frozenset = frozenset()  # unlabelled axes that carry the function's input data (not a broadcast)
  reduced: frozenset = frozenset()  # axes of ``param``'s array that a reduction ran over (a standardised kernel)


def _plain(seg):
  return seg[3] if seg[0] == "flat" else seg


def _layout(seg):
  """A segment without its class: what must agree for two operands to be combined."""
  if seg[0] == "flat":
    return ("flat", seg[1], seg[2], _layout(seg[3]))
  return (seg[0], seg[1], seg[3])


def _moved(v: _Value, mapping: dict[int, int]) -> _Value:
  """Relabels axes (src -> dst); axes not in ``mapping`` lose their labels."""
  out = _Value(origin=v.origin, bn=v.bn, data=frozenset(mapping[a] for a in v.data if a in mapping),
               reduced=v.reduced)
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



def _module(path: str) -> str:
  return path.split("/", 1)[1].rsplit("/", 1)[0]
