"""Importance metrics: ``fn(folded_variables, group) -> (n,)`` scores (see :mod:`ifjax._importance`)."""

from ifjax._importance import BUILTIN, chip, feature_maps, lamp, magnitude, random, taylor

__all__ = ["BUILTIN", "chip", "feature_maps", "lamp", "magnitude", "random", "taylor"]
