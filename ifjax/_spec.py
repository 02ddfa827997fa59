"""Group specs: which array axes hold the neurons of each coupled group.

A *group* is a set of channels that must be pruned together. Its ``producers``
hold the neurons on the output side (a kernel's out axis, a bias) and its
``consumers`` on the input side (the next kernel's in axis). Each member is a
``(path, axis)`` or ``(path, axis, offset)`` triple; ``path`` is a "/"-joined key
path into the variables dict, e.g. ``"params/conv0/kernel"``.

``Spec.groups`` are stored in *network order* (input to output); the paper's
numbering counts from the output, so ``paper_index = len(groups) - 1 - position``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction
from typing import TYPE_CHECKING, Any, NamedTuple, Union

import jax
import jax.core
import jax.numpy as jnp
import numpy as np

from ifjax._errors import ArgumentTypeError

Variables = Mapping[str, Any]
# an array that is NumPy on the host path (small per-group work, no XLA compilation) and jax otherwise
AnyArray = Union[jax.Array, np.ndarray]

DEFAULT_BN_EPS = 1e-5  # flax.linen.BatchNorm's default epsilon.


class Member(NamedTuple):
  """One array axis of a group: entries ``offset .. offset + n - 1`` of ``axis``."""

  path: str
  axis: int
  offset: int = 0

  outer = 1
  inner = 1

  def neurons_first(self, arr):
    """``arr`` -> (N, ...) with this member's neuron axis first (N = all entries of that axis)."""
    xp = array_module(arr)
    return xp.moveaxis(xp.asarray(arr), self.axis, 0)

  def restore(self, x):
    """Inverse of :meth:`neurons_first` for an array whose neuron axis has a new length."""
    return array_module(x).moveaxis(x, 0, self.axis)


