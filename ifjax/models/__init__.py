"""Model zoo: ``get(name, num_classes=10, widths=None) -> (module, spec)``.

>>> import ifjax
>>> module, spec = ifjax.models.get("vgg11_bn")
>>> spec[0].name, len(spec.groups)
('conv7', 8)
"""

from __future__ import annotations

from collections.abc import Mapping

from ifjax._spec import Spec
from ifjax.models._zoo import MLP, VGG11BN, ResNet18, ResNet50, mlp_spec, resnet18_spec, resnet50_spec, vgg11_bn_spec

_ZOO = {
    "mlp": (MLP, mlp_spec),
    "vgg11_bn": (VGG11BN, vgg11_bn_spec),
    "resnet18": (ResNet18, resnet18_spec),
    "resnet50": (ResNet50, resnet50_spec),
}


def names() -> list[str]:
  return sorted(_ZOO)


def get(name: str, num_classes: int = 10, widths: Mapping[str, int] | None = None):
  """A flax.linen module and its spec. ``widths`` = ``{group name: width}`` (e.g. ``ifjax.widths(pruned, spec)``)."""
  if name not in _ZOO:
    raise ValueError(f"unknown model {name!r}; the zoo has {names()}")
  cls, make_spec = _ZOO[name]
  spec: Spec = make_spec()
  widths = dict(widths or {})
  unknown = sorted(set(widths) - set(spec.names))
  if unknown:
    raise ValueError(f"widths for unknown groups {unknown}; {name} has groups {spec.names}")
  bad = {k: v for k, v in widths.items() if not isinstance(v, int) or v < 1}
  if bad:
    raise ValueError(f"widths must be positive ints, got {bad}")
  return cls(num_classes=num_classes, widths=tuple(sorted(widths.items()))), spec


__all__ = ["MLP", "ResNet18", "ResNet50", "VGG11BN", "get", "names"]
