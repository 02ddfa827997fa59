"""The one union-find of :mod:`ifjax._trace`: channel classes (:func:`ifjax.trace_spec`) and axis sizes
(:func:`ifjax.resize`) are both sets of integer nodes ``0 .. n - 1`` merged by it."""

from __future__ import annotations


class UnionFind:
  """Disjoint sets of the nodes ``0 .. len(self) - 1``, with path halving.

  It only keeps the partition: a subclass keeps what each set carries (a class's
  members, an axis's new size) and merges it in its own ``union`` around :meth:`link`.
  """

  def __init__(self):
    self.parent: list[int] = []

  def __len__(self) -> int:
    return len(self.parent)

  def add(self) -> int:
    """A new node, alone in its set."""
    self.parent.append(len(self.parent))
    return len(self.parent) - 1

  def find(self, n: int) -> int:
    """The root of ``n``'s set."""
    while self.parent[n] != n:
      self.parent[n] = self.parent[self.parent[n]]
      n = self.parent[n]
    return n

  def link(self, root: int, other: int) -> None:
    """Puts the set of root ``other`` under root ``root`` (both roots, distinct)."""
    self.parent[other] = root