class FlatMember(NamedTuple):
  """A member on a flattened axis (a Dense after a flatten), viewed as (outer, N, inner).

  The neurons index the middle part: channel c of an NHWC flatten over H*W
  positions is ``outer=H*W, inner=1``; of an NCHW flatten ``outer=1, inner=H*W``.
  """

  path: str
  axis: int
  offset: int = 0
  outer: int = 1
  inner: int = 1

  def neurons_first(self, arr):
    xp = array_module(arr)
    x = xp.moveaxis(xp.asarray(arr), self.axis, 0)
    x = x.reshape(self.outer, x.shape[0] // (self.outer * self.inner), self.inner, *x.shape[1:])
    return xp.moveaxis(x, 1, 0)

  def restore(self, x):
    xp = array_module(x)
    x = xp.moveaxis(x, 0, 1)
    return xp.moveaxis(x.reshape(self.outer * x.shape[1] * self.inner, *x.shape[3:]), 0, self.axis)


class BatchNormPair(NamedTuple):
  """A BatchNorm at module path ``bn`` that directly follows the layer at ``layer``."""

  layer: str
  bn: str
  eps: float = DEFAULT_BN_EPS


def _as_member(m: Any) -> Member | FlatMember:
  """A checked member with plain-int fields (NumPy integers, e.g. from a tracer, would not serialise to JSON)."""
  if isinstance(m, (Member, FlatMember)) and all(type(v) is int for v in m[1:]):
    return m
  if isinstance(m, str) or not isinstance(m, Sequence) or len(m) not in (2, 3, 5):
    raise ValueError(f"a group member must be (path, axis), (path, axis, offset) or "
                     f"(path, axis, offset, outer, inner), got {m!r}")
  path, axis, *rest = m
  if not isinstance(path, str) or not all(isinstance(v, (int, np.integer)) for v in (axis, *rest)):
    raise ValueError(f"a group member must be (str path, int axis[, int offset[, int outer, int inner]]), got {m!r}")
  offset, outer, inner = (list(rest) + [0, 1, 1][len(rest):])
  if offset < 0 or outer < 1 or inner < 1:
    raise ValueError(f"member {path!r}: need offset >= 0, outer >= 1, inner >= 1, got {offset}, {outer}, {inner}")
  if (outer, inner) != (1, 1) or isinstance(m, FlatMember):
    return FlatMember(path, int(axis), int(offset), int(outer), int(inner))
  return Member(path, int(axis), int(offset))


def _member_json(m: Member | FlatMember) -> list:
  return list(m)


def _module_path(p: str) -> str:
  """Strips a leading collection name: ``params/conv0`` -> ``conv0``."""
  for coll in ("params/", "batch_stats/"):
    if p.startswith(coll):
      return p[len(coll):]
  return p


@dataclasses.dataclass(frozen=True)
class Group:
  """A set of coupled neurons. Members are normalised to :class:`Member` tuples."""

  name: str
  producers: tuple[Member | FlatMember, ...]
  consumers: tuple[Member | FlatMember, ...] = ()
  size: int | None = None  # needed only when every member is a segment of an axis shared with other groups
  # False for a pruning-only group: its neurons can be permuted and pruned, but merging exact duplicates does not
  # keep the function (a LayerNorm / GroupNorm over them, tied weights, a query-key contraction); see check_spec
  exact: bool = True

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name:
      raise ValueError(f"group name must be a non-empty string, got {self.name!r}")
    object.__setattr__(self, "producers", tuple(_as_member(m) for m in self.producers))
    object.__setattr__(self, "consumers", tuple(_as_member(m) for m in self.consumers))
    if not self.producers:
      raise ValueError(f"group {self.name!r} has no producers")
    if self.size is not None and (not isinstance(self.size, (int, np.integer)) or isinstance(self.size, bool)
                                  or self.size < 1):
      raise ValueError(f"group {self.name!r}: size must be a positive int, got {self.size!r}")
    if self.size is not None:
      object.__setattr__(self, "size", int(self.size))
    if not isinstance(self.exact, (bool, np.bool_)):
      raise ValueError(f"group {self.name!r}: exact must be a bool, got {self.exact!r}")
    object.__setattr__(self, "exact", bool(self.exact))

  if TYPE_CHECKING:  # the constructor takes any sequences of members; __post_init__ stores them checked, as tuples
    def __init__(self, name: str, producers: Iterable[Member | FlatMember | Sequence[Any]],
                 consumers: Iterable[Member | FlatMember | Sequence[Any]] = (), size: int | None = None,
                 exact: bool = True) -> None: ...

  @property
  def members(self) -> tuple[Member | FlatMember, ...]:
    return self.producers + self.consumers


@dataclasses.dataclass(frozen=True)
class Spec:
  """Groups (network order) plus the BatchNorms to fold into their layers."""

  groups: tuple[Group, ...]
  batchnorms: tuple[BatchNormPair, ...] = ()

  if TYPE_CHECKING:  # the constructor takes any sequences; __post_init__ stores tuples of checked BatchNormPairs
    def __init__(self, groups: Iterable[Group],
                 batchnorms: Iterable[BatchNormPair | Sequence[Any]] = ()) -> None: ...

  def __post_init__(self):
    object.__setattr__(self, "groups", tuple(self.groups))
    bns = []
    given: tuple[Any, ...] = self.batchnorms  # as given to the constructor: not yet BatchNormPairs
    for b in given:
      if isinstance(b, BatchNormPair):
        bns.append(b)
      elif isinstance(b, Sequence) and len(b) in (2, 3) and all(isinstance(x, str) for x in b[:2]):
        bns.append(BatchNormPair(_module_path(b[0]), _module_path(b[1]), *map(float, b[2:])))
      else:
        raise ValueError(f"a batchnorm entry must be (layer_prefix, bn_prefix[, eps]), got {b!r}")
    object.__setattr__(self, "batchnorms", tuple(bns))
    # arrays of folded BNs are handled through `batchnorms`; listing them in a group too is allowed and dropped
    bn_arrays = {f"{c}/{b.bn}/{k}" for b in bns for c, k in (("params", "scale"), ("params", "bias"),
                                                             ("batch_stats", "mean"), ("batch_stats", "var"))}
    object.__setattr__(self, "groups", tuple(
        g if not any(m.path in bn_arrays for m in g.members) else
        dataclasses.replace(g, producers=[m for m in g.producers if m.path not in bn_arrays],
                            consumers=[m for m in g.consumers if m.path not in bn_arrays]) for g in self.groups))
    names = [g.name for g in self.groups]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
      raise ValueError(f"duplicate group names: {dup}")

  # -- lookup ---------------------------------------------------------------
  def paper_index(self, name: str) -> int:
    """The paper's group number (0 = the group closest to the output)."""
    return len(self.groups) - 1 - self.names.index(name)

  @property
  def names(self) -> list[str]:
    return [g.name for g in self.groups]

  def __getitem__(self, key: str | int) -> Group:
    """A group by name, or by the paper's index (0 = closest to the output)."""
    return self.groups[self._position(key)]

  def _position(self, key: str | int) -> int:
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
      if not 0 <= key < len(self.groups):
        raise ValueError(f"paper group index {key} out of range: the spec has {len(self.groups)} groups "
                         f"(0..{len(self.groups) - 1})")
      return len(self.groups) - 1 - int(key)
    if isinstance(key, str):
      try:
        return self.names.index(key)
      except ValueError:
        raise ValueError(f"unknown group {key!r}; groups are {self.names}") from None
    raise ValueError(f"a group is selected by name (str) or paper index (int), got {key!r}")

  def select(self, groups: str | int | Iterable[str | int] | None) -> list[Group]:
    """Groups by name or paper index, in network order; ``None`` selects all."""
    if groups is None:
      return list(self.groups)
    if isinstance(groups, (str, int, np.integer)):
      groups = [groups]
    pos = sorted({self._position(g) for g in groups})
    return [self.groups[p] for p in pos]

  # -- JSON -----------------------------------------------------------------
  def to_json(self) -> str:
    return json.dumps({
        "groups": [{"name": g.name, "producers": [_member_json(m) for m in g.producers],
                    "consumers": [_member_json(m) for m in g.consumers],
                    **({"size": g.size} if g.size is not None else {}),
                    **({"exact": False} if not g.exact else {})} for g in self.groups],
        "batchnorms": [list(b) for b in self.batchnorms],
    }, indent=1)

  @classmethod
  def from_json(cls, text: str) -> Spec:
    """The spec :meth:`to_json` wrote. ``TypeError`` if ``text`` is not a str; ``ValueError`` naming the part
    (``groups[2]``, ``batchnorms[0]``) if it is not JSON or not a spec's layout."""
    if not isinstance(text, (str, bytes, bytearray)):
      raise TypeError(f"Spec.from_json: text must be a JSON str, got {type(text).__name__}")
    try:
      d = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"Spec.from_json: text is not valid JSON: {e}") from None
    if not isinstance(d, dict) or not isinstance(d.get("groups"), list):
      raise ValueError("Spec.from_json: text must be a JSON object with a 'groups' list (of Spec.to_json), got "
                       f"{str(text)[:80]!r}")
    groups = []
    for i, g in enumerate(d["groups"]):
      where = f"Spec.from_json: groups[{i}]"
      if not isinstance(g, dict):
        raise ValueError(f"{where} must be an object with 'name' and 'producers', got {g!r:.80}")
      missing = [k for k in ("name", "producers") if k not in g]
      if missing:
        raise ValueError(f"{where} lacks {' and '.join(map(repr, missing))}")
      for key in ("producers", "consumers"):
        if not isinstance(g.get(key, []), list):
          raise ValueError(f"{where} ({g['name']!r}): {key} must be a list of members, got {g[key]!r:.80}")
      try:
        groups.append(Group(g["name"], g["producers"], g.get("consumers", ()), g.get("size"), g.get("exact", True)))
      except (TypeError, ValueError) as e:
        raise ValueError(f"{where} ({g['name']!r:.80}): {e}") from None
    bns = d.get("batchnorms", [])
    if not isinstance(bns, list) or not all(isinstance(b, list) for b in bns):
      raise ValueError(f"Spec.from_json: batchnorms must be a list of [layer, bn(, eps)] lists, got {bns!r:.80}")
    try:
      return cls(tuple(groups), tuple(tuple(b) for b in bns))
    except (TypeError, ValueError) as e:
      raise ValueError(f"Spec.from_json: {e}") from None

  # -- validation -----------------------------------------------------------
  def validate(self, variables: Variables) -> dict[str, int]:
    """Checks the spec against ``variables``; returns ``{group name: neuron count}``.

    An array axis claimed by one group must belong to it whole; an axis shared by
    several groups (concatenation) is split into non-overlapping segments at
    their offsets. Raises ``ValueError`` naming the path and sizes on any mismatch.
    """
    flat = flatten(variables)
    owners: dict[tuple[str, int], list[tuple[Group, Member | FlatMember]]] = {}
    for g in self.groups:
      for m in g.members:
        arr = _lookup(flat, m.path, f"group {g.name!r}")
        nd = np.ndim(arr)
        if not -nd <= m.axis < nd:
          raise ValueError(f"group {g.name!r}: axis {m.axis} is out of range for {m.path!r} with shape {np.shape(arr)}")
        if np.shape(arr)[m.axis] % (m.outer * m.inner):
          raise ValueError(f"group {g.name!r}: axis {m.axis} of {m.path!r} (size {np.shape(arr)[m.axis]}) is not "
                           f"divisible by outer * inner = {m.outer} * {m.inner}")
        owners.setdefault((m.path, m.axis % nd), []).append((g, m))
    sizes: dict[str, int] = {}
    axis_key = lambda m: (m.path, m.axis % np.ndim(flat[m.path]))
    for g in self.groups:  # the neuron count: explicit, else from the first member owning a whole axis
      first = next((m for m in g.members if len(owners[axis_key(m)]) == 1), None)
      if g.size is not None:
        sizes[g.name], first = int(g.size), first or g.members[0]
      elif first is None:
        raise ValueError(f"group {g.name!r}: every member shares its axis with another group, so its neuron count "
                         "is undefined; pass Group(..., size=n)")
      else:
        sizes[g.name] = _neuron_axis_len(flat, first) - first.offset
      for m in g.members:
        length = _neuron_axis_len(flat, m)
        whole = len(owners[axis_key(m)]) == 1 and g.size is None  # an explicit size: a segment (the rest frozen)
        if (whole and (m.offset != 0 or length != sizes[g.name])) or m.offset + sizes[g.name] > length:
          given = (f"its size= is {g.size}" if g.size is not None else
                   f"{first.path!r} axis {first.axis} gives {sizes[g.name]}")
          raise ValueError(f"group {g.name!r}: members disagree on the neuron count: {given}, but {m.path!r} axis "
                           f"{m.axis} has {length} entries (offset {m.offset})")
    for (path, axis), segs in owners.items():
      if len(segs) > 1:
        spans = sorted((m.offset, m.offset + sizes[g.name], g.name) for g, m in segs)
        for (a0, a1, ga), (b0, b1, gb) in zip(spans, spans[1:]):
          if b0 < a1:
            raise ValueError(f"{path!r} axis {axis}: segments of groups {ga!r} [{a0}, {a1}) and {gb!r} [{b0}, {b1}) "
                             "overlap")
    for b in self.batchnorms:
      k = _lookup(flat, f"params/{b.layer}/kernel", f"batchnorm pair {tuple(b)!r}")
      for stat in ("mean", "var"):
        s = _lookup(flat, f"batch_stats/{b.bn}/{stat}", f"batchnorm pair {tuple(b)!r}")
        if np.shape(s) != (np.shape(k)[-1],):
          raise ValueError(f"batchnorm pair {tuple(b)!r}: batch_stats/{b.bn}/{stat} has shape {np.shape(s)} "
                           f"but params/{b.layer}/kernel has {np.shape(k)[-1]} output channels")
    return sizes


def _neuron_axis_len(flat, m: Member | FlatMember) -> int:
  return np.shape(flat[m.path])[m.axis] // (m.outer * m.inner)


def _lookup(flat: Mapping[str, Any], path: str, where: str):
  if path not in flat:
    close = [k for k in flat if k.rsplit("/", 1)[-1] == path.rsplit("/", 1)[-1]][:5]
    hint = f"; arrays with that leaf name: {close}" if close else ""
    raise ValueError(f"{where}: unknown path {path!r}{hint}")
  return flat[path]


def member_rows(flat: Mapping[str, Any], m: Member | FlatMember, n: int) -> AnyArray:
  """The n neurons of member ``m`` as rows: (n, d) float32, neuron axis moved first (NumPy for NumPy input)."""
  xp = array_module(flat[m.path])
  arr = m.neurons_first(xp.asarray(flat[m.path], xp.float32))[m.offset:m.offset + n]
  return arr.reshape(n, -1)


def weight_members(flat: Mapping[str, Any], group: Group) -> list[Member | FlatMember]:
  """Members with a weight matrix (ndim >= 2): producer kernels and consumer kernels, sorted by (path, axis,
  offset), so that scores and costs, rounding included, do not depend on the order a spec lists them in."""
  return sorted((m for m in group.members if np.ndim(flat[m.path]) >= 2), key=lambda m: (m.path, m.axis, m.offset))


# -- pytree helpers ------------------------------------------------------------
def array_module(*arrays) -> Any:
  """``numpy`` when every argument is a NumPy array (the host path: no XLA compilation for small per-group
  work), else ``jax.numpy`` (jax arrays, tracers inside ``jit``)."""
  return np if all(isinstance(a, np.ndarray) for a in arrays) else jnp


def is_traced(tree) -> bool:
  """Whether a leaf is a tracer: the caller runs under ``jit``/``vmap``/``grad`` and must stay in
  ``jax.numpy``, without host syncs."""
  return any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(tree))


def on_host(tree):
  """Every array leaf as a NumPy array (no copy for CPU jax arrays); other leaves as they are."""
  return jax.tree_util.tree_map(lambda x: np.asarray(x) if isinstance(x, (jax.Array, np.ndarray)) else x, tree)


def to_jax(tree):
  """Every NumPy leaf as a jax array: ``device_put``, a transfer (``jnp.asarray`` would compile per shape)."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  idx = [i for i, x in enumerate(leaves) if isinstance(x, np.ndarray)]
  for i, x in zip(idx, jax.device_put([leaves[i] for i in idx])):  # one batched transfer
    leaves[i] = x
  return jax.tree_util.tree_unflatten(treedef, leaves)


class _Nested(dict):
  """A nested dict made by ``unflatten(flat, keep_flat=True)``: ``flatten`` returns that flat dict."""

  flat: dict


# a pytree like a dict (keys sorted); rebuilt as a plain dict. The stub wants a hashable aux (a key list serves
# while no treedef of a _Nested is hashed, e.g. as a jit cache key) and an unflatten to the same type (a _Nested
# deliberately becomes a plain dict).
jax.tree_util.register_pytree_node(
    _Nested, lambda d: ([d[k] for k in sorted(d)], sorted(d)),  # pyright: ignore[reportArgumentType]
    lambda keys, values: dict(zip(keys, values)))  # pyright: ignore[reportArgumentType, reportCallIssue]


def flatten(variables: Variables) -> dict[str, Any]:
  """Nested dict -> ``{"a/b/c": leaf}`` (insertion order)."""
  if type(variables) is _Nested:
    return variables.flat
  out = {}

  def rec(d, prefix):
    for k, v in d.items():
      p = f"{prefix}/{k}" if prefix else str(k)
      if type(v) is dict or (not hasattr(v, "shape") and isinstance(v, Mapping)):  # skip the ABC check for arrays
        rec(v, p)
      else:
        out[p] = v

  rec(variables, "")
  return out


def unflatten(flat: Mapping[str, Any], keep_flat: bool = False) -> dict[str, Any]:
  """``{"a/b/c": leaf}`` -> nested plain dicts. ``keep_flat``: the result remembers ``flat`` and
  ``flatten`` returns it (for internal read-only use: later edits of either are not seen)."""
  out: dict[str, Any] = _Nested() if keep_flat else {}
  for p, v in flat.items():
    d = out
    *head, last = p.split("/")
    for k in head:
      d = d.setdefault(k, {})
    d[last] = v
  if isinstance(out, _Nested):  # keep_flat
    out.flat = dict(flat)
  return out


def match_groups(spec_a: Spec, spec_b: Spec, variables: Variables | None = None) -> dict[str, str]:
  """``{group name in spec_a: group name in spec_b}`` for the groups with the same members, e.g. a hand-written
  spec and :func:`ifjax.trace_spec`'s spec of the same model, whose group names differ.

  Members compare as ``(path, axis, offset, outer, inner)``, producers and consumers each as a set (order
  ignored); with ``variables``, negative axes are made positive first. Every group of either spec must have
  exactly one counterpart, else ValueError names the groups without one, each with the closest group of the
  other spec and the members that differ. Carry widths or a plan across with the mapping:
  ``{names[k]: v for k, v in plan.items()}``.

  >>> a = Spec((Group("hidden", [("params/fc0/kernel", 1)], [("params/fc1/kernel", 0)]),))
  >>> b = Spec((Group("fc0", [("params/fc0/kernel", 1, 0)], [("params/fc1/kernel", 0)]),))
  >>> match_groups(a, b)
  {'hidden': 'fc0'}
  """
  flat = flatten(variables) if variables is not None else {}

  def key(m: Member | FlatMember) -> tuple:
    axis = m.axis % np.ndim(flat[m.path]) if m.axis < 0 and m.path in flat else m.axis
    return m.path, axis, m.offset, m.outer, m.inner

  def keys(spec: Spec, which: str) -> dict[str, tuple[frozenset, frozenset]]:
    out = {g.name: (frozenset(map(key, g.producers)), frozenset(map(key, g.consumers))) for g in spec.groups}
    seen: dict[tuple, str] = {}
    for name, k in out.items():
      if k in seen:
        raise ValueError(f"{which}: groups {seen[k]!r} and {name!r} have the same members, so they cannot be "
                         "told apart")
      seen[k] = name
    return out

  ka, kb = keys(spec_a, "spec_a"), keys(spec_b, "spec_b")
  by_members = {k: name for name, k in kb.items()}
  out = {name: by_members[k] for name, k in ka.items() if k in by_members}
  problems = []
  for which, mine, other, done in (("spec_a", ka, kb, set(out)), ("spec_b", kb, ka, set(out.values()))):
    for name in (n for n in mine if n not in done):
      members = mine[name][0] | mine[name][1]
      overlap = {o: len(members & (other[o][0] | other[o][1])) for o in other}
      near = max(overlap, key=lambda o: overlap[o], default=None)
      theirs = other[near][0] | other[near][1] if near is not None else frozenset()
      if not theirs & members:
        problems.append(f"{which} group {name!r} has no counterpart: no group of the other spec shares a member "
                        f"with it (its producers: {sorted(mine[name][0])[:4]})")
      elif members == theirs:
        problems.append(f"{which} group {name!r} has the members of {near!r}, but splits them into producers and "
                        "consumers differently")
      else:
        problems.append(f"{which} group {name!r} has no counterpart; the closest, {near!r}, differs in "
                        f"{sorted(members - theirs)[:4]} (only in {name!r}) and {sorted(theirs - members)[:4]} "
                        f"(only in {near!r})")
  if problems:
    raise ValueError("the specs' groups do not correspond: " + "; ".join(problems))
  return out


def resized_spec(spec: Spec, counts: Mapping[str, tuple[int, int]], ndims: Mapping[str, int] | None = None) -> Spec:
  """The spec of the variables in which group g went from n to m neurons, ``counts = {g: (n, m)}`` (what
  :func:`ifjax.apply_plan` does): a planned group's ``size=`` becomes m, and every member on an axis shared by
  segments moves its offset back by the neurons removed from the segments before it. ``ndims``
  (``{path: ndim}``) equates negative and non-negative axes of one array; without it they are told apart.

  >>> spec = Spec((Group("a", [("params/x/kernel", 1, 0)], size=4), Group("b", [("params/x/kernel", 1, 4)], size=4)))
  >>> [(g.size, g.producers[0].offset) for g in resized_spec(spec, {"a": (4, 2)}).groups]
  [(2, 0), (4, 2)]
  """
  unknown = [k for k in counts if k not in spec.names]
  if unknown:
    raise ValueError(f"the plan has groups {unknown}, which the spec does not have ({spec.names})")
  key = lambda m: (m.path, m.axis % ndims[m.path] if ndims and m.path in ndims else m.axis)
  segments: dict[tuple[str, int], set[tuple[int, str]]] = {}
  for g in spec.groups:
    for m in g.members:
      segments.setdefault(key(m), set()).add((m.offset, g.name))
  removed = {k: n - m for k, (n, m) in counts.items()}

  def moved(m):
    shift = sum(removed.get(name, 0) for offset, name in segments[key(m)] if offset < m.offset)
    return m._replace(offset=m.offset - shift) if shift else m

  groups = []
  for g in spec.groups:
    size = counts[g.name][1] if g.size is not None and g.name in counts else g.size
    groups.append(dataclasses.replace(g, producers=tuple(map(moved, g.producers)),
                                      consumers=tuple(map(moved, g.consumers)), size=size))
  return Spec(tuple(groups), spec.batchnorms)


def widths(variables: Variables, spec: Spec, plan: Mapping[str, Any] | None = None) -> dict[str, int]:
  """``{group name: neuron count}``: pass as ``widths=`` to a zoo model to rebuild it at this size.

  With a ``plan`` (of :func:`ifjax.plan`), the result is the widths *after* ``apply_plan``; ``variables``
  may be either the ones the plan was made for or the pruned ones ``apply_plan`` returned (checked against
  the plan's pruned spec, see :meth:`ifjax.Plan.spec`). Use this form when groups are segments of shared axes
  (option-A ResNets), whose pruned sizes the pruned arrays alone do not determine. ``plan.widths()`` gives
  the same without any variables.

  Without a plan, pruned ``variables`` of a spec with segment groups work too:
  each shared axis is the sum of its segments, and segments that the shapes
  leave open (option A's padding halves) get the one ratio that gave the segment
  groups the shapes do determine (a uniform ratio, as ``intra_fuse(v, spec, 0.5)``);
  if the groups were pruned at different ratios, ValueError asks for the plan.
  This form assumes, as the zoo's hand specs do, that a group with ``size=``
  owning an axis owns all of it and that segments tile the axes they share.
  """
  if plan is None:
    return _segment_widths(variables, spec) if any(g.size is not None for g in spec.groups) else \
        spec.validate(variables)
  return pruned_widths(variables, spec, plan)[1]


def pruned_widths(variables: Variables, spec: Spec, plan: Mapping[str, Any]) -> tuple[str, dict[str, int]]:
  """``("before" or "after", widths after the plan)``: :func:`widths` with a plan, and which variables it got,
  the ones the plan was made for (``"before"``) or the pruned ones of ``apply_plan`` (``"after"``)."""
  if not isinstance(plan, Mapping):
    raise ArgumentTypeError(f"plan must be a dict {{group name: GroupPlan}} (of ifjax.plan), got {type(plan).__name__}")
  if not isinstance(spec, Spec):
    raise ArgumentTypeError(f"spec must be an ifjax.Spec, got {type(spec).__name__}")
  counts = {}
  for name, gp in plan.items():
    if not (hasattr(gp, "n") and hasattr(gp, "m")):
      raise ArgumentTypeError(f"plan[{name!r}] must be a GroupPlan, got {type(gp).__name__}")
    counts[name] = (gp.n, gp.m)
  pruned = resized_spec(spec, counts, {p: np.ndim(a) for p, a in flatten(variables).items()})
  try:
    sizes = spec.validate(variables)
    before = "; ".join(f"group {k!r} has {sizes[k]} neurons, the plan's {n}" for k, (n, _) in counts.items()
                       if sizes[k] != n)
  except ValueError as e:
    before = str(e)
  if not before:
    return "before", {**sizes, **{k: m for k, (_, m) in counts.items()}}
  try:
    sizes = pruned.validate(variables)
    after = "; ".join(f"group {k!r} has {sizes[k]} neurons, the plan keeps {m}" for k, (_, m) in counts.items()
                      if sizes[k] != m)
  except ValueError as e:
    after = str(e)
  if not after:
    return "after", sizes
  raise ValueError("widths(variables, spec, plan): the variables are neither the ones the plan was made for "
                   f"(with spec: {before}) nor the pruned ones apply_plan(variables, spec, plan) returns (with the "
                   f"plan's pruned spec, plan.spec(): {after}); pass one of those, or use plan.widths()")


def _segment_widths(variables: Variables, spec: Spec) -> dict[str, int]:
  """:func:`widths` of pruned ``variables`` when some groups are segments of shared axes (their offsets are stale)."""
  flat = flatten(variables)
  owners: dict[tuple[str, int], list[str]] = {}  # a group once per segment it has there (heads of q, k and v)
  totals: dict[tuple[str, int], int] = {}
  key = lambda m: (m.path, m.axis % np.ndim(flat[m.path]))
  for g in spec.groups:
    for m in g.members:
      _lookup(flat, m.path, f"group {g.name!r}")
      owners.setdefault(key(m), []).append(g.name)
      totals[key(m)] = _neuron_axis_len(flat, m)
  sizes: dict[str, int] = {}
  for g in spec.groups:
    whole = {totals[key(m)] // len(owners[key(m)]) for m in g.members if set(owners[key(m)]) == {g.name}}
    if len(whole) > 1:
      raise ValueError(f"group {g.name!r}: the arrays it owns whole disagree on its width: {sorted(whole)}")
    sizes.update({g.name: whole.pop()} if whole else {})
  shared = [(sorted(names), totals[k], k) for k, names in owners.items() if len(set(names)) > 1]
  progress = True
  while progress:  # an axis shared by segments is their sum: solve the axes with one open segment
    progress = False
    for names, total, _ in shared:
      unknown = [n for n in names if n not in sizes]
      if unknown and len(set(unknown)) == 1:
        sizes[unknown[0]] = (total - sum(sizes[n] for n in names if n in sizes)) // len(unknown)
        progress = True
  open_ = [g for g in spec.groups if g.name not in sizes]
  if open_:  # kept_count(n, r) = floor(n * (1 - r)) = w  <=>  1 - (w + 1) / n < r <= 1 - w / n
    known = [g for g in spec.groups if g.size is not None and g.name in sizes]
    lo = max((1 - Fraction(sizes[g.name] + 1, g.size) for g in known), default=Fraction(1))
    hi = min((1 - Fraction(sizes[g.name], g.size) for g in known), default=Fraction(0))
    for g in open_:
      w = math.floor(g.size * (1 - hi)) if g.size is not None and lo < hi else None
      if w is None or g.size is None or w != math.ceil(g.size * (1 - lo)) - 1 or w < 1:
        raise ValueError(f"widths: the arrays do not determine the width of segment group {g.name!r}, and the groups "
                         "they do determine were not pruned at one common ratio; pass plan= (ifjax.widths(variables, "
                         "spec, plan) with the unpruned variables)")
      sizes[g.name] = w
  for names, total, (path, axis) in shared:
    if sum(sizes[n] for n in names) != total:
      raise ValueError(f"widths: {path!r} axis {axis} has {total} entries, but its segment groups {names} would have "
                       f"{[sizes[n] for n in names]}; the groups were pruned at different ratios: pass plan= "
                       "(ifjax.widths(variables, spec, plan) with the unpruned variables)")
  return {g.name: sizes[g.name] for g in spec.groups}
